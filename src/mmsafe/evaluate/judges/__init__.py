"""Judges: turn a model's response into ``safe`` / ``unsafe`` / ``unparseable``.

Built in: ``refusal`` (keyword match; measures refusal), ``llama-guard`` (Llama Guard 3,
in-process) and ``llm`` (an OpenAI-compatible chat model with a versioned rubric).
``get_judge(name, **options)`` builds one; third parties register through
:func:`register_judge` or the ``mmsafe.judges`` entry-point group.
"""

from __future__ import annotations

import inspect
from typing import Any

from mmsafe.errors import ConfigError
from mmsafe.evaluate.judges.base import (
    ENTRY_POINT_GROUP,
    JUDGES,
    Judge,
    JudgeInput,
    Verdict,
    available_judges,
    get_judge,
    register_judge,
)


def _construct(cls: Any, name: str, options: dict[str, Any]) -> Judge:
    """``cls(**options)``, with an unknown option reported as a ConfigError naming the valid ones."""
    parameters = inspect.signature(cls).parameters
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        valid = ", ".join(key for key in parameters if not key.startswith("_"))
        raise ConfigError(f"judge {name!r} has no option {', '.join(unknown)}; its options: {valid}")
    return cls(**options)


# Factories import their module on use, so building the refusal judge never imports
# transformers or httpx.
def _refusal(**options: Any) -> Judge:
    """Keyword match on the response: a refusal is safe (measures refusal)."""
    from mmsafe.evaluate.judges.refusal import RefusalJudge

    return _construct(RefusalJudge, "refusal", options)


def _llama_guard(**options: Any) -> Judge:
    """Llama Guard 3, in-process (the 11B Vision model reads the image)."""
    from mmsafe.evaluate.judges.llama_guard import LlamaGuardJudge

    return _construct(LlamaGuardJudge, "llama-guard", options)


def _llm(**options: Any) -> Judge:
    """An OpenAI-compatible chat model with a versioned rubric."""
    from mmsafe.evaluate.judges.llm import LlmJudge

    return _construct(LlmJudge, "llm", options)


register_judge("refusal", _refusal)
register_judge("llama-guard", _llama_guard)
register_judge("llm", _llm)

__all__ = [
    "ENTRY_POINT_GROUP",
    "JUDGES",
    "Judge",
    "JudgeInput",
    "Verdict",
    "available_judges",
    "get_judge",
    "register_judge",
]
