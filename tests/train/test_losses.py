"""Preference losses against values worked out by hand.

Shared numbers (beta = 0.5), three examples, log-ratio = policy - reference:

    example   chosen (pi, ref)   rejected (pi, ref)   chosen ratio  rejected ratio  h   beta*h
    0         (-2, -3)           (-5, -4)             +1            -1              +2  +1
    1         (-4, -4)           (-6, -6)              0             0               0   0
    2         (-3, -2)           (-1, -2)             -1            +1              -2  -1

sigmoid loss = -log sigmoid(x) = log(1 + e^-x):
    x = +1 -> 0.3132617,  x = 0 -> log 2 = 0.6931472,  x = -1 -> 1.3132617
    x = +0.5 -> 0.4740770, x = -0.5 -> 0.9740770
"""

from __future__ import annotations

import math

import pytest
import torch

from mmsafe.train.losses import bpo_loss, dpo_loss, sequence_logprobs, sft_loss, token_logprobs

BETA = 0.5
POLICY_CHOSEN = torch.tensor([-2.0, -4.0, -3.0])
REF_CHOSEN = torch.tensor([-3.0, -4.0, -2.0])
POLICY_REJECTED = torch.tensor([-5.0, -6.0, -1.0])
REF_REJECTED = torch.tensor([-4.0, -6.0, -2.0])
# A second (blind) rejected response per example, log-ratios 0, -2, 0:
#   example 0: h = 1 - 0 = 1   -> x = 0.5  -> 0.4740770
#   example 1: h = 0 - (-2) = 2 -> x = 1   -> 0.3132617
#   example 2: h = -1 - 0 = -1 -> x = -0.5 -> 0.9740770
POLICY_BLIND = torch.tensor([-3.0, -7.0, -2.0])
REF_BLIND = torch.tensor([-3.0, -5.0, -2.0])

SOFTPLUS_MINUS_1 = math.log1p(math.exp(-1.0))  # 0.3132617
LOG_2 = math.log(2.0)  # 0.6931472
SOFTPLUS_1 = math.log1p(math.exp(1.0))  # 1.3132617
SOFTPLUS_MINUS_HALF = math.log1p(math.exp(-0.5))  # 0.4740770
SOFTPLUS_HALF = math.log1p(math.exp(0.5))  # 0.9740770


def close(actual: torch.Tensor, expected: list[float] | float) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=1e-6, rtol=1e-6)


def test_dpo_sigmoid_losses_and_rewards():
    result = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=BETA)
    close(result.losses, [0.3132617, 0.6931472, 1.3132617])
    close(result.loss, (0.3132617 + 0.6931472 + 1.3132617) / 3)  # 0.7732235
    # rewards = beta * ratio
    close(result.chosen_rewards, [0.5, 0.0, -0.5])
    close(result.rejected_rewards, [-0.5, 0.0, 0.5])
    close(result.margins, [1.0, 0.0, -1.0])
    # a tie is not a win
    close(result.accuracies, [1.0, 0.0, 0.0])


def test_dpo_label_smoothing():
    # (1 - eps) * log(1 + e^-x) + eps * log(1 + e^x) = log(1 + e^-x) + eps * x, eps = 0.1:
    #   x = 1: 0.3132617 + 0.1 = 0.4132617; x = 0: 0.6931472; x = -1: 1.3132617 - 0.1 = 1.2132617
    result = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=BETA, label_smoothing=0.1)
    close(result.losses, [0.4132617, 0.6931472, 1.2132617])


def test_ipo():
    # (h - 1 / (2 beta))^2 with 1 / (2 * 0.5) = 1: (2 - 1)^2 = 1, (0 - 1)^2 = 1, (-2 - 1)^2 = 9
    result = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=BETA, loss_type="ipo")
    close(result.losses, [1.0, 1.0, 9.0])
    close(result.loss, 11.0 / 3.0)


def test_bpo_with_one_rejected_equals_dpo():
    dpo = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=BETA, label_smoothing=0.1)
    bpo = bpo_loss(
        POLICY_CHOSEN, POLICY_REJECTED[:, None], REF_CHOSEN, REF_REJECTED[:, None], beta=BETA, label_smoothing=0.1
    )
    close(bpo.losses, dpo.losses.tolist())
    close(bpo.loss, dpo.loss.item())
    close(bpo.rejected_rewards[:, 0], dpo.rejected_rewards.tolist())


