"""`mmsafe generate --benchmark`: answering MM-SafetyBench straight from its folder."""

import json

from mmsafe.cli import main
from tests.evaluate.test_benchmark_loaders import write_mm_safetybench


def test_generate_reads_mm_safetybench_with_settings(tmp_path, tiny_model_dir):
    root = write_mm_safetybench(tmp_path / "mmsb")
    out = tmp_path / "responses.jsonl"
    code = main(
        ["generate", "--model", str(tiny_model_dir), "--data", str(root), "--benchmark", "mm-safetybench",
         "--benchmark-option", "settings=[TYPO, text-only]", "--out", str(out), "--max-new-tokens", "2", "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # 5 questions (3 + 2 over two scenarios) in each of the two settings asked for.
    assert len(rows) == 10
    assert {row["id"].split("/")[1] for row in rows} == {"TYPO", "text-only"}
    assert len({row["id"] for row in rows}) == 10


def test_unknown_benchmark_option_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    root = write_mm_safetybench(tmp_path / "mmsb")
    code = main(
        [
            "generate",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(root),
            "--benchmark",
            "mm-safetybench",
            "--benchmark-option",
            "colour=red",
            "--out",
            str(tmp_path / "r.jsonl"),
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "--benchmark-option" in err and "colour" in err and "Traceback" not in err
