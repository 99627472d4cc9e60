"""Text completion for the ``llm`` entity stage and the ``model`` rewrite stage.

Both stages only need ``complete(prompt) -> answer``. The adapters here turn the
generation engines (:mod:`mmsafe.generate`) into such a function, so the stages stay
testable with a plain fake and work with any engine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mmsafe.data.records import Message
from mmsafe.errors import ConfigError

logger = logging.getLogger(__name__)

Complete = Callable[[str], str]


def engine_completer(engine: Any, params: Any) -> Complete:
    """``complete`` through an :class:`~mmsafe.generate.engine.Engine` (one text-only request)."""
    from mmsafe.generate.engine import GenerationRequest, texts_or_raise

    def complete(prompt: str) -> str:
        request = GenerationRequest(id="build-data", messages=[Message("user", prompt)])
        return texts_or_raise(engine.generate([request], params), getattr(engine, "name", "engine"))[0]

    return complete


def chat_completer(engine: Any, params: Any) -> Complete:
    """``complete`` through an engine's ``chat(openai_messages, params)`` (the HTTP engine).

    A reply that held no text even after the engine's retries is logged and given to
    the stage as an empty answer, which each stage refuses per record: the entity stage
    counts the instruction as failed, the rewrite stage falls back to its template.
    """
    from mmsafe.generate.openai_engine import NoTextReply

    def complete(prompt: str) -> str:
        try:
            return engine.chat([{"role": "user", "content": prompt}], params)
        except NoTextReply as error:
            logger.warning("build-data: %s", error)
            return ""

    return complete


def make_completer(options: Any) -> Complete:
    """A completer from :class:`~mmsafe.synthesis.config.ModelOptions` (``engine``: openai or hf)."""
    from mmsafe.generate.engine import DecodingParams

    params = DecodingParams(
        max_new_tokens=options.max_new_tokens,
        do_sample=options.temperature > 0,
        temperature=options.temperature or 1.0,
        seed=options.seed,
    )
    if options.engine == "openai":
        from mmsafe.generate.openai_engine import OpenAIEngine

        if not options.base_url or not options.model:
            raise ConfigError(
                "engine openai needs base_url (e.g. http://localhost:8000/v1) and model (the served model's name)"
            )
        engine = OpenAIEngine(
            options.base_url,
            options.model,
            api_key_env=options.api_key_env,
            deadline=options.deadline,
            max_body_bytes=options.max_body_bytes,
        )
        return chat_completer(engine, params)
    if options.engine == "hf":
        from mmsafe.generate.hf_engine import HFEngine

        if not options.model:
            raise ConfigError("engine hf needs model (a checkpoint folder or Hub id)")
        return engine_completer(HFEngine(options.model, device=options.device), params)
    raise ConfigError(f"engine: expected 'openai' or 'hf', got {options.engine!r}")
