"""Score the chosen and the K rejected responses of each example: sequence log-probs.

``shared-prefix`` (the default) packs one example into one row,
``[prompt | chosen | rejected_1 | ... | rejected_K]``, and gives the model a block
attention mask: prompt tokens attend causally to the prompt, and each response token to
the whole prompt and to the earlier tokens of its own response, never to another
response. Position ids of every response continue from the end of the prompt. Each
response is therefore scored exactly as if it followed the prompt alone, while the
vision tower runs once per example and the prompt's hidden states are computed once. It
is one ordinary forward, so gradient checkpointing, DDP, DeepSpeed and FSDP see nothing
unusual. It needs an attention implementation that takes a 4-D mask (``sdpa``,
``eager``), not ``flash_attention_2``.

It is exact only for plain causal decoders with 1-D positions (LLaVA and kin): M-RoPE
(Qwen-VL), bidirectional image attention (Gemma 3, PaliGemma), cross-attention (Mllama)
and layers that ignore attention masks (LFM2-VL's convolutions) break it.

``prompt-cache`` is the general path: per example, the prompt (with its image) runs once
through the model's own forward with ``use_cache=True``; its key/value cache is repeated
for the 1 + K responses, which run as one right-padded batch continuing from it, as in
generation, with gradients flowing back through the cache. Positions (M-RoPE deltas
included), token types, bidirectional image attention and cross-attention states are the
model's. It needs an attention cache that can be shared (not the in-place recurrent
state of hybrid models) and no gradient checkpointing (which turns the cache off); it
works with flash attention.

``per-response`` is the fallback that runs everywhere: one right-padded row per
response, through the model's own forward, so positions, token types, image masks,
cross-attention and recurrent state are the model's. Exact on every architecture; the
image and prompt are encoded once per response.

``separate`` is the public release's form, kept as the baseline: every (prompt,
response) sequence of every (chosen, rejected) pair is a row of its own, with its own
image pass.

``auto`` (the default of training) takes ``shared-prefix`` where
:func:`mmsafe.models.structure.packing_supported` allows it, else ``prompt-cache`` where
:func:`mmsafe.models.structure.prompt_cache_supported` does, else ``per-response``, and
:func:`select_forward_mode` checks the choice on the user's own model and data against
plain one-sequence-at-a-time scoring before it is trusted (falling back to the next).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mmsafe.train.data import PAD_SEGMENT, ForwardMode, as_forward_mode
from mmsafe.train.losses import chunked_token_logprobs, sequence_logprobs, token_logprobs

logger = logging.getLogger(__name__)

#: Batch keys that are not model inputs.
_BOOKKEEPING = (
    "segment_ids",
    "labels",
    "logit_index",
    "sequence_example",
    "sequence_slot",
    "rejected_source_ids",
    "rejected_mask",
    "reference_chosen_logps",
    "reference_rejected_logps",
)


@dataclass
class ResponseLogProbs:
    """Sequence log-probs: ``chosen`` [B], ``rejected`` [B, K], ``rejected_mask`` [B, K]."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    rejected_mask: torch.Tensor
    #: (padding positions, all positions) the forwards actually ran, where the path knows it
    #: better than the batch layout does (prompt-cache: responses batched by length).
    positions: tuple[float, float] | None = None