def test_bpo_two_rejected_equal_weights_sums_the_terms():
    rejected = torch.stack([POLICY_REJECTED, POLICY_BLIND], dim=1)
    reference = torch.stack([REF_REJECTED, REF_BLIND], dim=1)
    result = bpo_loss(POLICY_CHOSEN, rejected, REF_CHOSEN, reference, beta=BETA)
    expected = [
        SOFTPLUS_MINUS_1 + SOFTPLUS_MINUS_HALF,  # 0.3132617 + 0.4740770 = 0.7873387
        LOG_2 + SOFTPLUS_MINUS_1,  # 0.6931472 + 0.3132617 = 1.0064089
        SOFTPLUS_1 + SOFTPLUS_HALF,  # 1.3132617 + 0.9740770 = 2.2873387
    ]
    close(result.losses, expected)
    close(result.loss, sum(expected) / 3)
    # blind rewards = 0.5 * [0, -2, 0]
    close(result.rejected_rewards, [[-0.5, 0.0], [0.0, -1.0], [0.5, 0.0]])
    # margins = chosen - rejected: [[1, 0.5], [0, 1], [-1, -0.5]]
    close(result.margins, [[1.0, 0.5], [0.0, 1.0], [-1.0, -0.5]])
    close(result.accuracies, [[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])


def test_bpo_weights_and_mask():
    rejected = torch.stack([POLICY_REJECTED, POLICY_BLIND], dim=1)
    reference = torch.stack([REF_REJECTED, REF_BLIND], dim=1)
    weights = torch.tensor([1.0, 0.5])
    mask = torch.tensor([[True, True], [True, True], [True, False]])
    result = bpo_loss(POLICY_CHOSEN, rejected, REF_CHOSEN, reference, beta=BETA, weights=weights, rejected_mask=mask)
    expected = [
        0.3132617 + 0.5 * 0.4740770,  # 0.5503002
        0.6931472 + 0.5 * 0.3132617,  # 0.8497781
        1.3132617,  # the blind slot of example 2 is masked out
    ]
    close(result.losses, expected)


def test_bpo_masked_slot_cannot_leak_nan():
    rejected = torch.tensor([[-1.0, float("nan")]])
    result = bpo_loss(
        torch.tensor([-1.0]),
        rejected,
        torch.tensor([-1.0]),
        torch.tensor([[-1.0, 0.0]]),
        beta=1.0,
        rejected_mask=torch.tensor([[True, False]]),
    )
    close(result.losses, [LOG_2])


def test_gradient_direction():
    chosen = POLICY_CHOSEN.clone().requires_grad_(True)
    rejected = POLICY_REJECTED.clone().requires_grad_(True)
    dpo_loss(chosen, rejected, REF_CHOSEN, REF_REJECTED, beta=BETA).loss.backward()
    # d loss / d chosen = -beta * sigmoid(-x) / B: raising the chosen log-prob lowers the loss.
    expected = [-BETA * (1 - 1 / (1 + math.exp(-x))) / 3 for x in (1.0, 0.0, -1.0)]
    close(chosen.grad, expected)
    close(rejected.grad, [-value for value in expected])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": 0.1, "label_smoothing": 0.6}, "label_smoothing"),
        ({"beta": 0.1, "loss_type": "hinge"}, "loss_type"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, **kwargs)


def test_sequence_logprobs_sum_and_mean():
    # logits log([1, 1, 2]) give probabilities [0.25, 0.25, 0.5]: log-probs -1.3862944 and -0.6931472.
    row = torch.log(torch.tensor([1.0, 1.0, 2.0]))
    logits = row.expand(2, 3, 3).clone()
    labels = torch.tensor([[2, 0, -100], [1, -100, -100]])
    close(token_logprobs(logits, labels), [[-0.6931472, -1.3862944, 0.0], [-1.3862944, 0.0, 0.0]])
    close(sequence_logprobs(logits, labels), [-2.0794415, -1.3862944])
    close(sequence_logprobs(logits, labels, average=True), [-2.0794415 / 2, -1.3862944])
    # a sequence with no label tokens sums to 0 (and its mean does not divide by zero)
    close(sequence_logprobs(logits[:1], torch.full((1, 3), -100), average=True), [0.0])


def test_sft_loss_is_the_mean_negative_log_likelihood():
    # per-token mean log-probs -1 and -3 -> (1 + 3) / 2 = 2
    close(sft_loss(torch.tensor([-1.0, -3.0])), 2.0)


@pytest.mark.parametrize("chunk", [1, 7, 1024])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_log_probs_equal_the_plain_computation_forward_and_backward(chunk, with_bias):
    """Against log_softmax over the full logits (an independent computation): values and all gradients to 1e-5."""
    from mmsafe.train.losses import chunked_token_logprobs

    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(29, 12, generator=generator, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(97, 12, generator=generator).requires_grad_()
    bias = torch.randn(97, generator=generator).requires_grad_() if with_bias else None
    labels = torch.randint(0, 97, (29,), generator=generator)
    upstream = torch.randn(29, generator=generator)
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    plain = torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
    leaves = [tensor for tensor in (hidden, weight, bias) if tensor is not None]
    expected = torch.autograd.grad((plain * upstream).sum(), leaves)
    chunked = chunked_token_logprobs(hidden, weight, bias, labels, chunk=chunk)
    got = torch.autograd.grad((chunked * upstream).sum(), leaves)
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=0)
    for value, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(value, reference, atol=1e-5, rtol=1e-5)
