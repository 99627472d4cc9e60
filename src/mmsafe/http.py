"""One HTTP policy for every stage that talks to a server.

The OpenAI-compatible engine, the LLM judge, build-data's model stages and its Wikipedia
image source all send their requests through :func:`send`, under an :class:`HttpPolicy`
with hard bounds:

- ``deadline_s``: a total deadline per attempt, from connecting to the last byte of the
  body. Every socket read and write waits at most the time left before the deadline and
  the time is checked between body chunks, so a server that trickles a byte every second
  is cut off at the deadline (a per-read timeout alone would wait for ever).
- ``max_body_bytes``: the body is streamed and reading stops at the cap; the attempt
  fails naming the URL and the cap (a 1 GB reply never reaches memory).
- ``timeout_s``: the longest wait for one connect, read or write (within the deadline).
- retries (through tenacity) on 429, 408, 409, 5xx, timeouts, deadlines and dropped
  connections, with full-jitter exponential backoff (uniform in
  ``[0, min(backoff_max, backoff_base * 2**attempt)]``, so retrying clients spread out)
  and ``Retry-After`` honoured up to ``backoff_max``; other 4xx answers are not retried.
- redirects are not followed unless the policy says so.

Error messages quote at most a short excerpt of a body, with anything that looks like a
secret replaced by ``[redacted]`` (the API key in use, ``Authorization:`` values,
``Bearer`` tokens, ``sk-...`` keys): a proxy that echoes request headers in an error page
does not put the key on the terminal.
"""

from __future__ import annotations

import email.utils
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from mmsafe.errors import ConfigError, MmsafeError

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_DEADLINE_S = 300.0
#: Chat replies: a completion of a few thousand tokens is kilobytes; 64 MiB is far beyond any.
DEFAULT_MAX_BODY_BYTES = 64 * 2**20
EXCERPT_CHARS = 200
REDACTED = "[redacted]"