def unwrap(model: Any) -> Any:
    """The model inside DDP / DeepSpeed wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def attention_implementation(model: Any) -> str:
    config = unwrap(model).config
    text_config = getattr(config, "text_config", None) or config
    return (
        getattr(text_config, "_attn_implementation", None) or getattr(config, "_attn_implementation", None) or "eager"
    )


def block_attention_mask(segment_ids: torch.Tensor, dtype: torch.dtype, as_bool: bool) -> torch.Tensor:
    """[B, T] segment ids -> [B, 1, T, T] mask (True / 0.0 where query i may attend key j).

    Allowed: j <= i and key j in the prompt (segment 0) or in the query's own segment.
    A padding query attends to itself only, so no softmax row is empty.
    """
    width = segment_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment_ids.device).tril()
    query = segment_ids.unsqueeze(2)
    key = segment_ids.unsqueeze(1)
    allowed = causal & (query != PAD_SEGMENT) & (key != PAD_SEGMENT) & ((key == 0) | (key == query))
    allowed = allowed | torch.eye(width, dtype=torch.bool, device=segment_ids.device)
    allowed = allowed.unsqueeze(1)
    if as_bool:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def chunked_head(model: Any) -> Any | None:
    """The output layer, when response log-probs can be taken from its inputs in chunks (else None).

    Not for models that transform the logits after the layer (final logit soft-capping),
    nor for weights that live outside the module's forward (DeepSpeed ZeRO-3, FSDP shards).
    The exactness check compares the result with the model's own logits either way.
    """
    head = unwrap(model).get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        return None
    config = unwrap(model).config
    text_config = getattr(config, "text_config", None) or config
    if getattr(text_config, "final_logit_softcapping", None) or getattr(config, "final_logit_softcapping", None):
        return None
    if head.weight.numel() == 0 or hasattr(head.weight, "ds_id"):
        return None
    return head


@contextlib.contextmanager
def head_inputs(head: Any) -> Iterator[list[torch.Tensor]]:
    """Collect the hidden states the output layer is called on, and let it run on none of them.

    The model's forward then returns empty logits; the caller scores the collected
    hidden states with :func:`chunked_token_logprobs` (gradients flow through them).
    """
    captured: list[torch.Tensor] = []

    def take(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        captured.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(take)
    try:
        yield captured
    finally:
        handle.remove()


def _only(captured: list[torch.Tensor]) -> torch.Tensor:
    if len(captured) != 1:
        raise RuntimeError(
            f"the output layer ran {len(captured)} times in one forward; chunked log-probs need exactly one"
        )
    return captured[0]


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in batch.items() if key not in _BOOKKEEPING}


def score_shared_prefix(model: Any, batch: dict[str, torch.Tensor], *, average: bool = False) -> ResponseLogProbs:
    """Log-probs of all responses from one block-masked forward per batch."""
    segment_ids = batch["segment_ids"]
    labels = batch["labels"]
    implementation = attention_implementation(model)
    if "flash" in implementation:
        raise ValueError(f"shared-prefix scoring needs sdpa or eager attention, the model uses {implementation}")
    dtype = unwrap(model).get_input_embeddings().weight.dtype
    inputs = _model_inputs(batch)
    inputs["attention_mask"] = block_attention_mask(segment_ids, dtype, as_bool=implementation == "sdpa")
    rows, columns = (labels != -100).nonzero(as_tuple=True)  # every response token
    predictors = batch["logit_index"][rows, columns]  # the position whose logits predict it
    # The output layer runs only where its logits are read: the prompt's last position and
    # the response positions (about half of a LLaVA row is image and prompt tokens).
    keep = torch.unique(predictors)
    keep_kwargs = {}
    if _accepts(model, "logits_to_keep"):
        keep_kwargs = {"logits_to_keep": keep}
        predictors = torch.searchsorted(keep, predictors)
    head = chunked_head(model)
    if head is not None:  # the output layer in chunks: no [N, V] logits held, forward or backward
        with head_inputs(head) as captured:
            model(**inputs, use_cache=False, **keep_kwargs)
        hidden = _only(captured)  # [B, len(keep) or T, H]
        per_token = chunked_token_logprobs(
            hidden[rows, predictors], head.weight, head.bias, labels[rows, columns]
        )  # [N]
    else:
        logits = model(**inputs, use_cache=False, **keep_kwargs).logits  # [B, len(keep) or T, V]
        per_token = token_logprobs(logits[rows, predictors].unsqueeze(0), labels[rows, columns].unsqueeze(0))[0]  # [N]
    slots = segment_ids[rows, columns] - 1  # 0: chosen, k: rejected k
    size = (segment_ids.shape[0], batch["rejected_mask"].shape[1] + 1)
    sums = torch.zeros(size, dtype=per_token.dtype, device=per_token.device).index_put(
        (rows, slots), per_token, accumulate=True
    )
    if average:
        counts = torch.zeros(size, dtype=per_token.dtype, device=per_token.device).index_put(
            (rows, slots), torch.ones_like(per_token), accumulate=True
        )
        sums = sums / counts.clamp(min=1)
    return ResponseLogProbs(chosen=sums[:, 0], rejected=sums[:, 1:], rejected_mask=batch["rejected_mask"])


def _accepts(model: Any, argument: str) -> bool:
    """Does the model's forward take ``argument``? (PEFT passes keyword arguments to its base.)"""
    model = unwrap(model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return argument in inspect.signature(model.forward).parameters


def score_separate(model: Any, batch: dict[str, torch.Tensor], *, average: bool = False) -> ResponseLogProbs:
    """Log-probs with every (prompt, response) sequence encoded alone, pair by pair.

    The chosen response is scored once per pair, as in the release; its K identical
    scores are averaged, which leaves both the value and the gradient unchanged.
    """
    logits = model(**_model_inputs(batch), use_cache=False).logits
    sequence_logps = sequence_logprobs(logits[:, :-1], batch["labels"][:, 1:], average=average)  # [S]
    rejected_mask = batch["rejected_mask"]
    size = rejected_mask.shape[0]
    example = batch["sequence_example"]
    slot = batch["sequence_slot"]
    is_chosen = slot == 0
    chosen_sum = torch.zeros(size, dtype=sequence_logps.dtype, device=sequence_logps.device).index_add(
        0, example[is_chosen], sequence_logps[is_chosen]
    )
    chosen_count = torch.zeros(size, device=sequence_logps.device).index_add(
        0, example[is_chosen], torch.ones_like(sequence_logps[is_chosen])
    )
    rejected = torch.zeros(rejected_mask.shape, dtype=sequence_logps.dtype, device=sequence_logps.device)
    rejected = rejected.index_put((example[~is_chosen], slot[~is_chosen] - 1), sequence_logps[~is_chosen])
    return ResponseLogProbs(
        chosen=chosen_sum / chosen_count.clamp(min=1), rejected=rejected, rejected_mask=rejected_mask
    )


def _cache_argument(model: Any) -> str:
    """The keyword of the key/value cache in this transformers (``cache``, formerly ``past_key_values``)."""
    return "cache" if _accepts(model, "cache") else "past_key_values"


#: Responses of one example run in one batch against the prompt's cache while each is at
#: least this share of the batch's longest; a shorter one starts the next batch (where the
#: cache can be rolled back to the prompt), so a long blind answer does not pad the short ones.
RESPONSE_GROUP_SHARE = 0.8


def response_groups(lengths: list[int], share: float = RESPONSE_GROUP_SHARE) -> list[list[int]]:
    """Indices of ``lengths`` in batches of similar length, longest first (each at least ``share`` of its batch's longest)."""
    groups: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda position: -lengths[position]):
        if groups and lengths[index] >= share * lengths[groups[-1][0]]:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def response_positions(lengths: list[int], groups: list[list[int]]) -> tuple[int, int]:
    """(padding positions, all positions) of response batches ``groups``, each right-padded to its longest."""
    padded = total = 0
    for group in groups:
        width = max(max(lengths[index] for index in group), 1)
        total += width * len(group)
        padded += sum(width - lengths[index] for index in group)
    return padded, total


