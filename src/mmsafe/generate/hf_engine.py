"""The in-process engine: batched generation with a Hugging Face model.

Prompts are rendered with the same template training uses (:func:`render_prompt`),
left-padded so every row's last prompt token sits at the same position, and grouped
into batches of similar length so little compute goes to padding. Requests with and
without an image never share a batch (the processor takes images for all rows or none);
answers come back in the order of the requests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmsafe.errors import ConfigError, DataError, MmsafeError
from mmsafe.generate.engine import (
    DecodingParams,
    FailedResponse,
    GenerationRequest,
    check_engine_options,
    check_responses,
)
from mmsafe.models.loading import LoadedModel, load_model
from mmsafe.models.prompts import PromptStyle, accepts_text_only, render_prompt, tokenize_options
from mmsafe.models.recipe import check_template, model_dtype, resolve_inputs

logger = logging.getLogger(__name__)

#: ``batch_size="auto"``: the batch size to start from, and the most it grows back to, on a
#: CUDA device (halved on each out-of-memory error). On a CPU there is no out-of-memory
#: error to react to, and past 16 rows a CPU gains little (see benchmarks/README.md).
AUTO_BATCH_SIZE_CUDA = 64
AUTO_BATCH_SIZE_CPU = 16
#: Batches in a row without running out of memory before the batch size doubles again;
#: doubled after each out-of-memory error, so a size that fails keeps being retried less often.
GROW_AFTER = 4
GROW_AFTER_MAX = 64


@dataclass
class PaddingCount:
    """Prompt positions run through the model, and how many of them were padding."""

    padded: int = 0
    total: int = 0

    @property
    def share(self) -> float | None:
        return self.padded / self.total if self.total else None


@dataclass(frozen=True)
class Batch:
    """Positions (into the request list) of requests generated together."""

    indices: list[int]
    with_images: bool


def plan_batches(lengths: list[int], has_image: list[bool], batch_size: int) -> list[Batch]:
    """Group requests into batches of at most ``batch_size`` with similar prompt lengths.

    Requests are split by whether they carry an image, each part sorted longest first
    (a batch that runs out of memory does so at once), then cut into consecutive runs.
    Ties keep input order, so the plan is deterministic. Example: lengths [5, 9, 7, 3],
    no images, batch size 2 -> sorted positions [1, 2, 0, 3] -> batches [1, 2] and [0, 3].
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size: expected a positive integer, got {batch_size!r}")
    batches = []
    for with_images in (True, False):
        positions = [index for index in range(len(lengths)) if has_image[index] == with_images]
        positions.sort(key=lambda index: -lengths[index])
        for start in range(0, len(positions), batch_size):
            batches.append(Batch(positions[start : start + batch_size], with_images))
    return batches


