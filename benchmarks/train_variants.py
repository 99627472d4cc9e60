"""The compared implementations of a preference training step (A, B, C, D, G, P) and the check that they agree.

Each contender is built on the same starting model and workload and runs optimizer
steps through its trainer's own ``training_step``: ``PreferenceTrainer`` for mmsafe's
paths (A, B, G, P) and the release's form (C), TRL's ``DPOTrainer`` for D.
:func:`check_losses` compares their step-0 losses on a policy moved away from the
reference.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

from benchmarks.train_models import Setup, perturb
from benchmarks.train_workload import Workload, move, scratch_dir

CONTENDERS = {
    "A": "mmsafe BPO, shared prefix, cached reference",
    "B": "mmsafe BPO, shared prefix, online reference",
    "C": "release form: K DPO rows, each sequence alone, online reference",
    "D": "TRL DPOTrainer, K DPO rows, online reference",
    "G": "mmsafe BPO, general path (prompt once, responses against its key/value cache), cached reference",
    "P": "mmsafe BPO, per-response rows (the fallback path), cached reference",
}
#: The contenders run on the Qwen2.5-VL-shaped model (packed rows are not exact for M-RoPE;
#: TRL has no Qwen-VL-specific path to compare).
QWEN_CONTENDERS = ("G", "P", "C")
#: The scoring path of each mmsafe contender.
FORWARD_MODES = {"A": "shared-prefix", "B": "shared-prefix", "C": "separate", "G": "prompt-cache", "P": "per-response"}
BETA = 0.1
LEARNING_RATE = 1e-6
#: Relative tolerance of the loss agreement checks.
LOSS_TOLERANCE = 1e-4


def _train_config(setup: Setup, output_dir: str, *, forward_mode: str, reference: str):
    from mmsafe.train.config import TrainConfig

    return TrainConfig(
        model="benchmark",
        data="benchmark",
        output_dir=output_dir,
        loss="bpo",
        beta=BETA,
        forward_mode=forward_mode,
        reference=reference,
        learning_rate=LEARNING_RATE,
        per_device_train_batch_size=setup.batch_size,
        report_to=[],
    )


def _adamw(model: Any):
    import torch

    return torch.optim.AdamW(
        [parameter for parameter in model.parameters() if parameter.requires_grad], lr=LEARNING_RATE
    )


@dataclass
class Contender:
    """One contender, ready to run optimizer steps on its prepared batch."""

    key: str
    trainer: Any
    model: Any
    batch: dict[str, Any]
    optimizer: Any
    examples: int
    losses: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Set by Trainer.train() for its loop; one micro-batch per optimizer step here.
        self.trainer.current_gradient_accumulation_steps = 1

    def step(self) -> float:
        loss = self.trainer.training_step(self.model, dict(self.batch))  # it pops keys from the dict it gets
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(float(loss))
        return float(self.examples)


def make_mmsafe(key: str, policy: Any, workload: Workload, setup: Setup) -> Contender:
    """A, B or C on ``policy`` (which it takes over and trains)."""
    from mmsafe.train.data import PreferenceCollator
    from mmsafe.train.hf_trainer import PreferenceTrainer
    from mmsafe.train.model_setup import set_trainable
    from mmsafe.train.reference import FrozenCopyReference

    forward_mode = FORWARD_MODES[key]
    reference_mode = "copy" if key in ("B", "C") else "precomputed"
    output_dir = scratch_dir(f"{key}-")
    config = _train_config(setup, output_dir, forward_mode=forward_mode, reference=reference_mode)
    policy = set_trainable(policy, config)
    collator = PreferenceCollator(workload.pad_token_id, workload.sources, mode=forward_mode, encoder=workload.encoder)
    items = workload.items
    reference = None
    if reference_mode == "precomputed":
        # As `mmsafe train` does: the starting weights score every example once, before
        # training, and the log-probs travel in the batch.
        examples = [replace(item["example"]) for item in items]  # copies: B and C must not see the cache
        scoring = collator
        logps = _precompute(policy, items, examples, scoring, setup)
        for example in examples:
            example.reference_logps = logps[example.id]
        items = [{**item, "example": example} for item, example in zip(items, examples, strict=True)]
    else:
        reference = FrozenCopyReference(policy)
    trainer = PreferenceTrainer(
        model=policy, args=config.training_arguments(), config=config, sources=workload.sources, reference=reference
    )
    batch = move(collator(items), setup.device)
    return Contender(
        key=key, trainer=trainer, model=policy, batch=batch, optimizer=_adamw(policy), examples=workload.examples
    )


class _ItemsDataset:
    """Already-encoded dataset items, for :func:`precompute_reference`."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def _precompute(
    model: Any, items: list[dict[str, Any]], examples: list[Any], collator: Any, setup: Setup
) -> dict[str, list[float]]:
    """Reference log-probs of ``examples`` by ``model``, as ``mmsafe train`` precomputes them."""
    from mmsafe.train.reference import precompute_reference

    dataset = _ItemsDataset([{**item, "example": example} for item, example in zip(items, examples, strict=True)])
    return precompute_reference(model, dataset, collator, batch_size=setup.batch_size)


