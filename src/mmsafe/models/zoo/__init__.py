"""Tiny offline checkpoints of the vision-language architectures mmsafe supports.

Each entry builds, deterministically from a seed, an ordinary Hugging Face checkpoint
directory (safetensors weights, processor, tokenizer) of one architecture: random
weights at a tiny size, the real model's processor settings scaled down (normalisation,
patch and merge sizes, image splitting), a tokenizer in the real one's form with the
model's special tokens, and a chat template written after the real one. They are the
conformance matrix of the test suite, and ``mmsafe models tiny --arch NAME`` writes one.

Builders import transformers lazily; ``build(name, out_dir)`` is the one entry point.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mmsafe.errors import ConfigError


@dataclass(frozen=True)
class Architecture:
    """One row of the conformance matrix: ``module:function`` builds it."""

    name: str
    title: str
    builder: str  # "module:function", the function taking (out_dir: Path, seed: int) -> None

    def load_builder(self) -> Callable[[Path, int], None]:
        module_name, function_name = self.builder.split(":")
        module = importlib.import_module(f"mmsafe.models.zoo.{module_name}")
        return getattr(module, function_name)


ARCHITECTURES: dict[str, Architecture] = {
    architecture.name: architecture
    for architecture in (
        Architecture("llava-1.5", "LLaVA-1.5 (Vicuna, legacy Llama tokenizer)", "llava:build_llava_15"),
        Architecture("llava-next", "LLaVA-NeXT (any-resolution tiles)", "llava:build_llava_next"),
        Architecture("llava-onevision", "LLaVA-OneVision (Qwen2 language model)", "llava:build_llava_onevision"),
        Architecture("qwen2-vl", "Qwen2-VL (M-RoPE)", "qwen_vl:build_qwen2_vl"),
        Architecture("qwen2.5-vl", "Qwen2.5-VL (M-RoPE, windowed vision)", "qwen_vl:build_qwen2_5_vl"),
        Architecture("qwen3-vl", "Qwen3-VL (interleaved M-RoPE, DeepStack)", "qwen_vl:build_qwen3_vl"),
        Architecture("gemma-3", "Gemma 3 (bidirectional image attention)", "gemma:build_gemma3"),
        Architecture("paligemma-2", "PaliGemma 2 (prefix-LM, no chat template)", "gemma:build_paligemma2"),
        Architecture("mllama", "Llama 3.2 Vision (cross-attention)", "mllama:build_mllama"),
        Architecture("mistral-3", "Mistral 3 (Pixtral vision, native image sizes)", "mistral3:build_mistral3"),
        Architecture("idefics3", "Idefics3 / SmolVLM (image splitting, text_model)", "idefics:build_idefics3"),
        Architecture("internvl3", "InternVL3 (pixel shuffle, Qwen2 language model)", "internvl:build_internvl3"),
        Architecture("lfm2-vl", "LFM2-VL (hybrid convolution + attention)", "lfm2_vl:build_lfm2_vl"),
    )
}


def build(name: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny checkpoint of architecture ``name`` to ``out_dir``; returns the folder."""
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; expected one of {', '.join(ARCHITECTURES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ARCHITECTURES[name].load_builder()(out, seed)
    (out / "mmsafe_tiny.json").write_text(
        json.dumps({"architecture": name, "seed": seed}, indent=2) + "\n", encoding="utf-8"
    )
    return out
