"""Generation: engines (in-process Hugging Face or vLLM, OpenAI-compatible HTTP), resumable runs, blind responses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmsafe.generate.engine import DecodingParams, Engine, GenerationRequest, requests_from_records

#: The engines that run the model in this process (``openai`` talks to a server instead).
LOCAL_ENGINES = ("hf", "vllm")


def local_engine(
    kind: str,
    model: Any,
    *,
    dtype: str | None = None,
    device: str = "auto",
    adapter: str | Path | None = None,
    batch_size: int | str = 16,
    prompt_style: Any = None,
    image_mode: Any = None,
    trust_remote_code: bool = False,
    vllm_options: dict[str, Any] | None = None,
) -> Any:
    """An in-process engine: ``hf`` (:class:`~mmsafe.generate.hf_engine.HFEngine`) or ``vllm``
    (:class:`~mmsafe.generate.vllm_engine.VLLMEngine`, options such as ``max_model_len`` in ``vllm_options``).

    Either has ``preferred_batch_size``: the number of requests to pass per call (what
    ``batch_size="auto"`` resolved to).
    """
    from mmsafe.errors import ConfigError

    if kind == "hf":
        from mmsafe.generate.hf_engine import HFEngine

        if vllm_options:
            raise ConfigError(f"{', '.join(sorted(vllm_options))}: vllm engine options, but the engine is hf")
        return HFEngine(
            model,
            dtype=dtype,
            device=device,
            adapter=adapter,
            batch_size=batch_size,
            trust_remote_code=trust_remote_code,
            prompt_style=prompt_style,
            image_mode=image_mode,
        )
    if kind == "vllm":
        from mmsafe.generate.vllm_engine import VLLMEngine

        if adapter is not None:
            raise ConfigError(
                "the vllm engine takes no --adapter: merge the LoRA adapter into the model first (train with merge_lora), or use --engine hf"
            )
        if device not in ("auto", "cuda"):
            raise ConfigError(
                f"the vllm engine runs on the GPUs vLLM finds (CUDA_VISIBLE_DEVICES); device {device!r} cannot be chosen (use --engine hf)"
            )
        return VLLMEngine(
            model,
            dtype=dtype,
            batch_size=batch_size,
            prompt_style=prompt_style,
            image_mode=image_mode,
            trust_remote_code=trust_remote_code,
            **(vllm_options or {}),
        )
    raise ConfigError(f"engine: expected one of {', '.join(LOCAL_ENGINES)}, got {kind!r}")


__all__ = ["LOCAL_ENGINES", "DecodingParams", "Engine", "GenerationRequest", "local_engine", "requests_from_records"]
