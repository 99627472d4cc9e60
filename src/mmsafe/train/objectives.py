"""Training objectives: what each needs from a run, and its loss from the scored log-probs.

A closed set, as explicit code (``loss:`` in the config names one):

* :class:`SupervisedObjective` (``sft``): the negative log-likelihood of one response per
  example (the chosen one, or the first rejected one for a deliberately unsafe start).
  No reference model, no rejected response trained against.
* :class:`DPOObjective` (``dpo``): the chosen response against the first rejected one.
* :class:`BPOObjective` (``bpo``): the chosen response against each of its K rejected ones
  (the human one and the blind one), the K terms summed with per-source weights.

DPO and BPO take their pair term from ``loss_type`` (sigmoid, or ipo; see
:mod:`mmsafe.train.losses`): IPO is a pair term both use, not an objective of its own.

The trainer asks the objective what to build (``needs_reference``, ``max_rejected``), which
responses to keep, and, for each batch, the loss and the metrics to log
(:meth:`compute`); it never branches on the objective's name.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from mmsafe.train.forward import ResponseLogProbs
from mmsafe.train.losses import PreferenceLoss, bpo_loss, dpo_loss, sft_loss

Metrics = dict[str, tuple[float, float]]
"""Running-log contributions: metric name -> (sum, count), averaged at the next log."""


@dataclass
class ObjectiveOutput:
    """One batch's loss and what is logged of it.

    ``loss``: scalar, what is minimised; ``losses``: [B], one value per example;
    ``metrics``: (sum, count) per metric name; ``outputs``: the tensors ``compute_loss``
    returns beside the loss (``return_outputs``); ``preference``: the rewards behind a
    preference loss (None for a supervised one).
    """

    loss: torch.Tensor
    losses: torch.Tensor
    metrics: Metrics = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    preference: PreferenceLoss | None = None


class Objective(Protocol):
    """What the trainer needs to know of an objective."""

    #: The config's name for it (``loss:``).
    name: ClassVar[str]
    #: Whether the loss compares against reference log-probs (a reference is built only then).
    needs_reference: ClassVar[bool]
    #: Rejected responses kept per example: 0 (none), 1, or None (all).
    max_rejected: ClassVar[int | None]
    #: Whether a run with no example of more than one rejected response is this objective
    #: in name only (BPO with K = 1 is DPO).
    needs_several_rejected: ClassVar[bool]
    #: Whether per-source weights (``source_weights``) change the loss.
    weighs_sources: ClassVar[bool]

    @property
    def average_logprobs(self) -> bool:
        """Score responses by the mean (True) or the sum (False) of their token log-probs."""
        ...

    def training_records(self, records: Sequence[Any]) -> list[Any]:
        """The records as this objective trains on them."""
        ...

    def metric_names(self, sources: Sequence[str]) -> list[str]:
        """Every metric :meth:`compute` may log, for rejected responses from ``sources``."""
        ...

    def compute(
        self,
        policy: ResponseLogProbs,
        reference: ResponseLogProbs | None,
        source_ids: torch.Tensor,
        sources: Sequence[str],
    ) -> ObjectiveOutput:
        """The loss of one batch: ``policy`` (and ``reference``) log-probs, ``source_ids`` [B, K] (-1: no response)."""
        ...


def keeps_chosen(record_id: str, share: float) -> bool:
    """Whether a record is among the ``share`` that keep their chosen response (a fixed hash of the id)."""
    digest = hashlib.sha256(record_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


@dataclass(frozen=True)
class SupervisedObjective:
    """``sft``: the per-token mean negative log-likelihood of one response per example.

    ``target`` rejected imitates the first rejected response instead, except for the
    ``chosen_share`` of the records (picked by a hash of the id) that keep their chosen one.
    """

    name: ClassVar[str] = "sft"
    needs_reference: ClassVar[bool] = False
    max_rejected: ClassVar[int | None] = 0
    needs_several_rejected: ClassVar[bool] = False
    weighs_sources: ClassVar[bool] = False

    target: str = "chosen"
    chosen_share: float = 0.0

    @classmethod
    def from_config(cls, config: Any) -> SupervisedObjective:
        return cls(target=config.sft_target, chosen_share=config.sft_chosen_share)

    @property
    def average_logprobs(self) -> bool:
        return True  # token cross-entropy averaged per sequence, whatever average_logprobs says

    def training_records(self, records: Sequence[Any]) -> list[Any]:
        if self.target == "chosen":
            return list(records)
        return [
            record
            if keeps_chosen(record.id, self.chosen_share)
            else dataclasses.replace(record, chosen=record.rejected[0])
            for record in records
        ]

    def metric_names(self, sources: Sequence[str]) -> list[str]:
        return ["logps/chosen"]

    def compute(
        self,
        policy: ResponseLogProbs,
        reference: ResponseLogProbs | None,
        source_ids: torch.Tensor,
        sources: Sequence[str],
    ) -> ObjectiveOutput:
        chosen = policy.chosen
        return ObjectiveOutput(
            loss=sft_loss(chosen),
            losses=-chosen,
            metrics={"logps/chosen": (chosen.detach().sum().item(), chosen.numel())},
        )


@dataclass(frozen=True)
class _PairTerm:
    """What DPO and BPO share: the pair term and the log-prob form."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"
    average: bool = False

    @classmethod
    def from_config(cls, config: Any) -> Any:
        return cls(**_pair_settings(config))

    @property
    def average_logprobs(self) -> bool:
        return self.average

    def training_records(self, records: Sequence[Any]) -> list[Any]:
        return list(records)

    def metric_names(self, sources: Sequence[str]) -> list[str]:
        names = ["logps/chosen", "rewards/chosen", "rewards/accuracy", "rewards/margin"]
        for source in sources:
            names += [
                f"logps/rejected_{source}",
                f"rewards/rejected_{source}",
                f"rewards/margin_{source}",
                f"rewards/accuracy_{source}",
            ]
        return names

    def _output(
        self, policy: ResponseLogProbs, result: PreferenceLoss, source_ids: torch.Tensor, sources: Sequence[str]
    ) -> ObjectiveOutput:
        return ObjectiveOutput(
            loss=result.loss,
            losses=result.losses,
            metrics=preference_metrics(policy, result, source_ids, sources),
            outputs={"chosen_rewards": result.chosen_rewards},
            preference=result,
        )


