"""The typed options of ``mmsafe models tiny``."""

from __future__ import annotations

from dataclasses import dataclass

from mmsafe.config import option


@dataclass(kw_only=True)
class TinyModelConfig:
    """mmsafe models tiny: build a tiny offline checkpoint (the byte-level LLaVA, or an architecture of the conformance matrix)."""

    out: str = option(help="folder to write the checkpoint to")
    seed: int = option(0, help="random seed for weights")
    arch: str | None = option(
        None,
        help="an architecture of the conformance matrix (llava-1.5, qwen2.5-vl, gemma-3, ...)",
        default_text="the byte-level tiny LLaVA",
    )
