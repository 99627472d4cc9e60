"""The in-process vLLM engine: generation at benchmark scale on a GPU.

vLLM's offline API (``vllm.LLM(...).generate``) schedules the prompts itself (continuous
batching, paged attention: no padding), so one call may hold hundreds of prompts. The
prompts are rendered here with the same template as the Hugging Face engine and training
(:func:`mmsafe.models.prompts.render_prompt`, the model's input recipe), and images are
prepared the same way (``image_mode``), so the two engines ask the model the same thing.
Answers come back in the order of the requests; a request vLLM returns no text for is a
:class:`~mmsafe.generate.engine.FailedResponse` (the run asks it again on a rerun).

vLLM is an optional dependency: ``pip install "mmsafe[serve]"`` (Linux, CUDA).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mmsafe.errors import ConfigError, MmsafeError
from mmsafe.generate.engine import (
    DecodingParams,
    FailedResponse,
    GenerationRequest,
    check_engine_options,
    check_responses,
)
from mmsafe.models.prompts import PromptStyle, accepts_text_only, render_prompt, stop_token_ids
from mmsafe.models.recipe import check_template, resolve_inputs

logger = logging.getLogger(__name__)

#: ``batch_size="auto"`` for vLLM: prompts handed to one ``generate`` call (and written
#: together). vLLM fits as many as memory allows at a time and queues the rest.
AUTO_BATCH_SIZE = 256


def import_vllm() -> Any:
    """The ``vllm`` module, or one clear error saying how to install it."""
    try:
        import vllm
    except ImportError:
        raise ConfigError(
            'the vllm engine needs vLLM, which is not installed: pip install "mmsafe[serve]" (Linux with a CUDA GPU), or use --engine hf'
        ) from None
    return vllm


def sampling_options(params: DecodingParams, stop_ids: list[int]) -> dict[str, Any]:
    """vLLM ``SamplingParams`` keywords for ``params``: greedy is temperature 0 (top_p 1)."""
    return {
        "n": 1,
        "max_tokens": params.max_new_tokens,
        "min_tokens": params.min_new_tokens,
        "temperature": params.temperature if params.do_sample else 0.0,
        "top_p": params.top_p if params.do_sample else 1.0,
        "seed": params.seed,
        "stop_token_ids": stop_ids,
        "skip_special_tokens": True,
    }


class VLLMEngine:
    """Generate with vLLM's offline engine in this process.

    Args:
        model: a checkpoint directory (safetensors) or Hub id. A LoRA adapter must be
            merged first (training's ``merge_lora``), or use the Hugging Face engine.
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16`` (None: the model's input recipe, else auto).
        batch_size: prompts per ``generate`` call (also per written batch); ``auto``: :data:`AUTO_BATCH_SIZE`.
        max_model_len: context length vLLM reserves memory for (None: the model's).
        tensor_parallel_size: GPUs the model is split over.
        gpu_memory_utilization: share of GPU memory vLLM may take (weights + KV cache).
        prompt_style, image_mode: as for :class:`~mmsafe.generate.hf_engine.HFEngine`
            (None: the model's input recipe, else the defaults).
        name: the model name written into response records (default: ``model``).
        llm_options: further ``vllm.LLM`` keywords (``enforce_eager``, ``max_num_seqs``, ...).
    """

    def __init__(
        self,
        model: str | Path,
        *,
        dtype: str | None = None,
        batch_size: int | str = "auto",
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        prompt_style: PromptStyle | None = None,
        image_mode: str | None = None,
        trust_remote_code: bool = False,
        name: str | None = None,
        **llm_options: Any,
    ) -> None:
        check_engine_options(prompt_style=prompt_style, image_mode=image_mode, batch_size=batch_size)
        if max_model_len is not None and (not isinstance(max_model_len, int) or max_model_len < 1):
            raise ConfigError(f"max_model_len: expected a positive integer, got {max_model_len!r}")
        if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size: expected a positive integer, got {tensor_parallel_size!r}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization: expected a number in (0, 1], got {gpu_memory_utilization!r}")
        vllm = import_vllm()  # before any loading: a missing vLLM fails in a second
        from mmsafe.models.loading import check_safetensors, load_processor

        self._vllm = vllm
        self.model_path = str(model)
        if Path(model).is_dir():
            check_safetensors(Path(model))  # safetensors only, as for the Hugging Face engine
        self.inputs = resolve_inputs(
            self.model_path,
            prompt_style=prompt_style,
            image_mode=image_mode,
            dtype=dtype,
            used=("prompt_style", "image_mode", "dtype"),
        )
        self.processor = load_processor(self.model_path, trust_remote_code=trust_remote_code)
        check_template(self.inputs.recipe, self.processor, self.model_path)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.prompt_style: PromptStyle = self.inputs.prompt_style  # type: ignore[assignment]
        self.image_mode = self.inputs.image_mode
        self.dtype = self.inputs.dtype
        self.batch_size = AUTO_BATCH_SIZE if batch_size == "auto" else int(batch_size)
        #: Requests a caller best passes per :meth:`generate` call (a run's chunk size).
        self.preferred_batch_size = self.batch_size
        self.max_model_len = max_model_len
        self.tensor_parallel_size = tensor_parallel_size
        self.gpu_memory_utilization = gpu_memory_utilization
        self.name = name or self.model_path
        self.accepts_text_only = accepts_text_only(self.processor)
        self.llm_options = dict(llm_options)
        self.llm_options.setdefault("load_format", "safetensors")  # never unpickle weights
        self.llm = vllm.LLM(
            model=self.model_path,
            dtype=self.dtype,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            limit_mm_per_prompt={"image": 1},
            trust_remote_code=trust_remote_code,
            **self.llm_options,
        )
        generation_config = None
        try:
            from transformers import GenerationConfig

            generation_config = GenerationConfig.from_pretrained(self.model_path)
        except (OSError, ValueError):
            pass  # no generation_config.json: the tokenizer's end-of-sequence token alone
        self.stop_ids = stop_token_ids(self.tokenizer, generation_config)

    def __repr__(self) -> str:
        return f"VLLMEngine(name={self.name!r}, model={self.model_path!r}, batch_size={self.batch_size})"

    def describe(self) -> dict[str, Any]:
        return {
            "type": "vllm",
            "name": self.name,
            "model": self.model_path,
            "vllm": getattr(self._vllm, "__version__", None),
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "max_model_len": self.max_model_len,
            "tensor_parallel_size": self.tensor_parallel_size,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "prompt_style": self.prompt_style,
            "image_mode": self.image_mode,
            "recipe": None if self.inputs.recipe is None else self.inputs.recipe.path,
            **({"llm_options": self.llm_options} if self.llm_options else {}),
        }

    def render(self, request: GenerationRequest) -> str:
        """The prompt text for one request (as the Hugging Face engine renders it)."""
        return render_prompt(self.processor, request.messages, with_image=request.has_image, style=self.prompt_style)

    def _prepare_image(self, image: Any) -> Any:
        from mmsafe.data.images import prepare_image

        image_processor = getattr(self.processor, "image_processor", None)
        return prepare_image(image, self.image_mode, image_mean=getattr(image_processor, "image_mean", None))

    def prompt_inputs(self, request: GenerationRequest) -> dict[str, Any]:
        """vLLM's prompt dict for one request: the rendered text and, if any, its image."""
        request.check()
        prompt: dict[str, Any] = {"prompt": self.render(request)}
        if request.image is not None:
            prompt["multi_modal_data"] = {"image": self._prepare_image(request.image)}
        return prompt

    def generate(self, requests: list[GenerationRequest], params: DecodingParams) -> list[str | FailedResponse]:
        """Answer every request in one vLLM call; the i-th answer belongs to the i-th request."""
        if not requests:
            return []
        if not self.accepts_text_only and not all(request.has_image for request in requests):
            raise ConfigError(
                f"{self.model_path}: its processor ({type(self.processor).__name__}) takes no prompt without an image; use a blank image instead"
            )
        prompts = [self.prompt_inputs(request) for request in requests]
        sampling = self._vllm.SamplingParams(**sampling_options(params, self.stop_ids))
        outputs = self.llm.generate(prompts, sampling, use_tqdm=False)
        if len(outputs) != len(requests):
            raise MmsafeError(f"vllm returned {len(outputs)} outputs for {len(requests)} prompts")
        responses: list[str | FailedResponse] = []
        for request, output in zip(requests, outputs, strict=True):
            completions = getattr(output, "outputs", None) or []
            text = getattr(completions[0], "text", None) if completions else None
            if isinstance(text, str):
                responses.append(text.strip())
            else:
                responses.append(FailedResponse(request.id, "vllm returned no text for this prompt"))
        check_responses(requests, responses, self.name)
        return responses