@dataclass(frozen=True)
class HttpPolicy:
    """The bounds and the retry schedule of one kind of request (see the module docstring)."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    """Longest wait for one connect, read or write (never longer than the time left before the deadline)."""
    deadline_s: float = DEFAULT_DEADLINE_S
    """Total seconds per attempt: connect, send, headers and the whole body."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """Largest response body read; a longer one fails the attempt (not retried)."""
    max_retries: int = 6
    """Retries after the first attempt."""
    backoff_base: float = 0.5
    """First backoff bound in seconds; doubles per retry."""
    backoff_max: float = 30.0
    """Longest wait between attempts, also the cap on ``Retry-After``."""
    follow_redirects: bool = False
    """Follow 3xx answers (off: a redirect is an error that is not retried)."""

    def __post_init__(self) -> None:
        if not self.timeout_s > 0 or not self.deadline_s > 0:
            raise ConfigError(
                f"timeout and deadline: expected seconds > 0, got {self.timeout_s!r} and {self.deadline_s!r}"
            )
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1:
            raise ConfigError(f"max_body_bytes: expected a positive integer, got {self.max_body_bytes!r}")
        if (
            not isinstance(self.max_retries, int)
            or self.max_retries < 0
            or self.backoff_base < 0
            or self.backoff_max < 0
        ):
            raise ConfigError("max_retries >= 0 and backoff values >= 0 are required")


class HttpError(MmsafeError):
    """One failed attempt (or the last of them).

    ``retryable``: another attempt may succeed. ``kind``: ``transport`` (timeout,
    deadline, connection), ``status`` (an HTTP error status), ``body`` (over the cap) or
    ``reply`` (a 200 answer whose content cannot be used, judged by the caller).
    """

    def __init__(
        self, message: str, *, retryable: bool, kind: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.kind = kind
        self.status = status
        self.retry_after = retry_after


class RetriesExhausted(HttpError):
    """Every attempt failed with a retryable error; ``last`` is the final one."""

    def __init__(self, message: str, last: HttpError, attempts: int) -> None:
        super().__init__(message, retryable=False, kind=last.kind, status=last.status)
        self.last = last
        self.attempts = attempts


@dataclass(frozen=True)
class Reply:
    """A response read whole (within the policy's bounds)."""

    status: int
    headers: Any
    body: bytes
    url: str

    def excerpt(self, secrets: Iterable[str] = ()) -> str:
        return excerpt(self.body, secrets)


# ---------------------------------------------------------------- small pieces


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


_SECRET_PATTERNS = (
    # Header-like "Authorization: Bearer abc", JSON "authorization": "Bearer abc", api_key=abc.
    re.compile(
        r"""(?i)((?:proxy-)?authorization|x-api-key|api[-_]?key|access[-_]?token)(["']?\s*[:=]\s*["']?)(?:(?:bearer|basic|token)\s+)?[^\s"',;}&]+"""
    ),
    re.compile(r"(?i)\b(bearer|basic|token)(\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"()()\bsk-[A-Za-z0-9_-]{4,}"),
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with the given secrets and anything that looks like a credential replaced by ``[redacted]``."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda match: f"{match.group(1)}{match.group(2)}{REDACTED}", text)
    return text


def excerpt(body: bytes | str, secrets: Iterable[str] = (), limit: int = EXCERPT_CHARS) -> str:
    """A short, redacted excerpt of a body for an error message, on one line (redacted before it is cut)."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes | bytearray) else body
    cut = " ".join(redact(text[: limit * 20], secrets).split())
    return cut[:limit] + ("..." if len(cut) > limit or len(text) > limit * 20 else "")


def _size(count: int) -> str:
    return f"{count / 2**20:g} MiB" if count >= 2**20 else f"{count} bytes"


# ---------------------------------------------------------------- the deadline on every socket operation

_current = threading.local()
_rng_lock = threading.Lock()


def _clamp(timeout: float | None) -> float | None:
    """``timeout`` cut to the time left before this thread's deadline (1 ms at least, so it times out)."""
    deadline = getattr(_current, "deadline", None)
    if deadline is None:
        return timeout
    left = max(deadline - time.monotonic(), 0.001)
    return left if timeout is None else min(timeout, left)


def _deadline_backend(inner: Any) -> Any:
    """An httpcore network backend whose streams wait at most until the calling thread's deadline.

    httpx reads each body chunk and each header block with the same fixed read timeout;
    clamping every socket operation is what makes the deadline hold while headers or
    a body trickle in byte by byte.
    """
    import httpcore

    class DeadlineStream(httpcore.NetworkStream):
        def __init__(self, stream: Any) -> None:
            self._stream = stream

        def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            return self._stream.read(max_bytes, _clamp(timeout))

        def write(self, buffer: bytes, timeout: float | None = None) -> None:
            self._stream.write(buffer, _clamp(timeout))

        def close(self) -> None:
            self._stream.close()

        def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None) -> Any:
            return DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, _clamp(timeout)))

        def get_extra_info(self, info: str) -> Any:
            return self._stream.get_extra_info(info)

    class DeadlineBackend(httpcore.NetworkBackend):
        def connect_tcp(
            self,
            host: str,
            port: int,
            timeout: float | None = None,
            local_address: str | None = None,
            socket_options: Any = None,
        ) -> Any:
            return DeadlineStream(inner.connect_tcp(host, port, _clamp(timeout), local_address, socket_options))

        def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> Any:
            return DeadlineStream(inner.connect_unix_socket(path, _clamp(timeout), socket_options))

        def sleep(self, seconds: float) -> None:
            inner.sleep(seconds)

    return DeadlineBackend()


def make_client(policy: HttpPolicy, *, headers: dict[str, str] | None = None, max_connections: int = 10) -> Any:
    """An ``httpx.Client`` for :func:`send`: the policy's redirects, pooled connections, clamped sockets."""
    import httpx

    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    client = httpx.Client(
        headers=headers,
        timeout=min(policy.timeout_s, policy.deadline_s),
        limits=limits,
        follow_redirects=policy.follow_redirects,
    )
    # httpx has no public hook for the network backend; its pools keep it in ``_network_backend``.
    transports = [client._transport, *(mount for mount in client._mounts.values() if mount is not None)]
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        if pool is not None and hasattr(pool, "_network_backend"):
            pool._network_backend = _deadline_backend(pool._network_backend)
        else:  # pragma: no cover - a future httpx; the deadline is then checked between chunks only
            logger.warning("http: cannot bound socket reads by the deadline with this httpx version")
    return client


# ---------------------------------------------------------------- one attempt, then retries


