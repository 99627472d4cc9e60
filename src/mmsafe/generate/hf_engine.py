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

from mmsafe.errors import ConfigError, DataError
from mmsafe.generate.engine import DecodingParams, GenerationRequest, check_responses
from mmsafe.models.loading import LoadedModel, load_model
from mmsafe.models.prompts import PromptStyle, accepts_text_only, render_prompt, tokenize_options
from mmsafe.models.recipe import IMAGE_MODES, PROMPT_STYLES, check_template, model_dtype, resolve_inputs

logger = logging.getLogger(__name__)


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
        batch_size: requests per forward pass.
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
        batch_size: int = 16,
        trust_remote_code: bool = False,
        prompt_style: PromptStyle | None = None,
        image_mode: str | None = None,
        name: str | None = None,
    ) -> None:
        if prompt_style is not None and prompt_style not in PROMPT_STYLES:
            raise ConfigError(f"prompt_style: expected one of {', '.join(PROMPT_STYLES)}, got {prompt_style!r}")
        if image_mode is not None and image_mode not in IMAGE_MODES:
            raise ConfigError(f"image_mode: expected one of {', '.join(IMAGE_MODES)}, got {image_mode!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size: expected a positive integer, got {batch_size!r}")
        preloaded = isinstance(model_or_path, LoadedModel)
        model_name = model_or_path.name if preloaded else model_or_path  # type: ignore[union-attr]
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
            loaded = load_model(model_or_path, dtype=self.inputs.dtype, device=device, adapter=adapter, trust_remote_code=trust_remote_code)
        check_template(self.inputs.recipe, loaded.processor, loaded.name)
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = loaded.tokenizer
        # Left padding: the next token of every row is predicted from the last column.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batch_size = batch_size
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
            "batch_size": self.batch_size,
            "prompt_style": self.prompt_style,
            "image_mode": self.image_mode,
            "recipe": None if self.inputs.recipe is None else self.inputs.recipe.path,
        }

    def render(self, request: GenerationRequest) -> str:
        """The prompt text for one request (the image token kept only if it has an image)."""
        return render_prompt(self.processor, request.messages, with_image=request.has_image, style=self.prompt_style)

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

    def generate(self, requests: list[GenerationRequest], params: DecodingParams) -> list[str]:
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
                raise DataError(f"the prompt is {length:,} tokens, more than the {limit:,} positions the model reads", record=request.id, field="messages")
        has_image = [request.has_image for request in requests]
        if not all(has_image) and not self.accepts_text_only:
            raise ConfigError(f"{self.loaded.name}: its processor ({type(self.processor).__name__}) takes no prompt without an image; use a blank image instead")
        responses: list[str | None] = [None] * len(requests)
        kwargs = self._generation_kwargs(params)
        if params.do_sample:
            torch.manual_seed(params.seed)
        device = self.loaded.device
        model_dtype = next(self.model.parameters()).dtype
        for batch in plan_batches(lengths, has_image, self.batch_size):
            texts = [prompts[index] for index in batch.indices]
            # One image list per prompt: the form every processor reads as "these images
            # belong to this prompt" (a flat list is all images of one prompt to some).
            images = [[self._prepare_image(requests[index].image)] for index in batch.indices] if batch.with_images else None
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
            texts_out = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for index, text in zip(batch.indices, texts_out, strict=True):
                responses[index] = text.strip()
        result = [text if text is not None else "" for text in responses]
        check_responses(requests, result, self.name)
        return result
