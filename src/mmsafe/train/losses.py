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


#: Memory of one chunk's float32 logits in :func:`chunked_token_logprobs`: 64 MiB is 110
#: response tokens at a 152k vocabulary, 520 at 32k.
LOGPROB_CHUNK_BYTES = 64 * 2**20


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log softmax(h W^T + b)[label] for N hidden states, ``chunk`` rows at a time, forward and backward.

    The [N, V] logits are never held: the forward keeps each row's log-sum-exp, the
    backward recomputes one chunk's logits at a time. Arithmetic in float32 (the weights
    are cast per chunk), as :func:`token_logprobs` does after the output layer.
    """

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, hidden, weight, bias, labels, chunk):
        # float32 under any autocast: the same numbers whether or not the caller runs in mixed precision
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, hidden.shape[0], chunk):
            logits = _chunk_logits(hidden[start : start + chunk], weight, bias)
            lse[start : start + chunk] = torch.logsumexp(logits, dim=-1)
            out[start : start + chunk] = (
                logits.gather(1, labels[start : start + chunk, None]).squeeze(1) - lse[start : start + chunk]
            )
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), labels, lse)
        ctx.has_bias, ctx.chunk = bias is not None, chunk
        return out

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_out):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        )
        grad_bias = (
            torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
            if bias is not None and ctx.needs_input_grad[2]
            else None
        )
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            h = hidden[rows]
            # d logp / d logits = onehot(label) - softmax; scaled by the incoming gradient
            grad_logits = -torch.exp(_chunk_logits(h, weight, bias) - lse[rows, None])
            grad_logits.scatter_add_(
                1, labels[rows, None], torch.ones_like(labels[rows, None], dtype=grad_logits.dtype)
            )
            grad_logits *= grad_out[rows, None]
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits @ weight.float()).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, h.float())  # in place: no second [V, H] buffer
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None or bias is None else grad_bias.to(bias.dtype),
            None,
            None,
        )


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = hidden.float() @ weight.float().T
    return logits if bias is None else logits + bias.float()


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    chunk: int | None = None,
) -> torch.Tensor:
    """Log-prob of each label under the output layer (``weight`` [V, H], ``bias`` [V]) on ``hidden`` [N, H] -> [N].

    Equal to ``token_logprobs(hidden @ weight.T + bias, labels)`` (to float32 rounding),
    in memory proportional to ``chunk x V`` instead of ``N x V``, for the backward too.
    ``chunk`` rows at a time (default: as many as fit in :data:`LOGPROB_CHUNK_BYTES`).
    """
    if chunk is None:
        chunk = max(16, LOGPROB_CHUNK_BYTES // (4 * weight.shape[0]))
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0 * weight.sum()
    if hidden.shape[0] <= chunk:  # one chunk: plain autograd, no recomputation in the backward
        with torch.autocast(hidden.device.type, enabled=False):
            logits = _chunk_logits(hidden, weight, bias)
            return torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
    return _ChunkedTokenLogprobs.apply(hidden, weight, bias, labels, chunk)
