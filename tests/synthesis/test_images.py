"""Image sources: local indexes, safe names, the store, and Wikipedia against a local server."""

from __future__ import annotations

import io
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from PIL import Image

from mmsafe.errors import ConfigError, DataError, ImageError
from mmsafe.synthesis.images import (
    FoundImage,
    ImageChain,
    ImageIndex,
    ImageStore,
    LocalImageSource,
    WikipediaImageSource,
    safe_file_name,
)
from tests.synthesis.build_fixtures import write_png


def test_safe_file_name():
    assert safe_file_name("Café de Flore.JPG") == "Caf_de_Flore.jpg"
    assert safe_file_name("../../etc/passwd") == "passwd"
    assert safe_file_name("..hidden.png") == "hidden.png"
    assert safe_file_name("a/b\\c?.jpeg") == "c.jpeg"
    assert safe_file_name("???") == "image"
    assert len(safe_file_name("x" * 300 + ".png")) == 120


def test_index_from_a_typed_folder_csv_and_json(tmp_path):
    folder = tmp_path / "folder"
    write_png(folder / "PER" / "Barack_Obama.png", (1, 2, 3))
    write_png(folder / "misc.jpg", (1, 2, 3))
    index = ImageIndex.load(folder)
    assert index.get("Barack Obama").type == "PER" and index.get("misc").type is None
    assert index.get("barack obama").name == "Barack Obama"
    with pytest.raises(ConfigError, match="needs an entity type"):
        index.typed_names(["PER"])

    write_png(tmp_path / "img" / "p.png", (1, 2, 3))
    (tmp_path / "index.json").write_text(
        json.dumps({"Paris": {"image": "img/p.png", "type": "LOC"}, "Other": "img/p.png"}), encoding="utf-8"
    )
    assert ImageIndex.load(tmp_path / "index.json").get("Paris").path == tmp_path / "img" / "p.png"
    (tmp_path / "list.json").write_text(
        json.dumps([{"entity": "Paris", "image": "img/p.png", "type": "LOC"}]), encoding="utf-8"
    )
    assert ImageIndex.load(tmp_path / "list.json").typed_names(["LOC"]) == [("Paris", "LOC")]


def test_index_errors_name_file_row_and_field(tmp_path):
    write_png(tmp_path / "p.png", (1, 2, 3))
    bad_type = tmp_path / "bad_type.csv"
    bad_type.write_text("entity,image,type\nParis,p.png,LOC\nRome,p.png,CITY\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad_type\.csv:line 3:type: expected one of PER, ORG, LOC, MISC, got 'CITY'"):
        ImageIndex.load(bad_type)
    missing = tmp_path / "missing.csv"
    missing.write_text("entity,image\nParis,nothere.png\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"missing\.csv:line 2:image: image file not found"):
        ImageIndex.load(missing)
    header = tmp_path / "header.csv"
    header.write_text("name,file\n", encoding="utf-8")
    with pytest.raises(DataError, match="missing column"):
        ImageIndex.load(header)


def test_store_copies_once_and_keeps_names_unique(tmp_path):
    first = write_png(tmp_path / "a" / "x.png", (255, 0, 0))
    second = write_png(tmp_path / "b" / "x.png", (0, 255, 0))
    store = ImageStore(tmp_path / "out")
    assert store.store(FoundImage(first, "x.png", "local")) == "x.png"
    assert store.store(FoundImage(first, "x.png", "local")) == "x.png"
    other = store.store(FoundImage(second, "x.png", "local"))
    assert (
        other.startswith("x-")
        and other.endswith(".png")
        and (tmp_path / "out" / other).read_bytes() == second.read_bytes()
    )
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    with pytest.raises(ImageError, match="not a readable image"):
        store.store(FoundImage(corrupt, "corrupt.png", "local"))


class BrokenSource:
    name = "broken"

    def find(self, name, entity_type):
        raise ImageError("service down")


def test_chain_falls_back_and_counts_errors(tmp_path):
    write_png(tmp_path / "idx" / "Paris.png", (1, 2, 3))
    chain = ImageChain([BrokenSource(), LocalImageSource(ImageIndex.load(tmp_path / "idx"))])
    assert chain.find("Paris", "LOC").source == "local"
    assert chain.find("Rome", "LOC") is None
    assert chain.errors == Counter({"broken": 2})


# ---------------------------------------------------------------- wikipedia


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (5, 5), (9, 9, 9)).save(buffer, format="PNG")
    return buffer.getvalue()


