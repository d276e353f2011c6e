"""HTTP byte ranges: merge the ones worth reading in one request, download one with retries and resume.

Requests go through huggingface_hub's shared HTTP session, so proxies, user agent and redirects behave
as in the client itself (httpx2 drops the Authorization header when a redirect leaves the Hub's origin).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO, TypeVar

import httpx2
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import get_session, hf_raise_for_status

from voxtral_coreml.pipeline.errors import VoxtralError

logger = logging.getLogger(__name__)

# What huggingface_hub itself retries (its utils/_http.py): throttling, 5xx, dropped or stalled connections.
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
TRANSIENT_ERRORS = (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)

T = TypeVar("T")


@dataclass(frozen=True)
class ByteRange:
    begin: int
    end: int  # exclusive

    @property
    def size(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try before a network failure becomes a VoxtralError."""

    attempts: int = 6  # consecutive failed tries of one request (a try that received data resets the count)
    base_wait: float = 1.0  # seconds before the first retry, doubled after each failure
    max_wait: float = 30.0
    timeout: float = 60.0  # seconds without any data before a request counts as stalled

    def wait(self, failures: int) -> float:
        return min(self.max_wait, self.base_wait * 2 ** (failures - 1))


class _Retryable(Exception):
    """A failure worth another try: a 5xx/429 answer or a body cut short."""


def merge_ranges(spans: Iterable[tuple[int, int]], max_gap: int) -> list[ByteRange]:
    """Sorted, disjoint ranges covering `spans`; spans at most `max_gap` bytes apart share one range.

    Reading a small gap costs less than another request's round trip, so near neighbours are merged.
    """
    merged: list[ByteRange] = []
    for begin, end in sorted(s for s in spans if s[1] > s[0]):
        if merged and begin - merged[-1].end <= max_gap:
            merged[-1] = ByteRange(merged[-1].begin, max(merged[-1].end, end))
        else:
            merged.append(ByteRange(begin, end))
    return merged


def with_retries(call: Callable[[], T], policy: RetryPolicy, what: str) -> T:
    """Run a Hub call, retrying transient failures (client errors such as 404 pass through at once)."""
    failures = 0
    while True:
        try:
            return call()
        except (*TRANSIENT_ERRORS, HfHubHTTPError) as e:
            if isinstance(e, HfHubHTTPError) and e.response.status_code not in RETRY_STATUS:
                raise
            failures += 1
            _give_up_or_wait(policy, failures, what, e)


def download_range(
    url: str,
    headers: dict[str, str],
    rng: ByteRange,
    sink: BinaryIO,
    policy: RetryPolicy,
    source: str,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> None:
    """Append the bytes of `rng` that `sink` does not hold yet; `sink.tell()` is how many it holds.

    A dropped or stalled transfer resumes from the last byte written, so nothing is fetched twice.
    """
    failures = 0
    while (have := sink.tell()) < rng.size:
        try:
            rest = ByteRange(rng.begin + have, rng.end)
            _stream_once(url, headers, rest, sink, policy.timeout, source, on_bytes)
        except (*TRANSIENT_ERRORS, _Retryable) as e:
            # Received data proves the link works: restart the count, as huggingface_hub's http_get does.
            failures = 1 if sink.tell() > have else failures + 1
            _give_up_or_wait(policy, failures, f"{source} bytes {rng.begin}-{rng.end - 1}", e)


def _host_unknown(error: Exception) -> bool:
    # A name that does not resolve will not resolve in a minute either (offline, or a mistyped HF_ENDPOINT).
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, socket.gaierror):
        cause = cause.__cause__ or cause.__context__
    return isinstance(error, httpx2.ConnectError) and cause is not None


def _give_up_or_wait(policy: RetryPolicy, failures: int, what: str, error: Exception) -> None:
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}"
    if _host_unknown(error):
        raise VoxtralError(f"{what}: cannot reach the Hub ({reason}); check the network or HF_ENDPOINT") from error
    if failures >= policy.attempts:
        raise VoxtralError(f"{what}: giving up after {failures} failed attempts ({reason})") from error
    wait = policy.wait(failures)
    logger.warning("%s: %s; retry %d/%d in %.1fs", what, reason, failures, policy.attempts - 1, wait)
    time.sleep(wait)


def _stream_once(
    url: str,
    headers: dict[str, str],
    rng: ByteRange,
    sink: BinaryIO,
    timeout: float,
    source: str,
    on_bytes: Callable[[int], None],
) -> None:
    # identity: a compressed answer would make byte counts meaningless (and CDNs may then ignore Range).
    request_headers = {**headers, "Range": f"bytes={rng.begin}-{rng.end - 1}", "Accept-Encoding": "identity"}
    session = get_session()
    with session.stream("GET", url, headers=request_headers, timeout=timeout, follow_redirects=True) as response:
        if response.status_code in RETRY_STATUS:
            raise _Retryable(f"HTTP {response.status_code}")
        hf_raise_for_status(response)
        _check_partial_content(response, rng, source)
        received = 0
        # No chunk_size: chunks are written as they arrive, and flushed, so neither a drop nor a killed
        # process loses anything already received (the OS holds what was flushed).
        for chunk in response.iter_bytes():
            received += len(chunk)
            if received > rng.size:
                raise VoxtralError(f"{source}: server sent more than the {rng.size} bytes asked")
            sink.write(chunk)
            sink.flush()
            on_bytes(len(chunk))
    if received < rng.size:
        raise _Retryable(f"connection closed after {received} of {rng.size} bytes")


def _check_partial_content(response: httpx2.Response, rng: ByteRange, source: str) -> None:
    content_range = response.headers.get("Content-Range", "")
    expected = f"bytes {rng.begin}-{rng.end - 1}/"
    if response.status_code != 206 or not content_range.startswith(expected):
        raise VoxtralError(
            f"{source}: asked bytes {rng.begin}-{rng.end - 1}, server answered HTTP {response.status_code} "
            f"with Content-Range {content_range!r} (it must support Range requests)"
        )
