"""The OpenAI-compatible engine: chat completions over HTTP (vLLM, SGLang, hosted APIs).

This is how generation scales out: serve the model with any OpenAI-compatible server
and point the engine at it. Requests run in a bounded pool of threads and go through
:mod:`mmsafe.http`: a total deadline per attempt (``deadline``, connect to last byte),
a cap on the reply's size (``max_body_bytes``), no redirects, and retries with full-jitter
exponential backoff on 429, 5xx, timeouts and dropped connections, honouring
``Retry-After`` up to ``backoff_max``.

A 200 reply without text (``content`` null, missing or not a string, or a body that is
not a chat completion) is retried like a transient error; when it stays so,
:meth:`OpenAIEngine.generate` returns a :class:`~mmsafe.generate.engine.FailedResponse`
for that request (never an empty answer) and :meth:`OpenAIEngine.chat` raises
:class:`NoTextReply`. A failing server (every attempt a 5xx, a timeout or a connection
error) raises :class:`~mmsafe.errors.MmsafeError`, as does a reply over the size cap.

The API key is read from the environment variable named by ``api_key_env`` when a
request is sent; it is never stored in settings, logged, shown by ``repr`` or written
out, and error messages quote server bodies only as redacted excerpts.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mmsafe.data.records import IMAGE_TOKEN, Message
from mmsafe.errors import ConfigError, MmsafeError
from mmsafe.generate.engine import DecodingParams, FailedResponse, GenerationRequest, check_responses
from mmsafe.http import (
    DEFAULT_DEADLINE_S,
    DEFAULT_MAX_BODY_BYTES,
    RETRY_STATUSES,
    HttpError,
    HttpPolicy,
    Reply,
    RetriesExhausted,
    backoff_delay,
    excerpt,
    make_client,
    parse_retry_after,
    send,
)

logger = logging.getLogger(__name__)

__all__ = ["RETRY_STATUSES", "NoTextReply", "OpenAIEngine", "backoff_delay", "openai_messages", "parse_retry_after"]


class NoTextReply(MmsafeError):
    """Every attempt got a 200 reply without usable text (``content`` null, missing, not a string)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def image_data_url(image: Any) -> str:
    """A PIL image as a ``data:image/png;base64,...`` URL (lossless: the model sees every pixel)."""
    from mmsafe.data.images import image_data_url as encode

    return encode(image)


def openai_messages(messages: list[Message], image: Any | None) -> list[dict[str, Any]]:
    """OpenAI chat messages; the image becomes an ``image_url`` part where ``<image>`` stood.

    Without an image the token is dropped and every content is a plain string.
    """
    result: list[dict[str, Any]] = []
    for message in messages:
        text = message.content
        if IMAGE_TOKEN not in text:
            result.append({"role": message.role, "content": text})
            continue
        before, after = text.split(IMAGE_TOKEN, 1)
        if after.startswith("\n"):
            after = after[1:]
        if image is None:
            joined = (before.rstrip("\n") + ("\n" if before.strip() and after.strip() else "") + after).strip()
            result.append({"role": message.role, "content": joined})
            continue
        parts: list[dict[str, Any]] = []
        if before.strip():
            parts.append({"type": "text", "text": before.rstrip("\n")})
        parts.append({"type": "image_url", "image_url": {"url": image_data_url(image)}})
        if after.strip():
            parts.append({"type": "text", "text": after})
        result.append({"role": message.role, "content": parts})
    return result


