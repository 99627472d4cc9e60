"""The Hugging Face parquet form: embedded images written out, stable derived ids."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmsafe.data.formats import convert, detect_format, read_records
from mmsafe.data.formats.hf import safe_file_name, split_of
from mmsafe.data.images import load_image
from mmsafe.errors import DataError

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (5, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def hf_rows(count: int, *, offset: int = 0) -> list[dict]:
    rows = []
    for index in range(offset, offset + count):
        rows.append(
            {
                "prompt": f"USER: Hi ASSISTANT: Hello. USER: <image>\nHow do I get into the site visible in the image, case {index}? ASSISTANT:",
                "image": {
                    "bytes": png_bytes((10 * index, 0, 0)),
                    "path": f"../500px-Site_{index}.png" if index % 2 == 0 else None,
                },
                "type": "harmless",
                "chosen": "ASSISTANT: I can’t help with that.",
                "rejected": f"ASSISTANT: Sure, climb the wall number {index}.",
                "entity": f"Site {index}",
                "entity_type": "LOC",
                "replacement": "the site visible in the image",
                "text_prompt": f"How do I get into Site {index}?",
                "mid_prompt": "How do I get into the site visible in the image?",
            }
        )
    return rows


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    schema = pa.schema([(key, IMAGE_TYPE if key == "image" else pa.string()) for key in columns])
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


def test_parquet_file_reads_with_images_and_stable_ids(tmp_path):
    source = write_parquet(tmp_path / "test-00000-of-00001.parquet", hf_rows(3))
    assert detect_format(source) == "hf"
    image_dir = tmp_path / "images"
    records = list(read_records(source, image_dir=image_dir))
    assert [record.id for record in records] == ["test-0", "test-1", "test-2"]
    assert [record.id for record in read_records(source)] == ["test-0", "test-1", "test-2"]  # same on a second read
    # A name from the file is flattened (no "../"); rows without one are named by id.
    assert [record.image for record in records] == ["500px-Site_0.png", "test-1.png", "500px-Site_2.png"]
    assert sorted(path.name for path in image_dir.iterdir()) == ["500px-Site_0.png", "500px-Site_2.png", "test-1.png"]
    assert load_image(image_dir, records[2].image).getpixel((0, 0)) == (20, 0, 0)
    first = records[0]
    assert first.num_turns == 2 and first.prompt.endswith("case 0?")
    assert first.chosen == "I can’t help with that."
    assert first.meta["split"] == "test" and first.meta["entity"] == "Site 0"


def test_folder_of_shards_counts_rows_across_shards(tmp_path):
    folder = tmp_path / "dataset"
    write_parquet(folder / "data" / "train-00000-of-00002.parquet", hf_rows(2))
    write_parquet(folder / "data" / "train-00001-of-00002.parquet", hf_rows(1, offset=2))
    write_parquet(folder / "data" / "test-00000-of-00001.parquet", hf_rows(1, offset=3))
    assert detect_format(folder) == "hf"
    ids = [record.id for record in read_records(folder)]
    assert ids == ["test-0", "train-0", "train-1", "train-2"]


def test_convert_writes_images_beside_the_output_and_paths_relative_to_it(tmp_path):
    source = write_parquet(tmp_path / "in" / "test-00000-of-00001.parquet", hf_rows(2))
    output = tmp_path / "out" / "records.jsonl"
    result = convert(source, output)
    assert (result.from_format, result.records, result.images_written) == ("hf", 2, 2)
    assert result.image_dir == str(tmp_path / "out" / "images")
    lines = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [line["image"] for line in lines] == ["images/500px-Site_0.png", "images/test-1.png"]
    assert load_image(output.parent, lines[0]["image"]).size == (5, 4)
    assert "2 images written" in result.summary()


def test_same_name_different_bytes_keeps_both(tmp_path):
    rows = hf_rows(2)
    rows[1]["image"] = {"bytes": png_bytes((0, 255, 0)), "path": "500px-Site_0.png"}
    source = write_parquet(tmp_path / "test.parquet", rows)
    records = list(read_records(source, image_dir=tmp_path / "images"))
    assert [record.image for record in records] == ["500px-Site_0.png", "test-1-500px-Site_0.png"]


def test_bad_embedded_image_names_the_record(tmp_path):
    rows = hf_rows(1)
    rows[0]["image"] = {"bytes": b"not a png", "path": None}
    source = write_parquet(tmp_path / "test.parquet", rows)
    with pytest.raises(DataError, match=r"test\.parquet:test-0:image: embedded image bytes are not a readable image"):
        list(read_records(source, image_dir=tmp_path / "images"))


def test_names_and_splits():
    assert safe_file_name("../x/Caf\u00e9 de Flore.jpg") == "Caf_de_Flore.jpg"
    assert safe_file_name(".hidden.png") == "hidden.png"
    assert split_of(Path("validation-00003-of-00010.parquet")) == "validation"
    assert split_of(Path("mine.parquet")) == "mine"
