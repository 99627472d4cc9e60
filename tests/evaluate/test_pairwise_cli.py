import json

from mmsafe.cli import main
from mmsafe.data.sample import write_sample


def test_pairwise_cli_reports_both_forms_on_the_tiny_model(tmp_path, tiny_model_dir, capsys):
    data = write_sample(tmp_path / "data")
    records = [json.loads(line) for line in data.read_text().splitlines()][:6]
    small = tmp_path / "data" / "six.jsonl"
    small.write_text("".join(json.dumps(record) + "\n" for record in records))
    code = main(
        [
            "pairwise",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(small),
            "--out",
            str(tmp_path / "pw"),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "pw" / "pairwise.json").read_text())
    asked = result["asked"]
    assert asked["correct"] + asked["wrong"] + asked["unparseable"] == 6
    # A random model rarely answers a bare A or B: what it says is counted, never guessed.
    assert asked["accuracy"]["total"] == 6
    likelihood = result["likelihood"]
    assert likelihood["total"] == 6
    assert 0 <= likelihood["wins"] <= 6
    assert set(result["likelihood_by_source"]) == {"human"}
    answers = (tmp_path / "pw" / "pairwise_answers.jsonl").read_text().splitlines()
    assert len(answers) == 6
    assert "likelihood (all pairs)" in capsys.readouterr().out


def test_pairwise_cli_rejects_an_unknown_form(tmp_path, tiny_model_dir, capsys):
    data = write_sample(tmp_path / "data")
    code = main(
        [
            "pairwise",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "pw"),
            "--forms",
            "guess",
        ]
    )
    assert code == 1
    assert "forms: expected asked and/or likelihood" in capsys.readouterr().err
