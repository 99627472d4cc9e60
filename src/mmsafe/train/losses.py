"""Preference losses (DPO, IPO, BPO) and sequence log-probabilities: pure tensor math.

Nothing here knows about models, devices or files: log-probability tensors go in, a
:class:`PreferenceLoss` comes out. The trainer gathers log-probs and calls these.

With the implicit reward r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)), one DPO term
for a chosen response y_w and a rejected y_l is

    sigmoid:  -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
    ipo:      (h - 1 / (2 * beta)) ** 2

where h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)) and eps is
the label smoothing. BPO (Blind Preference Optimization) is, per example, the sum of the
K DPO terms of the chosen response against each of its K rejected responses (the human
one and the blind one), with equal weights unless weights are given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

LossType = Literal["sigmoid", "ipo"]
LOSS_TYPES = ("sigmoid", "ipo")


@dataclass
class PreferenceLoss:
    """The loss and the implicit rewards behind it (rewards carry no gradient).

    ``loss``: scalar, the mean of ``losses``; ``losses``: [B], one value per example;
    ``chosen_rewards``: [B]; ``rejected_rewards``: [B] for DPO, [B, K] for BPO;
    ``rejected_mask``: same shape as ``rejected_rewards``, True where a rejected
    response exists (examples may have fewer than K).
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    rejected_mask: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        """chosen reward - rejected reward, shaped like ``rejected_rewards``."""
        chosen = self.chosen_rewards if self.rejected_rewards.dim() == 1 else self.chosen_rewards.unsqueeze(-1)
        return chosen - self.rejected_rewards

    @property
    def accuracies(self) -> torch.Tensor:
        """1.0 where the chosen reward beats the rejected one, else 0.0 (shape of ``margins``)."""
        return (self.margins > 0).float()


def _pair_losses(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    label_smoothing: float,
    loss_type: str,
) -> torch.Tensor:
    """Elementwise DPO/IPO term from policy-minus-reference log-ratios (broadcasting)."""
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        return -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss_type == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")


def _check(beta: float, label_smoothing: float, loss_type: str) -> None:
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to the sigmoid loss only, not ipo")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: LossType = "sigmoid",
) -> PreferenceLoss:
    """DPO over B pairs; every argument is [B] sequence log-prob sums."""
    _check(beta, label_smoothing, loss_type)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = _pair_losses(chosen_logratios, rejected_logratios, beta, label_smoothing, loss_type)
    return PreferenceLoss(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
        rejected_mask=torch.ones_like(rejected_logratios, dtype=torch.bool),
    )


def bpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    loss_type: LossType = "sigmoid",
    rejected_mask: torch.Tensor | None = None,
) -> PreferenceLoss:
    """BPO: per example, the weighted sum of K DPO terms (chosen vs each rejected).

    Args:
        policy_chosen_logps, ref_chosen_logps: [B].
        policy_rejected_logps, ref_rejected_logps: [B, K] (entries where
            ``rejected_mask`` is False are ignored and may hold anything finite).
        weights: [K] per-slot weights (for example human 1.0, blind 0.5), or [B, K] per
            response; None means 1 each, the paper's equal-weight sum.
        rejected_mask: [B, K] bool, True where example b has a k-th rejected response.

    ``losses[b] = sum_k weights[k] * mask[b, k] * term(b, k)``; ``loss`` is their mean.
    With K = 1 and no weights this is exactly :func:`dpo_loss`.
    """
    _check(beta, label_smoothing, loss_type)
    if policy_rejected_logps.dim() != 2:
        raise ValueError(f"policy_rejected_logps must be [B, K], got shape {tuple(policy_rejected_logps.shape)}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # [B]
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # [B, K]
    if rejected_mask is None:
        rejected_mask = torch.ones_like(rejected_logratios, dtype=torch.bool)
    terms = _pair_losses(chosen_logratios.unsqueeze(-1), rejected_logratios, beta, label_smoothing, loss_type)
    scale = rejected_mask.to(terms.dtype)
    if weights is not None:
        weights = weights.to(device=terms.device, dtype=terms.dtype)
        scale = scale * (weights.unsqueeze(0) if weights.dim() == 1 else weights)
    # torch.where, not a product, so that a garbage value in a masked slot cannot leak a NaN.
    losses = torch.where(rejected_mask, terms * scale, torch.zeros_like(terms)).sum(dim=-1)
    return PreferenceLoss(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
        rejected_mask=rejected_mask,
    )


def sft_loss(policy_logps: torch.Tensor) -> torch.Tensor:
    """Supervised warm-up: the negative log-likelihood, [B] log-probs -> scalar mean.

    With per-token mean log-probs (the trainer passes those) this is the usual token
    cross-entropy averaged per sequence: [-1.0, -3.0] -> 2.0.
    """
    return -policy_logps.mean()


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Log-probability of each label token: [N, T, V] logits, [N, T] labels -> [N, T].

    ``logits[n, t]`` is the distribution that ``labels[n, t]`` is drawn from (shift
    before calling when both come from one sequence). Ignored positions give 0.
    """
    mask = labels != ignore_index
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    # log_softmax in float32: bf16 log-probs over a 32k vocabulary lose ~0.01 per token.
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, logps, torch.zeros_like(logps))


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    average: bool = False,
) -> torch.Tensor:
    """Sum (or mean) of the label tokens' log-probs per sequence: [N, T, V], [N, T] -> [N].

    ``logits[n, t]`` scores ``labels[n, t]`` (already aligned: for a causal model pass
    ``logits[:, :-1]`` and ``input_ids[:, 1:]``). A sequence with no label tokens gives 0.
    """
    per_token = token_logprobs(logits, labels, ignore_index)
    total = per_token.sum(dim=-1)
    if not average:
        return total
    count = (labels != ignore_index).sum(dim=-1).clamp(min=1)
    return total / count