class HFEngine:
    """Generate with a transformers image-text-to-text model in this process.

    ``dtype``, ``prompt_style`` and ``image_mode`` left at None come from the model's
    input recipe (``mmsafe_recipe.json``, written by training beside the weights; see
    :mod:`mmsafe.models.recipe`), else from :data:`mmsafe.models.recipe.DEFAULTS`.

    Args:
        model_or_path: a checkpoint directory, a Hub id, or an already loaded
            :class:`~mmsafe.models.loading.LoadedModel` (then ``dtype``, ``device``,
            ``adapter`` and ``trust_remote_code`` are not used).
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (bf16 on a GPU that
            supports it, else fp32).
        device: ``auto`` (this process's accelerator under a data-parallel launch, else
            CUDA if present, else CPU), ``cpu``, ``cuda:1``, ...
        adapter: a PEFT LoRA adapter directory applied on top of the model.
        batch_size: requests per forward pass, or ``auto``: start from ``max_batch_size``,
            halve on a CUDA out-of-memory error and retry the same requests (none is lost
            or answered twice), double again after a run of batches that fit (see
            :data:`GROW_AFTER`). Greedy answers do not depend on the batch size.
        max_batch_size: with ``batch_size="auto"``, the size to start from and the most it
            grows to (default :data:`AUTO_BATCH_SIZE_CUDA` on CUDA, :data:`AUTO_BATCH_SIZE_CPU` else).
        prompt_style: ``chat-template`` (the processor's template) or ``llava-v1``
            (the release's raw ``USER: ... ASSISTANT:`` form).
        image_mode: how an image is shaped before the processor sees it: ``pad`` (centred
            on a square of the processor's mean colour, as the LLaVA-1.5 release does),
            ``resize`` or ``none``.
        name: the model name written into response records (default: the adapter if
            given, else the model path or id).
    """

    def __init__(
        self,
        model_or_path: str | Path | LoadedModel,
        *,
        dtype: str | None = None,
        device: str = "auto",
        adapter: str | Path | None = None,
        batch_size: int | str = 16,
        max_batch_size: int | None = None,
        trust_remote_code: bool = False,
        prompt_style: PromptStyle | None = None,
        image_mode: str | None = None,
        name: str | None = None,
    ) -> None:
        check_engine_options(prompt_style=prompt_style, image_mode=image_mode, batch_size=batch_size)
        if max_batch_size is not None and (not isinstance(max_batch_size, int) or max_batch_size < 1):
            raise ConfigError(f"max_batch_size: expected a positive integer, got {max_batch_size!r}")
        preloaded = isinstance(model_or_path, LoadedModel)
        model_name = model_or_path.name if isinstance(model_or_path, LoadedModel) else model_or_path
        #: The settings used, each given, from the model's recipe or the default.
        self.inputs = resolve_inputs(
            model_name, adapter=None if preloaded else adapter, prompt_style=prompt_style, image_mode=image_mode, dtype=dtype,
            used=("prompt_style", "image_mode") if preloaded else ("prompt_style", "image_mode", "dtype"),
        )  # fmt: skip
        if isinstance(model_or_path, LoadedModel):
            loaded = model_or_path
        else:
            if device == "auto":
                from mmsafe.generate.distributed import process_info

                device = process_info().device or "auto"
            loaded = load_model(
                model_or_path,
                dtype=self.inputs.dtype,
                device=device,
                adapter=adapter,
                trust_remote_code=trust_remote_code,
            )
        check_template(self.inputs.recipe, loaded.processor, loaded.name)
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = loaded.tokenizer
        # Left padding: the next token of every row is predicted from the last column.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        #: True with ``batch_size="auto"``: the batch size adapts to out-of-memory errors.
        self.auto_batch_size = batch_size == "auto"
        if self.auto_batch_size:
            on_cuda = getattr(self.loaded.device, "type", str(self.loaded.device)) == "cuda"
            batch_size = max_batch_size or (AUTO_BATCH_SIZE_CUDA if on_cuda else AUTO_BATCH_SIZE_CPU)
        #: Most requests per forward pass (with ``auto``: the size it starts from).
        self.batch_size: int = batch_size  # type: ignore[assignment]
        #: Requests a caller best passes per :meth:`generate` call (a run's chunk size).
        self.preferred_batch_size = self.batch_size
        #: The batch size in use now (below ``batch_size`` after an out-of-memory error).
        self.current_batch_size = self.batch_size
        self._fits_in_a_row = 0
        self._grow_after = GROW_AFTER
        #: Prompt padding of every batch generated so far.
        self.padding = PaddingCount()
        self.prompt_style: PromptStyle = self.inputs.prompt_style  # type: ignore[assignment]
        self.image_mode = self.inputs.image_mode
        self.dtype = model_dtype(self.model) if preloaded else self.inputs.dtype
        self.adapter = None if adapter is None else str(adapter)
        self.name = name or (self.adapter if self.adapter else loaded.name)
        #: Can it be asked without an image? (PaliGemma's processor refuses text-only prompts.)
        self.accepts_text_only = accepts_text_only(self.processor)

    def __repr__(self) -> str:
        return f"HFEngine(name={self.name!r}, device={str(self.loaded.device)!r}, batch_size={self.batch_size})"

    def describe(self) -> dict[str, Any]:
        return {
            "type": "hf",
            "name": self.name,
            "model": self.loaded.name,
            "adapter": self.adapter,
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "device": str(self.loaded.device),
            "batch_size": "auto" if self.auto_batch_size else self.batch_size,
            **({"max_batch_size": self.batch_size} if self.auto_batch_size else {}),
            "prompt_style": self.prompt_style,
            "image_mode": self.image_mode,
            "recipe": None if self.inputs.recipe is None else self.inputs.recipe.path,
        }

    def render(self, request: GenerationRequest) -> str:
        """The prompt text for one request (the image token kept only if it has an image)."""
        return render_prompt(
            self.processor, request.messages, with_image=request.has_image, style=self.prompt_style, record=request.id
        )

    def _prepare_image(self, image: Any) -> Any:
        from mmsafe.data.images import prepare_image

        image_processor = getattr(self.processor, "image_processor", None)
        return prepare_image(image, self.image_mode, image_mean=getattr(image_processor, "image_mean", None))

    def context_limit(self) -> int | None:
        """The model's position count (its language model's, for a vision-language model)."""
        config = self.model.config
        limit = getattr(getattr(config, "text_config", None) or config, "max_position_embeddings", None)
        return limit if isinstance(limit, int) and limit > 0 else None

    def _generation_kwargs(self, params: DecodingParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "do_sample": params.do_sample,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        eos = self.model.generation_config.eos_token_id
        kwargs["eos_token_id"] = eos if eos is not None else self.tokenizer.eos_token_id
        if params.min_new_tokens:
            kwargs["min_new_tokens"] = params.min_new_tokens
        if params.do_sample:
            kwargs["temperature"] = params.temperature
            kwargs["top_p"] = params.top_p
        return kwargs

    def _generate_rows(
        self,
        requests: list[GenerationRequest],
        prompts: list[str],
        indices: list[int],
        with_images: bool,
        kwargs: dict[str, Any],
        device: Any,
        model_dtype: Any,
    ) -> tuple[list[str], int, int]:
        """The answers of the requests at ``indices`` (one forward batch), and its prompt padding (padded, total positions)."""
        import torch

        texts = [prompts[index] for index in indices]
        # One image list per prompt: the form every processor reads as "these images
        # belong to this prompt" (a flat list is all images of one prompt to some).
        images = [[self._prepare_image(requests[index].image)] for index in indices] if with_images else None
        options = tokenize_options(self.tokenizer, texts[0])
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True, **options)
        inputs = {key: value.to(device) for key, value in inputs.items() if key != "labels"}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(model_dtype)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **kwargs)
        # Rows are [left padding + prompt | new tokens]; the new tokens start after the
        # padded prompt width for every row alike.
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        mask = inputs.get("attention_mask")
        total = int(inputs["input_ids"].numel())
        padded = int((mask == 0).sum()) if mask is not None else 0
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True), padded, total

    def _shrink_after_out_of_memory(self, size: int) -> None:
        import torch

        self.current_batch_size = max(1, size // 2)
        self._fits_in_a_row = 0
        self._grow_after = min(GROW_AFTER_MAX, self._grow_after * 2)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.warning(
            "%s: out of GPU memory at batch size %d; retrying those prompts at %d",
            self.name,
            size,
            self.current_batch_size,
        )

    def _grow_after_fit(self) -> None:
        if self.current_batch_size >= self.batch_size:
            return
        self._fits_in_a_row += 1
        if self._fits_in_a_row >= self._grow_after:
            self.current_batch_size = min(self.batch_size, self.current_batch_size * 2)
            self._fits_in_a_row = 0
            logger.info("%s: batch size back up to %d", self.name, self.current_batch_size)

    def generate(self, requests: list[GenerationRequest], params: DecodingParams) -> list[str | FailedResponse]:
        """Answer every request; the i-th answer belongs to the i-th request."""
        import torch

        if not requests:
            return []
        for request in requests:
            request.check()
        prompts = [self.render(request) for request in requests]
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]]

        limit = self.context_limit()
        for request, length in zip(requests, lengths, strict=True):
            # A prompt past the model's positions fails deep in the forward pass, or first
            # tries to allocate an attention mask of length squared.
            if limit is not None and length > limit:
                raise DataError(
                    f"the prompt is {length:,} tokens, more than the {limit:,} positions the model reads",
                    record=request.id,
                    field="messages",
                )
        has_image = [request.has_image for request in requests]
        if not all(has_image) and not self.accepts_text_only:
            raise ConfigError(
                f"{self.loaded.name}: its processor ({type(self.processor).__name__}) takes no prompt without an image; use a blank image instead"
            )
        responses: list[str | None] = [None] * len(requests)
        kwargs = self._generation_kwargs(params)
        if params.do_sample:
            torch.manual_seed(params.seed)
        device = self.loaded.device
        model_dtype = next(self.model.parameters()).dtype
        for batch in plan_batches(lengths, has_image, self.batch_size):
            pending = list(batch.indices)
            while pending:
                size = min(self.current_batch_size, len(pending))
                part = pending[:size]
                try:
                    texts_out, padded, total = self._generate_rows(
                        requests, prompts, part, batch.with_images, kwargs, device, model_dtype
                    )
                except torch.cuda.OutOfMemoryError:
                    if not self.auto_batch_size or size == 1:
                        raise MmsafeError(
                            f"{self.name}: out of GPU memory generating {size} prompt(s) at once"
                            + ("" if self.auto_batch_size else "; try a smaller --batch-size, or --batch-size auto")
                        ) from None
                    texts_out = None
                if texts_out is None:  # outside the except block, so the failed batch's tensors are freed
                    self._shrink_after_out_of_memory(size)
                    continue
                for index, text in zip(part, texts_out, strict=True):
                    responses[index] = text.strip()
                self.padding.padded += padded
                self.padding.total += total
                pending = pending[size:]
                self._grow_after_fit()
        result: list[str | FailedResponse] = [text if text is not None else "" for text in responses]
        check_responses(requests, result, self.name)
        return result