def fetch(client: Any, method: str, url: str, policy: HttpPolicy, **request: Any) -> Reply:
    """One attempt within the policy's deadline and body cap; raises :class:`HttpError` on a transport failure.

    Any status comes back as a :class:`Reply` (classifying it is :func:`send`'s job).
    """
    import httpx

    deadline = time.monotonic() + policy.deadline_s
    late = HttpError(
        f"{url}: timed out: no complete reply within the deadline of {policy.deadline_s:g} s (the deadline option)",
        retryable=True,
        kind="transport",
    )
    too_large = HttpError(
        f"{url}: reply body larger than the cap of {_size(policy.max_body_bytes)} (max_body_bytes); stopped reading",
        retryable=False,
        kind="body",
    )
    previous = getattr(_current, "deadline", None)
    _current.deadline = deadline
    try:
        timeout = httpx.Timeout(min(policy.timeout_s, policy.deadline_s))
        with client.stream(
            method, url, timeout=timeout, follow_redirects=policy.follow_redirects, **request
        ) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > policy.max_body_bytes:
                raise too_large
            chunks: list[bytes] = []
            size = 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > policy.max_body_bytes:
                    raise too_large
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise late
            if time.monotonic() > deadline:
                raise late
            return Reply(response.status_code, response.headers, b"".join(chunks), str(response.url))
    except httpx.TimeoutException:
        if time.monotonic() >= deadline - 0.01:
            raise late from None
        raise HttpError(f"{url}: timed out after {policy.timeout_s:g} s", retryable=True, kind="transport") from None
    except httpx.TransportError as error:
        if time.monotonic() >= deadline:
            raise late from None
        raise HttpError(f"{url}: connection error ({type(error).__name__})", retryable=True, kind="transport") from None
    finally:
        _current.deadline = previous


def send(
    client: Any,
    method: str,
    url: str,
    policy: HttpPolicy,
    *,
    label: str,
    accept: Callable[[Reply], Any] | None = None,
    secrets: Iterable[str] = (),
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
    before_attempt: Callable[[], None] | None = None,
    **request: Any,
) -> Any:
    """Send with retries; return ``accept(reply)`` for a 2xx reply (the reply itself without ``accept``).

    ``accept`` may raise :class:`HttpError` (``retryable=True`` to try again, e.g. a reply
    without text). Raises :class:`HttpError` at once for a status that retrying cannot
    fix (400, 401, 404, ...) or a body over the cap, and :class:`RetriesExhausted` naming
    ``label``, the attempts and the last problem when every attempt failed. Messages quote
    bodies only as redacted excerpts; ``secrets`` (the API key in use) are redacted too.
    """
    from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

    secrets = tuple(secret for secret in secrets if secret)
    rng = rng or random.Random()

    def attempt() -> Any:
        if before_attempt is not None:
            before_attempt()
        reply = fetch(client, method, url, policy, **request)
        if 200 <= reply.status < 300:
            return accept(reply) if accept is not None else reply
        if reply.status in RETRY_STATUSES:
            raise HttpError(
                f"HTTP {reply.status}",
                retryable=True,
                kind="status",
                status=reply.status,
                retry_after=parse_retry_after(reply.headers.get("Retry-After")),
            )
        raise HttpError(
            f"{label} failed with HTTP {reply.status}: {reply.excerpt(secrets)}",
            retryable=False,
            kind="status",
            status=reply.status,
        )

    def wait(state: RetryCallState) -> float:
        with _rng_lock:  # the engine's worker threads share one generator
            delay = backoff_delay(state.attempt_number - 1, policy.backoff_base, policy.backoff_max, rng)
        error = state.outcome.exception() if state.outcome is not None else None
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            delay = max(delay, min(retry_after, policy.backoff_max))
        return delay

    def log(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        logger.debug("%s: %s; retry %d of %d", label, _short(error, url), state.attempt_number, policy.max_retries)

    retrying = Retrying(
        stop=stop_after_attempt(policy.max_retries + 1),
        wait=wait,
        retry=retry_if_exception(lambda error: isinstance(error, HttpError) and error.retryable),
        sleep=sleep,
        before_sleep=log,
        reraise=True,
    )
    try:
        return retrying(attempt)
    except HttpError as error:
        if not error.retryable:
            raise
        attempts = policy.max_retries + 1
        raise RetriesExhausted(
            f"{label} failed after {attempts} attempts; last: {_short(error, url)}", error, attempts
        ) from None


def _short(error: BaseException | None, url: str) -> str:
    """An attempt's problem without the URL prefix (the final message names the URL once)."""
    return str(error).removeprefix(f"{url}: ") if error is not None else "no attempt"
