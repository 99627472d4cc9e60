"""The OpenAI-compatible engine: chat completions over HTTP (vLLM, SGLang, hosted APIs).

This is how generation scales out: serve the model with any OpenAI-compatible server
and point the engine at it. Requests run in a bounded pool of threads; a request that
meets a rate limit (429), a server error (5xx), a timeout or a dropped connection is
retried with exponential backoff and full jitter (a uniform wait in
``[0, min(backoff_max, backoff_base * 2**attempt)]``, so retrying clients spread out
instead of hitting the server in waves), honouring ``Retry-After`` up to ``backoff_max``.

The API key is read from the environment variable named by ``api_key_env`` when a
request is sent; it is never stored in settings, logged, shown by ``repr`` or written out.
"""

from __future__ import annotations

import base64
import email.utils
import io
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
from mmsafe.generate.engine import DecodingParams, GenerationRequest, check_responses

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in ``[0, min(cap, base * 2**attempt)]``.

    With base 0.5 and cap 30: attempt 0 waits up to 0.5 s, attempt 3 up to 4 s,
    attempt 6 and later up to 30 s.
    """
    return rng.uniform(0.0, min(cap, base * (2**attempt)))


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def image_data_url(image: Any) -> str:
    """A PIL image as a ``data:image/png;base64,...`` URL."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


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
        timeout: seconds per HTTP request.
        max_retries: retries after the first attempt before giving up.
        concurrency: requests in flight at once.
        backoff_base, backoff_max: the backoff schedule (seconds), see the module docstring.
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
        self._sleep: Callable[[float], None] = time.sleep
        self._rng = random.Random()
        self._rng_lock = threading.Lock()
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
            "max_retries": self.max_retries,
            "concurrency": self.concurrency,
        }

    def _client(self) -> Any:
        """The HTTP client, shared by the worker threads (httpx clients are thread-safe)."""
        import httpx

        with self._client_lock:
            if self._http is None:
                limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
                self._http = httpx.Client(timeout=self.timeout, limits=limits)
            return self._http

    def close(self) -> None:
        """Close the pooled connections (the engine stays usable; a new client opens on demand)."""
        with self._client_lock:
            if self._http is not None:
                self._http.close()
                self._http = None

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
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

    def _wait(self, attempt: int, retry_after: float | None) -> None:
        with self._rng_lock:
            delay = backoff_delay(attempt, self.backoff_base, self.backoff_max, self._rng)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        self._sleep(delay)

    def chat(self, messages: list[dict[str, Any]], params: DecodingParams, *, request_id: str | None = None) -> str:
        """Send OpenAI-format ``messages``; return the assistant's text.

        Retries as described in the module docstring; raises :class:`MmsafeError` naming
        the request and the last status when every attempt failed, or at once on a
        status that retrying cannot fix (400, 401, 404, ...).
        """
        import httpx

        url = f"{self.base_url}/chat/completions"
        body = self.payload(messages, params)
        label = f"request {request_id!r}" if request_id is not None else "chat request"
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                response = self._client().post(url, json=body, headers=self._headers())
            except httpx.TimeoutException:
                last = f"timed out after {self.timeout:g} s"
            except httpx.TransportError as error:
                last = f"connection error ({type(error).__name__})"
            else:
                if response.status_code == 200:
                    return self._text(response, label)
                last = f"HTTP {response.status_code}"
                if response.status_code not in RETRY_STATUSES:
                    raise MmsafeError(f"{self.base_url}: {label} failed with {last}: {response.text[:300]}")
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if attempt < self.max_retries:
                logger.debug("%s: %s; retry %d of %d", label, last, attempt + 1, self.max_retries)
                self._wait(attempt, retry_after)
        raise MmsafeError(f"{self.base_url}: {label} failed after {self.max_retries + 1} attempts; last: {last}")

    def _text(self, response: Any, label: str) -> str:
        try:
            data = response.json()
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise MmsafeError(f"{self.base_url}: {label}: expected a chat completion with choices[0].message.content, got {response.text[:300]!r}") from None
        if content is None:
            return ""
        if not isinstance(content, str):
            raise MmsafeError(f"{self.base_url}: {label}: expected string content, got {type(content).__name__}")
        return content.strip()

    def generate(self, requests: list[GenerationRequest], params: DecodingParams) -> list[str]:
        """Answer every request (``concurrency`` at a time); answers in request order."""
        if not requests:
            return []
        for request in requests:
            request.check()

        def answer(request: GenerationRequest) -> str:
            return self.chat(openai_messages(request.messages, request.image), params, request_id=request.id)

        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            responses = list(pool.map(answer, requests))
        check_responses(requests, responses, self.name)
        return responses