def _pair_settings(config: Any) -> dict[str, Any]:
    return {
        "beta": config.beta,
        "label_smoothing": config.label_smoothing,
        "loss_type": config.loss_type,
        "average": config.average_logprobs,
    }


def _needs(reference: ResponseLogProbs | None, name: str) -> ResponseLogProbs:
    if reference is None:
        raise ValueError(f"loss {name} compares against reference log-probs; none were given")
    return reference


@dataclass(frozen=True)
class DPOObjective(_PairTerm):
    """``dpo``: the chosen response against the first rejected one (:func:`mmsafe.train.losses.dpo_loss`)."""

    name: ClassVar[str] = "dpo"
    needs_reference: ClassVar[bool] = True
    max_rejected: ClassVar[int | None] = 1
    needs_several_rejected: ClassVar[bool] = False
    weighs_sources: ClassVar[bool] = False

    def compute(
        self,
        policy: ResponseLogProbs,
        reference: ResponseLogProbs | None,
        source_ids: torch.Tensor,
        sources: Sequence[str],
    ) -> ObjectiveOutput:
        reference = _needs(reference, self.name)
        result = dpo_loss(
            policy.chosen, policy.rejected[:, 0], reference.chosen, reference.rejected[:, 0],
            beta=self.beta, label_smoothing=self.label_smoothing, loss_type=self.loss_type,  # type: ignore[arg-type]
        )  # fmt: skip
        return self._output(policy, result, source_ids, sources)