def make_trl(policy: Any, workload: Workload, setup: Setup, *, reference: Any | None = None) -> Contender:
    """D: TRL's DPOTrainer on the two-row data, with a frozen copy of ``policy`` as reference."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from mmsafe.train.model_setup import set_trainable

    output_dir = scratch_dir("D-")
    policy = set_trainable(policy, _train_config(setup, output_dir, forward_mode="separate", reference="copy"))
    if reference is None:
        reference = copy.deepcopy(
            policy
        )  # what a user passes for an in-memory model (TRL reloads from a path otherwise)
    args = DPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=len(workload.trl_rows),  # every pair of the step's examples in one batch
        learning_rate=LEARNING_RATE,
        beta=BETA,
        loss_type=["sigmoid"],
        bf16=False,  # fp32 on CPU; on GPU the weights are bf16 already, as for mmsafe
        gradient_checkpointing=False,  # as for A-C (TRL's default is on)
        activation_checkpointing=False,
        max_length=None,  # nothing is cut: the same tokens as mmsafe
        precompute_ref_log_probs=False,  # an online reference, as the release (TRL refuses it for images anyway)
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        use_cpu=setup.device == "cpu",
    )
    dataset = Dataset.from_list(workload.trl_rows)
    trainer = DPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=dataset, processing_class=workload.processor
    )
    batch = move(trainer.data_collator([dataset[index] for index in range(len(dataset))]), setup.device)
    return Contender(
        key="D",
        trainer=trainer,
        model=trainer.model,
        batch=batch,
        optimizer=_adamw(trainer.model),
        examples=workload.examples,
    )


def make_contender(key: str, policy: Any, workload: Workload, setup: Setup) -> Contender:
    return make_trl(policy, workload, setup) if key == "D" else make_mmsafe(key, policy, workload, setup)


@dataclass
class LossAgreement:
    """Per-example BPO losses of a fast contender (A or G) and C, and TRL's DPO loss against mmsafe's mean DPO term."""

    fast: str
    a_losses: list[float]
    c_losses: list[float]
    a_c_relative_difference: float
    mmsafe_mean_dpo_term: float
    trl_dpo_loss: float | None
    trl_relative_difference: float
    image_passes_per_example: dict[str, int]

    @property
    def agrees(self) -> bool:
        return self.a_c_relative_difference <= LOSS_TOLERANCE and self.trl_relative_difference <= LOSS_TOLERANCE

    def describe(self) -> str:
        text = (
            f"{self.fast} vs C per-example BPO losses {self.a_losses} vs {self.c_losses} "
            f"(max relative difference {self.a_c_relative_difference:.1e})"
        )
        if self.trl_dpo_loss is not None:
            text += f"; TRL DPO loss {self.trl_dpo_loss:.6f} vs mmsafe mean DPO term {self.mmsafe_mean_dpo_term:.6f} (relative {self.trl_relative_difference:.1e})"
        return text


def check_losses(
    model: Any, workload: Workload, setup: Setup, *, fast: str = "A", with_trl: bool = True, perturbation: float = 0.02
) -> LossAgreement:
    """Step-0 losses of ``fast`` (A or G), C and D for a policy a little away from the reference ``model``.

    ``fast``: its path's policy log-probs with reference log-probs precomputed by
    :func:`precompute_reference`; C: every sequence alone for both models; D (``with_trl``):
    TRL's own loss on the same policy and reference.
    """
    import torch

    from mmsafe.train.data import PreferenceCollator
    from mmsafe.train.forward import score_batch
    from mmsafe.train.losses import bpo_loss

    reference = model.eval()
    policy = perturb(model, scale=perturbation).eval()
    shared = PreferenceCollator(
        workload.pad_token_id, workload.sources, mode=FORWARD_MODES[fast], encoder=workload.encoder
    )
    separate_batch = move(
        PreferenceCollator(workload.pad_token_id, workload.sources, mode="separate", encoder=workload.encoder)(
            workload.items
        ),
        setup.device,
    )
    shared_batch = move(shared(workload.items), setup.device)
    examples = [item["example"] for item in workload.items]
    cached = _precompute(reference, workload.items, examples, shared, setup)
    cached_chosen = torch.tensor([cached[example.id][0] for example in examples])
    cached_rejected = torch.tensor([cached[example.id][1:] for example in examples])
    with torch.no_grad():
        policy_shared = score_batch(policy, shared_batch)
        a = bpo_loss(
            policy_shared.chosen.cpu().double(),
            policy_shared.rejected.cpu().double(),
            cached_chosen.double(),
            cached_rejected.double(),
            beta=BETA,
        )
        policy_separate = score_batch(policy, separate_batch)
        reference_separate = score_batch(reference, separate_batch)
        c = bpo_loss(
            *(
                tensor.cpu().double()
                for tensor in (
                    policy_separate.chosen,
                    policy_separate.rejected,
                    reference_separate.chosen,
                    reference_separate.rejected,
                )
            ),
            beta=BETA,
        )
    a_c = ((a.losses - c.losses).abs() / c.losses.abs()).max().item()
    pairs = sum(example.num_rejected for example in examples)
    mean_term = a.losses.sum().item() / pairs
    sequences = separate_batch["input_ids"].shape[0]
    if not with_trl:
        return LossAgreement(
            fast=fast,
            a_losses=a.losses.tolist(),
            c_losses=c.losses.tolist(),
            a_c_relative_difference=a_c,
            mmsafe_mean_dpo_term=mean_term,
            trl_dpo_loss=None,
            trl_relative_difference=0.0,
            image_passes_per_example={fast: 1, "C": sequences // len(examples)},
        )
    trl = make_trl(copy.deepcopy(policy), workload, setup, reference=copy.deepcopy(reference))
    trl.model.eval()
    with torch.no_grad():
        trl_loss = float(trl.trainer.compute_loss(trl.model, trl.batch))
    if separate_batch["pixel_values"].shape[0] != sequences:
        raise AssertionError("the separate layout does not give every sequence its own image")
    return LossAgreement(
        fast=fast,
        a_losses=a.losses.tolist(),
        c_losses=c.losses.tolist(),
        a_c_relative_difference=a_c,
        mmsafe_mean_dpo_term=mean_term,
        trl_dpo_loss=trl_loss,
        trl_relative_difference=abs(trl_loss - mean_term) / abs(mean_term),
        image_passes_per_example={
            fast: shared_batch["pixel_values"].shape[0] // len(examples),
            "C": sequences // len(examples),
            "D": trl.batch["pixel_values"].shape[0] // len(examples),
        },
    )