class OpenAIEngine:
    """Generate through ``POST {base_url}/chat/completions``.

    Args:
        base_url: e.g. ``http://localhost:8000/v1`` for a local vLLM server.
        model: the served model's name (also written into response records).
        api_key_env: name of the environment variable holding the API key; when it is
            unset no ``Authorization`` header is sent (local servers need none).
        timeout: longest wait in seconds for one connect or read (within the deadline).
        max_retries: retries after the first attempt before giving up.
        concurrency: requests in flight at once.
        backoff_base, backoff_max: the backoff schedule (seconds), see :mod:`mmsafe.http`.
        deadline: total seconds per attempt, connect to the last byte of the reply
            (default 300; a server trickling bytes is cut off there).
        max_body_bytes: largest reply read (default 64 MiB); a longer one stops the run
            with an error naming the URL and the cap.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 6,
        concurrency: int = 8,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        deadline: float = DEFAULT_DEADLINE_S,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url: expected an http(s) URL such as http://localhost:8000/v1, got {base_url!r}")
        if not model:
            raise ConfigError("model: expected the served model's name")
        if concurrency < 1 or max_retries < 0 or timeout <= 0 or backoff_base < 0 or backoff_max < 0:
            raise ConfigError("concurrency >= 1, max_retries >= 0, timeout > 0 and backoff values >= 0 are required")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.deadline = deadline
        self.max_body_bytes = max_body_bytes
        self.policy = HttpPolicy(
            timeout_s=timeout,
            deadline_s=deadline,
            max_body_bytes=max_body_bytes,
            max_retries=max_retries,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            follow_redirects=False,
        )
        self._sleep: Callable[[float], None] = time.sleep
        self._rng = random.Random()
        self._http: Any = None
        self._client_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAIEngine(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def describe(self) -> dict[str, Any]:
        """Settings for the run's config file: the key's variable name, never its value."""
        return {
            "type": "openai",
            "name": self.name,
            "base_url": self.base_url,
            "model": self.model,
            "api_key_env": self.api_key_env,
            "timeout": self.timeout,
            "deadline": self.deadline,
            "max_body_bytes": self.max_body_bytes,
            "max_retries": self.max_retries,
            "concurrency": self.concurrency,
        }

    def _client(self) -> Any:
        """The HTTP client, shared by the worker threads (httpx clients are thread-safe)."""
        with self._client_lock:
            if self._http is None:
                self._http = make_client(self.policy, max_connections=self.concurrency)
            return self._http

    def close(self) -> None:
        """Close the pooled connections (the engine stays usable; a new client opens on demand)."""
        with self._client_lock:
            if self._http is not None:
                self._http.close()
                self._http = None

    def _key(self) -> str | None:
        return (os.environ.get(self.api_key_env) or None) if self.api_key_env else None

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = self._key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def payload(self, messages: list[dict[str, Any]], params: DecodingParams) -> dict[str, Any]:
        """The request body. Greedy decoding is temperature 0 on OpenAI-style servers."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature if params.do_sample else 0.0,
            "top_p": params.top_p if params.do_sample else 1.0,
            "seed": params.seed,
        }
        if params.min_new_tokens:
            body["min_tokens"] = params.min_new_tokens  # a vLLM / SGLang extension
        return body

    def chat(self, messages: list[dict[str, Any]], params: DecodingParams, *, request_id: str | None = None) -> str:
        """Send OpenAI-format ``messages``; return the assistant's text (stripped).

        Retries as described in the module docstring. Raises :class:`NoTextReply` when
        every attempt got a reply without text, :class:`MmsafeError` naming the request
        and the last problem when every attempt failed otherwise, and at once on a
        status that retrying cannot fix (400, 401, 404, ...) or a reply over the cap.
        """
        url = f"{self.base_url}/chat/completions"
        label = f"{self.base_url}: " + (f"request {request_id!r}" if request_id is not None else "chat request")
        key = self._key()
        secrets = (key,) if key else ()
        try:
            return send(
                self._client(),
                "POST",
                url,
                self.policy,
                label=label,
                accept=lambda reply: self._text(reply, secrets),
                secrets=secrets,
                sleep=lambda seconds: self._sleep(seconds),
                rng=self._rng,
                json=self.payload(messages, params),
                headers=self._headers(),
            )
        except RetriesExhausted as error:
            if error.kind == "reply":
                raise NoTextReply(str(error), str(error.last)) from None
            raise

    @staticmethod
    def _text(reply: Reply, secrets: tuple[str, ...] = ()) -> str:
        """The assistant's text; a reply without one is a retryable :class:`HttpError` of kind ``reply``."""
        from mmsafe.data.jsonl import loads_bounded

        try:
            content = loads_bounded(reply.body, "the reply")["choices"][0]["message"]["content"]
        except MmsafeError as error:  # nested too deep to parse: an unusable reply like any other
            raise HttpError(str(error), retryable=True, kind="reply") from None
        except (ValueError, KeyError, IndexError, TypeError):
            raise HttpError(
                f"expected a chat completion with choices[0].message.content, got {excerpt(reply.body, secrets)!r}",
                retryable=True,
                kind="reply",
            ) from None
        if not isinstance(content, str):
            found = "null" if content is None else type(content).__name__
            raise HttpError(
                f"the reply has no text (choices[0].message.content is {found})", retryable=True, kind="reply"
            )
        return content.strip()

    def generate(self, requests: list[GenerationRequest], params: DecodingParams) -> list[str | FailedResponse]:
        """Answer every request (``concurrency`` at a time); answers in request order.

        A request whose replies never held text gets a :class:`FailedResponse`; any
        other failure raises.
        """
        if not requests:
            return []
        for request in requests:
            request.check()

        def answer(request: GenerationRequest) -> str | FailedResponse:
            try:
                return self.chat(openai_messages(request.messages, request.image), params, request_id=request.id)
            except NoTextReply as error:
                logger.warning("%s", error)
                return FailedResponse(request.id, error.reason)

        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            responses = list(pool.map(answer, requests))
        check_responses(requests, responses, self.name)
        return responses
