"""Benchmark: dialogues per second through the offline build-data stages.

    python -m benchmarks.build_data [--quick] [--json PATH]

Contenders, run alternately by the shared harness on one synthetic HH-RLHF file:

- ``parse+gazetteer+template``: read and parse the file, find entities with the
  gazetteer (first-word index), rewrite each entity with the template (no I/O out);
- ``parse+regex+template``: the same with the matcher a user would write first, one big
  regular-expression alternation of all names (longest first, word boundaries);
- ``build_data (local images)``: the whole command into a fresh folder: also images
  copied and opened, records written and flushed, state and summary.

The requirement is at least 2,000 dialogues per second for parse + gazetteer + template.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import base_parser, format_table, run_alternating, write_results
from mmsafe.config import from_dict
from mmsafe.synthesis import BuildConfig, build_data
from mmsafe.synthesis.entities import Gazetteer, Mention
from mmsafe.synthesis.pipeline import group_mentions
from mmsafe.synthesis.rewrite import TemplateRewriter
from mmsafe.synthesis.sources import read_dialogues

REQUIRED_RATE = 2000.0
FIRST = [
    "Anna",
    "Boris",
    "Chen",
    "Dana",
    "Emil",
    "Fatima",
    "Georg",
    "Hana",
    "Ivan",
    "Jana",
    "Kofi",
    "Lena",
    "Mateo",
    "Nora",
    "Omar",
    "Priya",
]
LAST = [
    "Adams",
    "Berg",
    "Cruz",
    "Dorsey",
    "Eklund",
    "Fischer",
    "Garcia",
    "Horvat",
    "Ito",
    "Jensen",
    "Kowalski",
    "Lopez",
    "Meyer",
    "Novak",
    "Okafor",
    "Petrov",
]
PLACES = ["Port", "Lake", "Mount", "Saint", "New", "Old", "North", "South"]
WORDS = [
    "what",
    "do",
    "you",
    "think",
    "about",
    "the",
    "people",
    "who",
    "live",
    "near",
    "my",
    "house",
    "and",
    "why",
    "they",
    "always",
    "say",
    "bad",
    "things",
    "online",
]


def synthetic_names(count: int, rng: random.Random) -> list[tuple[str, str]]:
    """``count`` distinct (name, type): people, places and organisations (6,000 at most)."""
    if count > 6000:
        raise ValueError(f"at most 6,000 synthetic names, asked for {count}")
    names: dict[str, str] = {}
    while len(names) < count:
        kind = rng.choice(("PER", "LOC", "ORG"))
        if kind == "PER":
            name = f"{rng.choice(FIRST)} {rng.choice('ABCDEFGHIJKLMNOPRSTUVW')}. {rng.choice(LAST)}"
        elif kind == "LOC":
            name = f"{rng.choice(PLACES)} {rng.choice(LAST)}{rng.choice(['ville', 'burg', 'ton'])}"
        else:
            name = f"{rng.choice(LAST)} {rng.choice(['Motors', 'Bank', 'Foods', 'Labs'])}"
        names.setdefault(name, kind)
    return list(names.items())


def write_dataset(folder: Path, dialogues: int, names: list[tuple[str, str]], rng: random.Random) -> Path:
    """HH-RLHF lines with 1-5 turns; the last instruction names 0-2 entities."""
    path = folder / "train.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(dialogues):
            turns = []
            for _ in range(rng.choice((0, 0, 0, 1, 1, 2, 3, 4))):
                turns += [
                    " ".join(rng.choices(WORDS, k=12)).capitalize() + "?",
                    " ".join(rng.choices(WORDS, k=20)).capitalize() + ".",
                ]
            words = rng.choices(WORDS, k=rng.randint(8, 30))
            for _ in range(rng.choice((0, 1, 1, 2))):
                words.insert(rng.randrange(len(words) + 1), rng.choice(names)[0])
            turns.append(" ".join(words).capitalize() + "?")
            history = "".join(
                f"\n\n{'Human' if index % 2 == 0 else 'Assistant'}: {text}" for index, text in enumerate(turns)
            )
            line = {
                "chosen": history + "\n\nAssistant: I can't help with that.",
                "rejected": history + "\n\nAssistant: Sure, here is how.",
            }
            handle.write(json.dumps(line) + "\n")
    return path


def write_index(folder: Path, names: list[tuple[str, str]]) -> Path:
    """A CSV index where every entity shares one small PNG (so the copy cost stays tiny)."""
    from PIL import Image

    Image.new("RGB", (8, 8), (120, 30, 30)).save(folder / "shared.png")
    index = folder / "index.csv"
    rows = ["entity,image,type"] + [f"{name},shared.png,{kind}" for name, kind in names]
    index.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return index


class RegexMatcher:
    """The obvious alternative: one alternation of every name, longest first."""

    name = "regex"

    def __init__(self, entries: list[tuple[str, str]]) -> None:
        self.types = dict(entries)
        ordered = sorted(self.types, key=len, reverse=True)
        self.pattern = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(name) for name in ordered) + r")(?!\w)")

    def recognize(self, texts):
        return [
            [
                Mention(m.group(), self.types[m.group()], m.start(), m.end(), m.group())
                for m in self.pattern.finditer(text)
            ]
            for text in texts
        ]


def offline_stages(path: Path, recognizer, template: TemplateRewriter, batch: int = 64) -> float:
    """Parse + entities + template over the whole file; returns dialogues processed."""
    done = 0
    pending = []

    def flush() -> None:
        for dialogue, mentions in zip(pending, recognizer.recognize([d.instruction for d in pending]), strict=True):
            for group in group_mentions(mentions, ("PER", "ORG", "LOC", "MISC")):
                template.rewrite(dialogue.instruction, group.name, group.type, group.spans)

    for item in read_dialogues(path, "hh-rlhf"):
        done += 1
        pending.append(item)
        if len(pending) == batch:
            flush()
            pending = []
    flush()
    return float(done)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--dialogues", type=int, help="dialogues in the synthetic file (default 20,000; quick 4,000)")
    parser.add_argument(
        "--names", type=int, default=2000, help="entity names in the gazetteer / image index (default 2,000)"
    )
    args = parser.parse_args(argv)
    dialogues = args.dialogues or (4000 if args.quick else 20000)
    repetitions = args.repetitions or 5
    rng = random.Random(0)
    workdir = Path(tempfile.mkdtemp(prefix="mmsafe-bench-build-"))
    try:
        names = synthetic_names(args.names, rng)
        data = write_dataset(workdir, dialogues, names, rng)
        index = write_index(workdir, names)
        gazetteer, regex, template = Gazetteer(names), RegexMatcher(names), TemplateRewriter()
        runs = {"n": 0}

        def end_to_end() -> float:
            runs["n"] += 1
            out = workdir / f"out-{runs['n']}"
            config = from_dict(BuildConfig, {"input": str(data), "out": str(out), "images": {"index": str(index)}})
            summary = build_data(config)
            shutil.rmtree(out)
            return float(summary.dialogues_done)

        contenders = {
            "parse+gazetteer+template": lambda: offline_stages(data, gazetteer, template),
            "parse+regex+template": lambda: offline_stages(data, regex, template),
            "build_data (local images)": end_to_end,
        }
        results = run_alternating(contenders, repetitions=repetitions, warmup=1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = [measurement.summary("dialogues") for measurement in results.values()]
    print(
        f"{dialogues} synthetic HH-RLHF dialogues, {args.names} names, {repetitions} repetitions after 1 warm-up round"
    )
    print(
        format_table(
            rows,
            ["name", "dialogues_per_s", "dialogues_per_s_min", "dialogues_per_s_max", "median_seconds", "repetitions"],
        )
    )
    rate = rows[0]["dialogues_per_s"]
    verdict = "meets" if rate >= REQUIRED_RATE else "FAILS"
    print(f"parse+gazetteer+template: {rate:,.0f} dialogues/s, {verdict} the required {REQUIRED_RATE:,.0f}/s")
    write_results(
        args.json,
        {
            "benchmark": "build_data",
            "command": " ".join(["python -m benchmarks.build_data", *sys.argv[1:]]),
            "dialogues": dialogues,
            "names": args.names,
            "required_per_s": REQUIRED_RATE,
            "results": rows,
        },
    )
    return 0 if rate >= REQUIRED_RATE else 1


if __name__ == "__main__":
    raise SystemExit(main())