class FakeWikipedia:
    """A local HTTP server answering like the MediaWiki pageimages API."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.user_agents: set[str] = set()
        self.rate_limited_once: set[str] = set()
        self.broken = True
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(
                self, status: int, body: bytes, content_type: str = "application/json", headers: dict | None = None
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                url = urlparse(self.path)
                outer.user_agents.add(self.headers.get("User-Agent", ""))
                if url.path.startswith("/thumb/"):
                    outer.hits[url.path] += 1
                    self.send(200, png_bytes(), "image/png")
                    return
                title = parse_qs(url.query)["titles"][0]
                outer.hits[title] += 1
                if title == "Broken" and outer.broken:
                    self.send(200, b"{not json")
                elif title == "Always Down":
                    self.send(503, b"busy")
                elif title == "Paris" and title not in outer.rate_limited_once:
                    outer.rate_limited_once.add(title)
                    self.send(429, b"slow down", headers={"Retry-After": "0"})
                elif title in ("Barack Obama", "Paris", "Broken"):
                    file = title.replace(" ", "_")
                    page = {
                        "title": title,
                        "thumbnail": {"source": f"{outer.base}/thumb/500px-{file}.png", "width": 500, "height": 500},
                    }
                    self.send(200, json.dumps({"query": {"pages": [page]}}).encode())
                elif title == "Mercury":
                    page = {
                        "title": title,
                        "pageprops": {"disambiguation": ""},
                        "thumbnail": {"source": f"{outer.base}/thumb/x.png"},
                    }
                    self.send(200, json.dumps({"query": {"pages": [page]}}).encode())
                else:
                    self.send(200, json.dumps({"query": {"pages": [{"title": title, "missing": True}]}}).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def wikipedia():
    server = FakeWikipedia()
    yield server
    server.close()


def source(server: FakeWikipedia, cache: Path) -> WikipediaImageSource:
    return WikipediaImageSource(
        cache,
        api_url=f"{server.base}/w/api.php",
        user_agent="mmsafe-tests/1.0 (test@example.org)",
        min_interval_s=0.0,
        max_retries=2,
        backoff_s=0.01,
    )


def test_wikipedia_found_not_found_rate_limited_and_malformed(wikipedia, tmp_path):
    wiki = source(wikipedia, tmp_path / "cache")
    found = wiki.find("Barack Obama", "PER")
    assert (
        found.file_name == "500px-Barack_Obama.png" and found.source == "wikipedia" and found.detail == "Barack Obama"
    )
    assert found.path.read_bytes() == png_bytes()
    assert wiki.find("Nowhere Land", "LOC") is None
    assert wiki.find("Mercury", "MISC") is None  # a disambiguation page
    assert wiki.find("Paris", "LOC").file_name == "500px-Paris.png"
    assert wikipedia.hits["Paris"] == 2  # 429, then success
    with pytest.raises(ImageError, match="malformed answer"):
        wiki.find("Broken", "MISC")
    with pytest.raises(ImageError, match=r"HTTP 503 .* after 3 attempts"):
        wiki.find("Always Down", "MISC")
    assert wikipedia.hits["Always Down"] == 3
    assert wikipedia.user_agents == {"mmsafe-tests/1.0 (test@example.org)"}
    assert wiki.requests_sent == sum(wikipedia.hits.values())


def test_wikipedia_rerun_hits_the_cache(wikipedia, tmp_path):
    names = ["Barack Obama", "Nowhere Land", "Paris"]
    first = source(wikipedia, tmp_path / "cache")
    results = [first.find(name, "PER") for name in names]
    hits = sum(wikipedia.hits.values())
    assert hits == 6  # Obama: page + image; Nowhere: page; Paris: 429, page, image

    again = source(wikipedia, tmp_path / "cache")
    assert [again.find(name, "PER") for name in names] == results
    assert sum(wikipedia.hits.values()) == hits and again.requests_sent == 0
    # A failure is not cached: the next run asks again.
    for _ in range(2):
        with pytest.raises(ImageError):
            again.find("Broken", "MISC")
    assert wikipedia.hits["Broken"] == 2


def test_wikipedia_is_polite_between_requests(wikipedia, tmp_path):
    import time

    wiki = WikipediaImageSource(tmp_path / "cache", api_url=f"{wikipedia.base}/w/api.php", min_interval_s=0.2)
    start = time.monotonic()
    wiki.find("Nowhere 1", "LOC")
    wiki.find("Nowhere 2", "LOC")
    assert time.monotonic() - start >= 0.2
    with pytest.raises(ConfigError, match="User-Agent"):
        WikipediaImageSource(tmp_path / "cache", user_agent=" ")


def test_build_data_with_wikipedia_fallback(wikipedia, tmp_path):
    from mmsafe.config import from_dict
    from mmsafe.synthesis import BuildConfig, build_data, make_stages
    from mmsafe.synthesis.entities import LLMRecognizer
    from tests.synthesis.build_fixtures import hh_line

    write_png(tmp_path / "index" / "LOC" / "Paris.png", (1, 1, 1))
    source_file = tmp_path / "in.jsonl"
    source_file.write_text(
        hh_line(["Is Paris nicer than Rome, Barack Obama?"], "Both are nice.", "Rome is a dump.") + "\n",
        encoding="utf-8",
    )
    wikipedia_options = {"api_url": f"{wikipedia.base}/w/api.php", "min_interval_s": 0.0, "backoff_s": 0.01}
    config = from_dict(
        BuildConfig,
        {
            "input": str(source_file),
            "out": str(tmp_path / "out"),
            "images": {
                "index": str(tmp_path / "index"),
                "sources": ["local", "wikipedia"],
                "wikipedia": wikipedia_options,
            },
        },
    )
    stages = make_stages(config)
    # Entities the local index lacks come from a (fake) llm recognizer.
    stages.recognizer = LLMRecognizer(
        lambda prompt: (
            '[{"text": "Paris", "type": "LOC"}, {"text": "Barack Obama", "type": "PER"}, {"text": "Rome", "type": "LOC"}]'
        )
    )
    summary = build_data(config, stages=stages)
    rows = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert [(row["meta"]["entity"], row["meta"]["image_source"], row["image"]) for row in rows] == [
        ("Paris", "local", "images/Paris.png"),
        ("Barack Obama", "wikipedia", "images/500px-Barack_Obama.png"),
    ]
    assert summary.entities_without_image == 1  # Rome: the fake API has no such page
    assert wikipedia.hits["Paris"] == 0  # found locally first
    assert (tmp_path / "out" / "cache" / "wikipedia" / "pages").is_dir()


def test_build_data_retries_dialogues_whose_image_lookup_failed(wikipedia, tmp_path):
    from mmsafe.config import from_dict
    from mmsafe.synthesis import BuildConfig, Stages, build_data
    from mmsafe.synthesis.entities import LLMRecognizer
    from mmsafe.synthesis.pipeline import IMAGE_SOURCES
    from mmsafe.synthesis.rewrite import TemplateRewriter
    from tests.synthesis.build_fixtures import hh_line

    source_file = tmp_path / "in.jsonl"
    source_file.write_text(hh_line(["Is Broken worse than Barack Obama?"], "No.", "Yes.") + "\n", encoding="utf-8")
    wikipedia_options = {
        "api_url": f"{wikipedia.base}/w/api.php",
        "min_interval_s": 0.0,
        "backoff_s": 0.01,
        "max_retries": 0,
    }
    config = from_dict(
        BuildConfig,
        {
            "input": str(source_file),
            "out": str(tmp_path / "out"),
            "images": {"sources": ["wikipedia"], "wikipedia": wikipedia_options},
        },
    )

    def run():
        recognizer = LLMRecognizer(
            lambda prompt: '[{"text": "Broken", "type": "MISC"}, {"text": "Barack Obama", "type": "PER"}]'
        )
        images = ImageChain([IMAGE_SOURCES["wikipedia"](config, None, tmp_path / "out")])
        return build_data(config, stages=Stages(recognizer, images, TemplateRewriter()))

    first = run()  # "Broken" gets a malformed answer: the dialogue stays open
    assert (first.records, first.dialogues_done, first.dialogues_left_to_retry) == (1, 0, 1)
    assert first.image_source_errors == {"wikipedia": 1}
    wikipedia.broken = False
    second = run()
    rows = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert sorted(row["meta"]["entity"] for row in rows) == ["Barack Obama", "Broken"]
    assert (second.records_written, second.dialogues_done, second.dialogues_left_to_retry, second.duplicates) == (
        1,
        1,
        0,
        0,
    )