@dataclass(frozen=True)
class BPOObjective(_PairTerm):
    """``bpo``: per example, the sum over its K rejected responses of ``weight(source) x DPO term``
    (:func:`mmsafe.train.losses.bpo_loss`); a source missing from ``source_weights`` weighs 1.0."""

    name: ClassVar[str] = "bpo"
    needs_reference: ClassVar[bool] = True
    max_rejected: ClassVar[int | None] = None
    needs_several_rejected: ClassVar[bool] = True
    weighs_sources: ClassVar[bool] = True

    source_weights: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Any) -> BPOObjective:
        return cls(**_pair_settings(config), source_weights=dict(config.source_weights))

    def slot_weights(self, source_ids: torch.Tensor, sources: Sequence[str]) -> torch.Tensor:
        """[B, K] weights of the rejected slots: each slot's source weight (unused slots: anything, masked out)."""
        # The last entry is for a source outside ``sources`` (the collator gives it id len(sources)).
        table = torch.tensor([self.source_weights.get(source, 1.0) for source in sources] + [1.0])
        return table.to(source_ids.device)[source_ids.clamp(min=0)]

    def compute(
        self,
        policy: ResponseLogProbs,
        reference: ResponseLogProbs | None,
        source_ids: torch.Tensor,
        sources: Sequence[str],
    ) -> ObjectiveOutput:
        reference = _needs(reference, self.name)
        result = bpo_loss(
            policy.chosen, policy.rejected, reference.chosen, reference.rejected, beta=self.beta, weights=self.slot_weights(source_ids, sources),
            label_smoothing=self.label_smoothing, loss_type=self.loss_type, rejected_mask=policy.rejected_mask,  # type: ignore[arg-type]
        )  # fmt: skip
        return self._output(policy, result, source_ids, sources)


@torch.no_grad()
def preference_metrics(
    policy: ResponseLogProbs, result: PreferenceLoss, source_ids: torch.Tensor, sources: Sequence[str]
) -> Metrics:
    """Log-probs, rewards, margins and accuracies, overall and per rejected source (human, blind, ...)."""

    def columns(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if tensor.dim() == 2 else tensor.unsqueeze(1)  # DPO gives [B], BPO [B, K]

    margins, rejected_rewards, mask = (
        columns(result.margins),
        columns(result.rejected_rewards),
        columns(result.rejected_mask),
    )
    width = margins.shape[1]  # DPO uses only the first rejected slot
    source_ids = source_ids[:, :width]
    rejected_logps = policy.rejected[:, :width]
    values: Metrics = {}
    values["logps/chosen"] = (policy.chosen.sum().item(), policy.chosen.numel())
    values["rewards/chosen"] = (result.chosen_rewards.sum().item(), result.chosen_rewards.numel())
    values["rewards/accuracy"] = ((margins > 0)[mask].float().sum().item(), mask.sum().item())
    values["rewards/margin"] = (margins[mask].sum().item(), mask.sum().item())
    for index, source in enumerate(sources):
        selected = mask & (source_ids == index)
        count = selected.sum().item()
        values[f"logps/rejected_{source}"] = (rejected_logps[selected].sum().item(), count)
        values[f"rewards/rejected_{source}"] = (rejected_rewards[selected].sum().item(), count)
        values[f"rewards/margin_{source}"] = (margins[selected].sum().item(), count)
        values[f"rewards/accuracy_{source}"] = ((margins[selected] > 0).float().sum().item(), count)
    return values


class ObjectiveClass(Protocol):
    """An objective's class: it builds the objective from the training config."""

    def from_config(self, config: Any) -> Objective: ...


#: The objective each ``loss:`` name stands for.
OBJECTIVES: dict[str, ObjectiveClass] = {"sft": SupervisedObjective, "dpo": DPOObjective, "bpo": BPOObjective}


def objective_for(config: Any) -> Objective:
    """The objective a :class:`~mmsafe.train.config.TrainConfig` asks for (``loss:``), with its settings."""
    return OBJECTIVES[config.loss].from_config(config)
