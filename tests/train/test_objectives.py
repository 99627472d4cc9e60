"""Objectives as objects: what each needs from a run, and its loss against hand computations.

The loss oracles are written out here from the formulas (``math``, not the library):
DPO's term is -log sigmoid(beta * ((pc - rc) - (pr - rr))) = log(1 + exp(-beta * h)), and
BPO (the method's L_BPO) is, per example, the sum over its rejected responses of that term,
each weighted by its source's weight (1.0 unless set). Tolerance 1e-6 (float32 arithmetic).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from mmsafe.train import precompute, trainer
from mmsafe.train.config import TrainConfig
from mmsafe.train.forward import ResponseLogProbs
from mmsafe.train.objectives import BPOObjective, DPOObjective, SupervisedObjective
from mmsafe.train.reference import HASH_MEMO_NAME

TOLERANCE = 1e-6


def config(**options) -> TrainConfig:
    return TrainConfig(model="m", data="d.jsonl", output_dir="o", **options)


def dpo_term(beta: float, pc: float, rc: float, pr: float, rr: float) -> float:
    """-log sigmoid(beta * h), h = (pc - rc) - (pr - rr), as log(1 + exp(-beta * h))."""
    h = (pc - rc) - (pr - rr)
    return math.log1p(math.exp(-beta * h))


def test_each_objective_states_what_it_needs():
    sft = config(loss="sft", sft_target="rejected", sft_chosen_share=0.25).objective()
    assert isinstance(sft, SupervisedObjective)
    assert not sft.needs_reference and sft.max_rejected == 0 and not sft.weighs_sources
    assert sft.average_logprobs  # per-token mean, although average_logprobs is false
    assert (sft.target, sft.chosen_share) == ("rejected", 0.25)
    assert sft.metric_names(["human", "blind"]) == ["logps/chosen"]

    dpo = config(loss="dpo", beta=0.2, loss_type="ipo", average_logprobs=True).objective()
    assert isinstance(dpo, DPOObjective)
    assert dpo.needs_reference and dpo.max_rejected == 1  # one rejected source
    assert not dpo.needs_several_rejected and not dpo.weighs_sources
    assert (dpo.beta, dpo.loss_type, dpo.average_logprobs) == (0.2, "ipo", True)

    bpo = config(loss="bpo", source_weights={"blind": 0.5}).objective()
    assert isinstance(bpo, BPOObjective)
    assert bpo.needs_reference and bpo.max_rejected is None  # all K rejected responses
    assert bpo.needs_several_rejected and bpo.weighs_sources
    assert dict(bpo.source_weights) == {"blind": 0.5}
    assert "rewards/margin_blind" in bpo.metric_names(["human", "blind"])


def test_sft_loss_is_the_mean_negative_log_likelihood_and_needs_no_reference():
    policy = ResponseLogProbs(torch.tensor([-1.0, -3.0]), torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.bool))
    output = SupervisedObjective().compute(policy, None, torch.zeros(2, 0, dtype=torch.long), [])
    assert output.loss.item() == pytest.approx(2.0, abs=TOLERANCE)
    assert output.losses.tolist() == pytest.approx([1.0, 3.0], abs=TOLERANCE)
    assert output.metrics == {"logps/chosen": (-4.0, 2)}


def test_dpo_loss_equals_the_hand_computation():
    # Example 0: h = (-1 - -2) - (-3 - -2) = 2; example 1: h = (-4 - -3) - (-2.5 - -2) = -0.5.
    # The second rejected slot holds junk: DPO uses the first one only.
    pc, rc, pr, rr = [-1.0, -4.0], [-2.0, -3.0], [-3.0, -2.5], [-2.0, -2.0]
    policy = ResponseLogProbs(
        torch.tensor(pc), torch.tensor([[pr[0], 100.0], [pr[1], -100.0]]), torch.ones(2, 2, dtype=torch.bool)
    )
    reference = ResponseLogProbs(
        torch.tensor(rc), torch.tensor([[rr[0], 7.0], [rr[1], 7.0]]), torch.ones(2, 2, dtype=torch.bool)
    )
    output = DPOObjective(beta=0.5).compute(policy, reference, torch.tensor([[0, 1], [0, 1]]), ["human", "blind"])
    expected = [
        dpo_term(0.5, pc[i], rc[i], pr[i], rr[i]) for i in range(2)
    ]  # log(1 + e^-1) = 0.31326, log(1 + e^0.25) = 0.82594
    assert output.losses.tolist() == pytest.approx(expected, abs=TOLERANCE)
    assert output.loss.item() == pytest.approx(sum(expected) / 2, abs=TOLERANCE)
    # IPO's term on the same pairs: (h - 1 / (2 beta))^2 = (2 - 1)^2 and (-0.5 - 1)^2.
    ipo = DPOObjective(beta=0.5, loss_type="ipo").compute(
        policy, reference, torch.tensor([[0, 1], [0, 1]]), ["human", "blind"]
    )
    assert ipo.losses.tolist() == pytest.approx([1.0, 2.25], abs=TOLERANCE)
    assert output.metrics["rewards/margin"] == pytest.approx((0.5 * 2 + 0.5 * -0.5, 2), abs=TOLERANCE)


def test_bpo_loss_is_the_weighted_sum_over_the_rejected_responses():
    # Example 0 has a human and a blind rejected response; example 1 only a human one
    # (slot 1 masked, its values junk). Blind weighs 0.5, human 1.0 (not set).
    beta = 0.1
    pc, rc = [-10.0, -6.0], [-12.0, -5.0]
    pr, rr = [[-20.0, -9.0], [-7.0, 1e4]], [[-15.0, -11.0], [-8.0, -1e4]]
    mask = torch.tensor([[True, True], [True, False]])
    source_ids = torch.tensor([[0, 1], [0, -1]])
    policy = ResponseLogProbs(torch.tensor(pc), torch.tensor(pr), mask)
    reference = ResponseLogProbs(torch.tensor(rc), torch.tensor(rr), mask)
    weighted = BPOObjective(beta=beta, source_weights={"blind": 0.5}).compute(
        policy, reference, source_ids, ["human", "blind"]
    )
    human = [dpo_term(beta, pc[i], rc[i], pr[i][0], rr[i][0]) for i in range(2)]
    blind = dpo_term(beta, pc[0], rc[0], pr[0][1], rr[0][1])
    expected = [1.0 * human[0] + 0.5 * blind, 1.0 * human[1]]
    assert weighted.losses.tolist() == pytest.approx(expected, abs=TOLERANCE)
    assert weighted.loss.item() == pytest.approx(sum(expected) / 2, abs=TOLERANCE)
    # Equal weights (the method's L_BPO): the plain sum of the two DPO terms.
    equal = BPOObjective(beta=beta).compute(policy, reference, source_ids, ["human", "blind"])
    assert equal.losses.tolist() == pytest.approx([human[0] + blind, human[1]], abs=TOLERANCE)


def test_preference_objectives_refuse_to_run_without_reference_log_probs():
    policy = ResponseLogProbs(torch.zeros(1), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool))
    for objective in (DPOObjective(), BPOObjective()):
        with pytest.raises(ValueError, match=f"loss {objective.name} compares against reference log-probs"):
            objective.compute(policy, None, torch.zeros(1, 1, dtype=torch.long), ["human"])


@pytest.mark.parametrize(
    ("reference", "finetune"), [("precomputed", "full"), ("copy", "full"), ("adapters-disabled", "lora")]
)
def test_an_sft_run_builds_no_reference(tmp_path, tiny_model_dir, small_records, monkeypatch, reference, finetune):
    built: list[str] = []
    built_trainers: list = []

    def refuse(name):
        def build(*args, **kwargs):
            built.append(name)
            raise AssertionError(f"an sft run built a {name} reference")

        return build

    monkeypatch.setattr(trainer, "FrozenCopyReference", refuse("copy"))
    monkeypatch.setattr(trainer, "DisabledAdapterReference", refuse("adapters-disabled"))
    monkeypatch.setattr(precompute, "precompute_reference", refuse("precomputed"))

    class RecordingTrainer(trainer.PreferenceTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built_trainers.append(self)

    monkeypatch.setattr(trainer, "PreferenceTrainer", RecordingTrainer)
    values = {
        "model": str(tiny_model_dir), "data": str(small_records), "output_dir": str(tmp_path / "out"), "loss": "sft", "reference": reference,
        "finetune": finetune, "lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-3, "warmup_steps": 0, "max_steps": 1,
        "per_device_train_batch_size": 2, "save_steps": 1000, "reference_cache_dir": str(tmp_path / "cache"), "dtype": "float32",
    }  # fmt: skip
    result = trainer.train(TrainConfig(**values))
    assert built == []
    assert [instance.reference for instance in built_trainers] == [None]
    assert result.global_step == 1 and result.reference_forwards == 0 and result.reference_cache is None
    assert result.reference_padding_share is None
    cached = [path.name for path in (tmp_path / "cache").glob("*.json") if path.name != HASH_MEMO_NAME]
    assert cached == []  # nothing precomputed or cached
    summary = json.loads((Path(values["output_dir"]) / trainer.SUMMARY_FILE).read_text())
    assert summary["reference_padding_share"] is None and "batch/padding_share" in summary["metrics"]


def test_the_trainer_takes_its_objective_from_the_config_or_as_given(tiny_model_dir, tmp_path):
    from mmsafe.models import load_model

    options = TrainConfig(model=str(tiny_model_dir), data="d.jsonl", output_dir=str(tmp_path / "out"), loss="dpo")
    model = load_model(tiny_model_dir, dtype="float32").model
    default = trainer.PreferenceTrainer(
        model=model, args=options.training_arguments(), config=options, sources=["human"]
    )
    assert default.objective == DPOObjective()
    given = dataclasses.replace(DPOObjective(), beta=0.3)
    assert (
        trainer.PreferenceTrainer(
            model=model, args=options.training_arguments(), config=options, sources=["human"], objective=given
        ).objective.beta
        == 0.3
    )