def _rollback_ready(cache: Any, model: Any) -> bool:
    """Whether the prompt's cache can be cut back to the prompt after a batch of responses.

    Only a plain dynamic cache whose every layer holds exactly the prompt (no sliding
    window that may have dropped states, no cross-attention states of another length, no
    recurrent state written in place).
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if type(cache) is not DynamicCache or not getattr(cache, "layers", None):
        return False
    length = cache.get_seq_length()
    return all(type(layer) is DynamicLayer and layer.get_seq_length() == length for layer in cache.layers)


def prompt_cache_groups(model: Any, lengths: list[int], cache: Any) -> list[list[int]]:
    """The response batches of one example: by length where the cache can be rolled back, else one batch."""
    return response_groups(lengths) if _rollback_ready(cache, model) else [list(range(len(lengths)))]


def score_prompt_cache(model: Any, batch: dict[str, Any], *, average: bool = False) -> ResponseLogProbs:
    """Log-probs from one prompt forward per example and forwards of its 1 + K responses against its cache.

    The prompt (with its image) runs once, with ``use_cache=True``, through the model's own
    forward: positions, M-RoPE deltas, token types, bidirectional image attention and
    cross-attention states are the model's. Its cache is repeated for the responses, which
    run as right-padded batches continuing from it, as in generation: responses of similar
    length together (:func:`response_groups`), the cache cut back to the prompt between
    batches where it is a plain dynamic cache, else all responses in one batch. Gradients
    flow through the cached keys and values into the prompt and the vision tower. The last
    prompt position's logits score each response's first token; the prompt's other
    positions never reach the output layer.
    """
    cache_argument = _cache_argument(model)
    keep_last = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    head = chunked_head(model)
    chosen, rejected = [], []
    padded = total = 0.0
    width = batch["rejected_mask"].shape[1]
    for row in batch["prompt_cache_rows"]:
        capture: contextlib.AbstractContextManager[list[torch.Tensor]] = (
            head_inputs(head) if head is not None else contextlib.nullcontext([])
        )
        with capture as captured:
            prompt_output = model(**row["prompt"], use_cache=True, **keep_last)
        cache = getattr(prompt_output, "cache", None) or getattr(prompt_output, "past_key_values", None)
        if cache is None:
            raise ValueError(
                f"{architecture_name(model)} returned no key/value cache for the prompt (gradient checkpointing turns it off); "
                "prompt-cache scoring needs one: use forward_mode per-response"
            )
        prompt_hidden = _only(captured)[:, -1:] if head is not None else None
        labels = row["responses"]["labels"]
        count = labels.shape[0]
        lengths = (labels != -100).sum(1).tolist()
        groups = prompt_cache_groups(model, lengths, cache)
        prompt_length = cache.get_seq_length()
        group_padded, group_total = response_positions(lengths, groups)
        padded, total = padded + group_padded, total + group_total + row["prompt"]["input_ids"].numel()
        scores_by_slot: list[torch.Tensor | None] = [None] * count
        for number, group in enumerate(groups):
            group_width = max(max(lengths[index] for index in group), 1)
            index = torch.tensor(group, device=labels.device)
            responses = {
                key: value[index][:, :group_width] for key, value in row["responses"].items() if key != "labels"
            }
            group_labels = labels[index][:, :group_width]
            if number == 0:
                cache.batch_repeat_interleave(len(group))
            else:  # back to the prompt: drop the last batch's tokens, one prompt row per response
                cache.crop(-(cache.get_seq_length() - prompt_length))
                cache.batch_select_indices(torch.zeros(len(group), dtype=torch.long, device=labels.device))
            if head is not None and prompt_hidden is not None:
                with head_inputs(head) as captured:
                    model(**responses, **{cache_argument: cache}, use_cache=True)
                hidden = torch.cat(
                    [prompt_hidden.expand(len(group), 1, -1), _only(captured)[:, :-1]], dim=1
                )  # [n, R, H]: predicts labels
                scored = group_labels != -100
                per_token = chunked_token_logprobs(hidden[scored], head.weight, head.bias, group_labels[scored])
                sums = torch.zeros(len(group), dtype=per_token.dtype, device=per_token.device).index_add(
                    0, scored.nonzero()[:, 0], per_token
                )
                group_scores = sums / scored.sum(1).clamp(min=1) if average else sums
            else:
                logits = model(**responses, **{cache_argument: cache}, use_cache=True).logits  # [n, R, V]
                first = prompt_output.logits[:, -1:].expand(len(group), 1, -1)
                group_scores = sequence_logprobs(
                    torch.cat([first, logits[:, :-1]], dim=1), group_labels, average=average
                )  # [n]
            if len(groups) > 1 and cache.get_seq_length() != prompt_length + group_width:
                raise RuntimeError(
                    f"{architecture_name(model)}: the cache did not grow by the responses; cannot roll it back"
                )
            for slot, score in zip(group, group_scores, strict=True):
                scores_by_slot[slot] = score
        scores = torch.stack([score for score in scores_by_slot if score is not None])
        chosen.append(scores[0])
        rejected.append(torch.cat([scores[1:], scores.new_zeros(width - (count - 1))]))
    return ResponseLogProbs(
        chosen=torch.stack(chosen),
        rejected=torch.stack(rejected),
        rejected_mask=batch["rejected_mask"],
        positions=(padded, total),
    )


def score_batch(model: Any, batch: dict[str, Any], *, average: bool = False) -> ResponseLogProbs:
    """Dispatch on the batch layout the collator produced (packed rows, prompt-cache rows, or rows of sequences)."""
    if "segment_ids" in batch:
        return score_shared_prefix(model, batch, average=average)
    if "prompt_cache_rows" in batch:
        return score_prompt_cache(model, batch, average=average)
    return score_separate(model, batch, average=average)


#: Largest mean per-token log-prob difference a scoring path may show against plain
#: one-sequence-at-a-time scoring: float32, and bfloat16 / float16 weights.
EXACTNESS_TOLERANCE = {"float32": 1e-4, "half": 1e-2}


@dataclass
class ExactnessCheck:
    """A scoring path against one-at-a-time scoring on a few examples."""

    mode: str
    max_difference: float  # largest |difference of a response's log-prob| / its token count
    tolerance: float
    responses: int

    @property
    def passed(self) -> bool:
        return self.max_difference <= self.tolerance


def one_at_a_time(model: Any, collator: Any, item: dict[str, Any]) -> list[float]:
    """Log-probs of the 1 + K responses of one item, each (prompt + response) scored alone, unpadded."""
    values = []
    for slot in range(len(item["example"].responses)):
        batch = collator.with_mode("separate")._sequence_rows([item], [(0, slot)])
        batch["rejected_mask"] = torch.zeros(1, 0, dtype=torch.bool)
        batch = to_device(batch, _device(model))
        logits = model(**_model_inputs(batch), use_cache=False).logits
        values.append(float(sequence_logprobs(logits[:, :-1], batch["labels"][:, 1:])[0]))
    return values


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """A collator batch on ``device`` (tensors, and the per-example rows of prompt-cache batches)."""
    return {key: value.to(device) if hasattr(value, "to") else value for key, value in batch.items()}


def _device(model: Any) -> torch.device:
    return next(unwrap(model).parameters()).device


def check_exactness(model: Any, collator: Any, items: list[dict[str, Any]], mode: str) -> ExactnessCheck:
    """Score ``items`` as one batch in ``mode`` and each response alone; compare."""
    dtype = unwrap(model).get_input_embeddings().weight.dtype
    tolerance = EXACTNESS_TOLERANCE["float32" if dtype == torch.float32 else "half"]
    was_training = unwrap(model).training
    unwrap(model).eval()  # dropout off: both sides must see the same function
    try:
        with torch.no_grad():
            batch = collator.with_mode(mode)(items)
            batch = to_device(batch, _device(model))
            scores = score_batch(model, batch)
            difference = 0.0
            count = 0
            for row, item in enumerate(items):
                expected = one_at_a_time(model, collator, item)
                got = [float(scores.chosen[row])] + [
                    float(value) for value in scores.rejected[row, : len(expected) - 1]
                ]
                for value, reference, ids in zip(got, expected, item["example"].responses, strict=True):
                    difference = max(difference, abs(value - reference) / max(1, len(ids)))
                    count += 1
    finally:
        unwrap(model).train(was_training)
    return ExactnessCheck(mode=mode, max_difference=difference, tolerance=tolerance, responses=count)


def architecture_name(model: Any) -> str:
    base = unwrap(model)
    if hasattr(base, "get_base_model"):
        base = base.get_base_model()
    return f"{type(base).__name__} ({getattr(base.config, 'model_type', '?')})"


def select_forward_mode(
    model: Any, collator: Any, items: list[dict[str, Any]], requested: str, *, gradient_checkpointing: bool = False
) -> tuple[ForwardMode, ExactnessCheck]:
    """The scoring path to use for ``model``, checked on ``items`` (a few of the user's examples).

    ``auto``: the packed ``shared-prefix`` row where the architecture allows it and it is
    exact here; else ``prompt-cache`` where the cache can be shared (not with
    ``gradient_checkpointing``, which turns it off) and it is exact here; else
    ``per-response``. An explicitly requested mode that is not exact on this model
    (or that the model cannot run) is refused with a :class:`~mmsafe.errors.ConfigError`
    naming the architecture and the difference.
    """
    from mmsafe.errors import ConfigError
    from mmsafe.models.structure import prompt_cache_supported

    cache_allowed = (
        (False, "gradient checkpointing (which turns the key/value cache off)")
        if gradient_checkpointing
        else prompt_cache_supported(model)
    )
    if requested == "auto":
        candidates: list[tuple[ForwardMode, tuple[bool, str]]] = [
            ("shared-prefix", packed_rows_allowed(model, collator, items)),
            ("prompt-cache", cache_allowed),
        ]
        for mode, (supported, reason) in candidates:
            if not supported:
                logger.info("scoring path: not %s (%s has %s)", mode, architecture_name(model), reason)
                continue
            check = check_exactness(model, collator, items, mode)
            if check.passed:
                logger.info(
                    "scoring path: %s, exact here: %.2g <= %.2g per token", mode, check.max_difference, check.tolerance
                )
                return mode, check
            logger.warning(
                "scoring path: %s is not exact on %s here (%.3g per token > %.2g)",
                mode,
                architecture_name(model),
                check.max_difference,
                check.tolerance,
            )
        requested = "per-response"
    elif requested == "prompt-cache":
        supported, reason = cache_allowed
        if not supported:
            raise ConfigError(
                f"forward_mode prompt-cache cannot run on {architecture_name(model)}: it has {reason}; use forward_mode auto or per-response"
            )
    check = check_exactness(model, collator, items, requested)
    if not check.passed:
        raise ConfigError(
            f"forward_mode {requested} is not exact on {architecture_name(model)}: its log-probs differ from one-at-a-time "
            f"scoring by {check.max_difference:.3g} per token (tolerance {check.tolerance:.2g}); use forward_mode auto or per-response"
        )
    logger.info(
        "scoring path: %s, exact here: %.2g <= %.2g per token", requested, check.max_difference, check.tolerance
    )
    return as_forward_mode(requested), check


def packed_rows_allowed(model: Any, collator: Any, items: list[dict[str, Any]]) -> tuple[bool, str]:
    """May ``auto`` pack this model's responses in one row? (The architecture's rule, before any check.)

    Returns (allowed, the reason when not): :func:`mmsafe.models.structure.packing_supported`
    on the per-token processor outputs of ``items``, and an attention kernel that takes 4-D masks.
    """
    from mmsafe.models.structure import packing_supported
    from mmsafe.train.data import _Rows

    per_token, _ = _Rows(collator.pad_token_id, collator.model_type).prompt_inputs(items, collator.encoder)
    supported, reason = packing_supported(model, {key for row in per_token for key in row})
    if supported and "flash" in attention_implementation(model):
        return False, f"{attention_implementation(model)} attention (no 4-D masks)"
    return supported, reason
