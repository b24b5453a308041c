"""``Upstream``: the HTTP client for an OpenAI-compatible ``/chat/completions`` endpoint."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from producer._exceptions import (
    UpstreamBadResponse,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamStatusError,
    UpstreamStreamBroken,
    UpstreamTimeout,
)

from .limiter import AdaptiveLimit, Verdict
from .policy import RetryPolicy, parse_retry_after
from .raw import ChunkAssembler, RawCompletion, chunks_from_completion, parse_raw
from .responses import (
    Completion,
    Failure,
    FailureKind,
    SseParser,
    StreamReader,
    parse_completion,
    provider_error,
)

logger = logging.getLogger("coalesce.upstream")

_REDACTED = "***"
_DEFAULT_RETRY = RetryPolicy()  # frozen, so one shared default is safe
# Statuses that mean "this input was refused", not "the service is unusable".
REJECTED_STATUSES = frozenset({400, 413, 422})
# A server that does not stream may refuse ``stream`` with one of these.
_STREAM_REFUSED_STATUSES = frozenset({400, 422})

Messages = list[dict[str, str]]
_Send = Callable[[], Awaitable[Completion | Failure]]
# Told of every HTTP attempt: (model, status code or error kind), e.g. for metrics.
Observer = Callable[[str, int | str], None]


@dataclass
class _Progress:
    """One logical call across its tries, for backoff and for error messages."""

    started: float
    model: str = ""
    tries: int = 0  # tries that got a slot and were sent
    failures: int = 0
    last: Failure | None = None


@dataclass
class _StreamState:
    """What the current streaming try has delivered to ``on_text`` so far."""

    reader: StreamReader | None = None

    @property
    def partial(self) -> str:
        return self.reader.text if self.reader is not None else ""


@dataclass
class _RawStreamState:
    """What a passthrough stream has passed on so far (after that, no retry)."""

    delivered: int = 0
    assembler: ChunkAssembler | None = None

    def broken(self, why: str) -> UpstreamStreamBroken:
        partial = self.assembler.text if self.assembler is not None else ""
        return UpstreamStreamBroken(
            f"upstream stream broke after {self.delivered} chunks: {why}", partial
        )


class Upstream:
    """Async client for an OpenAI-compatible chat completions API.

    One instance owns one pooled ``httpx.AsyncClient`` (use it as an async context manager or
    call ``aclose()``) and one adaptive limit on calls in flight, and is used from one event
    loop at a time. Counters for stats: ``calls`` (HTTP requests sent), ``retries``, ``limit``
    (current adaptive concurrency limit), ``in_flight`` and ``streams`` (False once the server
    showed it does not stream). ``observer`` (optional) is called once per HTTP attempt with
    the model and the attempt's status code, or an error kind (``timeout``, ``network``,
    ``bad_response``, ``stream_broken``, ``deadline``, ``error``) when there was none; it
    runs on the event loop, so it must be quick, and its exceptions are logged and ignored.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        concurrency: int = 16,
        retry: RetryPolicy = _DEFAULT_RETRY,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        observer: Observer | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.base_url = base_url.rstrip("/")
        self._url = f"{self.base_url}/chat/completions"
        self._api_key = api_key or None
        self._timeout_s = timeout_s
        self._concurrency = concurrency
        self.retry = retry
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._clock = clock  # must agree with the callers' deadlines (time.monotonic)
        self._observer = observer
        self._limit = AdaptiveLimit(concurrency)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            transport=transport,
        )
        self.calls = 0
        self.retries = 0
        self.streams = True
        self._stream_confirmed = False  # a stream has worked: a 400 is then about the content

    def __repr__(self) -> str:
        auth = "yes" if self._api_key else "no"
        return (
            f"Upstream(base_url={self.base_url!r}, auth={auth}, "
            f"concurrency={self._concurrency}, limit={self.limit:.1f})"
        )

    @property
    def limit(self) -> float:
        """The adaptive limit on calls in flight (between 1 and ``concurrency``)."""
        return self._limit.limit

    @property
    def in_flight(self) -> int:
        return self._limit.in_flight

    async def __aenter__(self) -> Upstream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- the two calls -----------------------------------------------------------------------

    async def chat(
        self,
        *,
        model: str,
        messages: Messages,
        temperature: float = 0.0,
        max_tokens: int | None = None,
        params: Mapping[str, Any] | None = None,
        deadline: float | None = None,
    ) -> Completion:
        """One chat completion, retried until ``deadline``; raises an ``UpstreamError``.

        ``deadline`` is an absolute ``time.monotonic()`` value: no try or wait starts that
        would pass it, and a try still running then is cut off (``UpstreamTimeout``).
        400/413/422 raise ``UpstreamRejected`` at once: retrying the same input will not help.
        """
        payload = _payload(model, messages, temperature, max_tokens, params)
        return await self._retrying(
            lambda: self._post_once(payload, model, deadline), deadline, model
        )

    async def chat_stream(
        self,
        *,
        model: str,
        messages: Messages,
        temperature: float = 0.0,
        max_tokens: int | None = None,
        params: Mapping[str, Any] | None = None,
        deadline: float | None,
        on_text: Callable[[str], None],
    ) -> Completion:
        """Like ``chat``, but streamed: ``on_text`` gets each piece of text as it arrives.

        Retries only until the first text arrived; a stream that breaks later raises
        ``UpstreamStreamBroken`` with the text so far in ``.partial_text`` (so does a deadline
        that cuts it). A server that does not stream is detected once and from then on asked
        with plain ``chat`` (``on_text`` then gets the whole text in one piece).
        """
        if not self.streams:
            return await self._chat_then_emit(
                model, messages, temperature, max_tokens, params, deadline, on_text
            )
        payload = _payload(model, messages, temperature, max_tokens, params)
        payload.update(stream=True, stream_options={"include_usage": True})
        state = _StreamState()
        try:
            return await self._retrying(
                lambda: self._stream_once(payload, model, deadline, on_text, state),
                deadline,
                model,
            )
        except UpstreamRejected as exc:
            if exc.status_code not in _STREAM_REFUSED_STATUSES or self._stream_confirmed:
                raise
        except UpstreamTimeout:
            if not state.partial:
                raise
            raise self._broken(state, "the request deadline passed") from None
        logger.info("upstream refused a streaming request; asking once without streaming")
        completion = await self._chat_then_emit(
            model, messages, temperature, max_tokens, params, deadline, on_text
        )
        if self.streams:
            self.streams = False
            logger.warning("upstream does not stream; using plain requests from now on")
        return completion

    async def _chat_then_emit(
        self,
        model: str,
        messages: Messages,
        temperature: float,
        max_tokens: int | None,
        params: Mapping[str, Any] | None,
        deadline: float | None,
        on_text: Callable[[str], None],
    ) -> Completion:
        completion = await self.chat(
            model=model,
            messages=messages,
            temperature=temperature,
            max_tokens=max_tokens,
            params=params,
            deadline=deadline,
        )
        if completion.text:
            on_text(completion.text)
        return completion

    # -- retrying ----------------------------------------------------------------------------

    async def _retrying(self, send: _Send, deadline: float | None, model: str) -> Completion:
        """Try ``send`` until it succeeds, raises, runs out of tries or meets the deadline."""
        progress = _Progress(started=self._clock(), model=model)
        cap = self.retry.max_tries(deadline)
        while True:
            if progress.last is not None:
                if cap is not None and progress.tries >= cap:
                    raise self._give_up(progress, "")
                await self._backoff(progress, deadline)
            if deadline is not None and self._clock() >= deadline:
                head = f"request deadline passed before attempt {progress.tries + 1}"
                raise UpstreamTimeout(self._deadline_message(progress, head))
            outcome = await self._attempt(send, progress, deadline)
            if isinstance(outcome, Completion):
                return outcome
            progress.failures += 1
            progress.last = outcome

    async def _attempt(
        self, send: _Send, progress: _Progress, deadline: float | None
    ) -> Completion | Failure:
        """One try within the adaptive limit, cut off at the deadline."""
        remaining = None if deadline is None else deadline - self._clock()
        head = "request deadline passed while waiting for a free upstream slot"
        sent = False
        status: int | str | None = None  # set once an attempt was sent and ended
        try:
            async with asyncio.timeout(remaining) as scope:
                ticket = await self._limit.acquire()
                sent = True
                progress.tries += 1
                self.calls += 1
                head = f"request deadline passed during attempt {progress.tries}"
                outcome: Completion | Failure | None = None
                try:
                    outcome = await send()
                except UpstreamError as exc:
                    status = _error_status(exc)
                    raise
                finally:
                    self._limit.release(ticket, _verdict(outcome))
                status = _outcome_status(outcome)
                return outcome
        except TimeoutError:
            if not scope.expired():
                raise
            if sent and status is None:
                status = "deadline"  # cut off while the attempt ran
            raise UpstreamTimeout(self._deadline_message(progress, head)) from None
        finally:
            if status is not None:
                self._observe(progress.model, status)

    def _observe(self, model: str, status: int | str) -> None:
        if self._observer is None:
            return
        try:
            self._observer(model, status)
        except Exception:  # metrics must never fail a call
            logger.exception("upstream observer failed")

    async def _backoff(self, progress: _Progress, deadline: float | None) -> None:
        failure = progress.last
        assert failure is not None
        wait = self._wait_for(progress, failure)
        if deadline is not None and self._clock() + wait >= deadline:
            head = f"request deadline would pass before the next try (in {wait:.2f} s)"
            raise UpstreamTimeout(self._deadline_message(progress, head))
        self.retries += 1
        logger.info(
            "upstream %s on attempt %d; retrying in %.2fs (limit %.1f)",
            failure.label,
            progress.tries,
            wait,
            self.limit,
        )
        await self._sleep(wait)

    def _wait_for(self, progress: _Progress, failure: Failure) -> float:
        """Retry-After when the provider sent one (unless absurd), else jittered backoff."""
        if failure.retry_after is None:
            return self.retry.delay(progress.failures - 1, self._rng)
        if failure.retry_after > self.retry.max_retry_after_s:
            limit = self.retry.max_retry_after_s
            raise self._give_up(
                progress, f"Retry-After {failure.retry_after:g} s is over the {limit:g} s limit; "
            )
        return failure.retry_after

    def _deadline_message(self, progress: _Progress, head: str) -> str:
        elapsed = self._clock() - progress.started
        if progress.last is None:
            return f"{head}, {elapsed:.1f} s in"
        return f"{head}: {progress.last.summary(progress.failures, elapsed)}"

    def _give_up(self, progress: _Progress, why: str) -> UpstreamError:
        """The exception for the last failure, e.g. ``upstream returned 503 on 5 attempts ...``."""
        failure = progress.last
        assert failure is not None
        message = why + failure.summary(progress.failures, self._clock() - progress.started)
        if failure.kind == "rate_limited":
            return UpstreamRateLimited(message)
        if failure.kind == "timeout":
            return UpstreamTimeout(message)
        if failure.kind == "bad_response":
            return UpstreamBadResponse(message)
        if failure.kind == "status":
            return UpstreamStatusError(message, failure.status)
        return UpstreamError(message)

    # -- one try -----------------------------------------------------------------------------

    def _try_timeout(self, deadline: float | None) -> httpx.Timeout:
        limit = self._timeout_s
        if deadline is not None:
            limit = max(0.001, min(limit, deadline - self._clock()))
        return httpx.Timeout(limit, connect=min(5.0, limit))

    async def _post_once(
        self,
        payload: dict[str, Any],
        model: str,
        deadline: float | None,
        read: Callable[[httpx.Response, str], Completion | Failure] | None = None,
    ) -> Completion | Failure:
        """One plain POST; ``read`` turns the response into an outcome (default: ``_classify``)."""
        try:
            response = await self._client.post(
                self._url, json=payload, timeout=self._try_timeout(deadline)
            )
        except httpx.HTTPError as exc:
            return self._transport_failure(exc)
        return (read or self._classify)(response, model)

    async def _stream_once(
        self,
        payload: dict[str, Any],
        model: str,
        deadline: float | None,
        on_text: Callable[[str], None],
        state: _StreamState,
    ) -> Completion | Failure:
        """One streaming try; after text was delivered, any failure raises (no retry)."""
        try:
            async with self._client.stream(
                "POST", self._url, json=payload, timeout=self._try_timeout(deadline)
            ) as response:
                content_type = response.headers.get("content-type", "")
                if not response.is_success or "json" in content_type:
                    await response.aread()
                    return self._plain_answer(response, model, on_text)
                state.reader = StreamReader(model)
                return await self._read_events(response, state.reader, on_text, state)
        except httpx.HTTPError as exc:
            if state.partial:
                raise self._broken(state, type(exc).__name__) from None
            return self._transport_failure(exc)

    def _plain_answer(
        self, response: httpx.Response, model: str, on_text: Callable[[str], None]
    ) -> Completion | Failure:
        """An error status, or a server that ignored ``stream`` and sent one JSON body."""
        outcome = self._classify(response, model)
        if isinstance(outcome, Completion):
            if self.streams:
                self.streams = False
                logger.warning("upstream ignores streaming; using plain requests from now on")
            if outcome.text:
                on_text(outcome.text)
        return outcome

    async def _read_events(
        self,
        response: httpx.Response,
        reader: StreamReader,
        on_text: Callable[[str], None],
        state: _StreamState,
    ) -> Completion | Failure:
        parser = SseParser()
        async for data in response.aiter_bytes():
            failure = self._take_events(parser.feed(data), reader, on_text, state)
            if failure is not None:
                return failure
            # After [DONE], keep reading to the end of the body (the server ends it there):
            # a response closed early takes its connection out of the pool.
        failure = self._take_events(parser.close(), reader, on_text, state)
        if failure is not None:
            return failure
        if not reader.complete:
            if state.partial:
                raise self._broken(state, "the stream ended before its end marker")
            return Failure("network", "stream ended before its end marker")
        self._stream_confirmed = True
        return reader.completion()

    def _take_events(
        self,
        events: list[tuple[str, str]],
        reader: StreamReader,
        on_text: Callable[[str], None],
        state: _StreamState,
    ) -> Failure | None:
        """Feed one read's events to ``reader``; their text goes to ``on_text`` in one piece."""
        pieces: list[str] = []
        failure: Failure | None = None
        for event, data in events:
            piece = reader.feed(event, data)
            if isinstance(piece, Failure):
                failure = Failure(piece.kind, self._redact(piece.detail))
                break
            if piece:
                pieces.append(piece)
        if pieces:
            on_text("".join(pieces))
        if failure is not None and state.partial:
            raise self._broken(state, failure.detail)
        return failure

    def _classify(self, response: httpx.Response, model: str) -> Completion | Failure:
        """Completion, retryable failure, or raise for a status that retrying will not fix."""
        status = response.status_code
        if 200 <= status < 300:
            return parse_completion(response, model)
        message, code = provider_error(response)
        message = self._redact(message)
        if status == 429 or status >= 500 or status == 408:
            kind: FailureKind = "rate_limited" if status == 429 else "status"
            return Failure(kind, message, status, parse_retry_after(response.headers))
        if status in REJECTED_STATUSES:
            code = self._redact(code) if code else None
            what = f"{status} {code}" if code else str(status)
            raise UpstreamRejected(
                f"upstream rejected the request ({what}): {message}", status, code
            )
        raise UpstreamStatusError(f"upstream returned {status}: {message}", status)

    def _transport_failure(self, exc: httpx.HTTPError) -> Failure:
        """Timeouts and connection trouble are retried; other httpx errors are our bug: raise."""
        if isinstance(exc, httpx.TimeoutException):
            return Failure("timeout", type(exc).__name__)
        detail = f"{type(exc).__name__}: {self._redact(str(exc))}"
        if isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError | httpx.ProxyError):
            return Failure("network", detail)
        raise UpstreamError(f"upstream request failed: {detail}") from None

    def _broken(self, state: _StreamState, why: str) -> UpstreamStreamBroken:
        partial = state.partial
        return UpstreamStreamBroken(
            f"upstream stream broke after {len(partial)} characters of text: {why}", partial
        )

    def _redact(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, _REDACTED)
        return text

    # -- passthrough: the app's own body, sent as it is (see .raw) -----------------------------

    async def complete_raw(self, body: dict[str, Any], *, deadline: float | None) -> RawCompletion:
        """One completion for ``body`` exactly as given, retried like ``chat``; whole reply kept."""
        model = str(body.get("model", ""))
        completion = await self._retrying(
            lambda: self._post_once(body, model, deadline, self._raw_outcome), deadline, model
        )
        assert isinstance(completion, RawCompletion)
        return completion

    async def stream_raw(
        self,
        body: dict[str, Any],
        *,
        deadline: float | None,
        on_chunk: Callable[[dict[str, Any]], None],
    ) -> RawCompletion:
        """``body`` streamed: ``on_chunk`` gets each ``chat.completion.chunk`` as it arrives.

        Usage is always asked for (the bill needs it). Retries only until the first chunk
        was passed on; a break after that raises ``UpstreamStreamBroken``.
        """
        if not self.streams:  # this server does not stream (found by a batch or below)
            return await self._raw_then_emit(body, deadline, on_chunk)
        model = str(body.get("model", ""))
        options = body.get("stream_options")
        options = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        payload = {**body, "stream": True, "stream_options": options}
        state = _RawStreamState()
        try:
            completion = await self._retrying(
                lambda: self._stream_raw_once(payload, model, deadline, on_chunk, state),
                deadline,
                model,
            )
        except UpstreamTimeout:
            if not state.delivered:
                raise
            raise state.broken("the request deadline passed") from None
        except UpstreamRejected as exc:
            if exc.status_code not in _STREAM_REFUSED_STATUSES or self._stream_confirmed:
                raise
            logger.info("upstream refused a streaming passthrough; asking once without streaming")
            return await self._raw_then_emit(body, deadline, on_chunk)
        assert isinstance(completion, RawCompletion)
        return completion

    async def _raw_then_emit(
        self,
        body: dict[str, Any],
        deadline: float | None,
        on_chunk: Callable[[dict[str, Any]], None],
    ) -> RawCompletion:
        """A plain call, handed on as the chunks a stream of it would have held."""
        completion = await self.complete_raw(body, deadline=deadline)
        for chunk in chunks_from_completion(completion.body):
            on_chunk(chunk)
        return completion

    def _raw_outcome(self, response: httpx.Response, model: str) -> Completion | Failure:
        if 200 <= response.status_code < 300:
            outcome = parse_raw(response, model)
            if isinstance(outcome, Failure):
                return Failure(outcome.kind, self._redact(outcome.detail), outcome.status)
            return outcome
        return self._classify(response, model)  # raises for 4xx; a Failure to retry otherwise

    async def _stream_raw_once(
        self,
        payload: dict[str, Any],
        model: str,
        deadline: float | None,
        on_chunk: Callable[[dict[str, Any]], None],
        state: _RawStreamState,
    ) -> Completion | Failure:
        try:
            async with self._client.stream(
                "POST", self._url, json=payload, timeout=self._try_timeout(deadline)
            ) as response:
                if not response.is_success or "json" in response.headers.get("content-type", ""):
                    await response.aread()  # an error, or a server that ignored ``stream``
                    outcome = self._raw_outcome(response, model)
                    if isinstance(outcome, RawCompletion):
                        for chunk in chunks_from_completion(outcome.body):
                            state.delivered += 1
                            on_chunk(chunk)
                    return outcome
                state.assembler = ChunkAssembler(model)
                outcome = await self._read_chunks(response, state, on_chunk)
                if isinstance(outcome, RawCompletion):
                    self._stream_confirmed = True
                return outcome
        except httpx.HTTPError as exc:
            if state.delivered:
                raise state.broken(type(exc).__name__) from None
            return self._transport_failure(exc)

    async def _read_chunks(
        self,
        response: httpx.Response,
        state: _RawStreamState,
        on_chunk: Callable[[dict[str, Any]], None],
    ) -> Completion | Failure:
        assembler = state.assembler
        assert assembler is not None
        async for event, data in _sse(response):
            piece = assembler.feed(event, data)
            if isinstance(piece, Failure):
                if state.delivered:
                    raise state.broken(self._redact(piece.detail))
                return Failure(piece.kind, self._redact(piece.detail))
            if piece is not None:
                state.delivered += 1
                on_chunk(piece)
        if not assembler.complete:
            if state.delivered:
                raise state.broken("the stream ended before its end marker")
            return Failure("network", "stream ended before its end marker")
        return assembler.completion()


async def _sse(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """A streamed body's events one by one (for callers that act on each)."""
    parser = SseParser()
    async for data in response.aiter_bytes():
        for event in parser.feed(data):
            yield event
    for event in parser.close():
        yield event


def _payload(
    model: str,
    messages: Messages,
    temperature: float,
    max_tokens: int | None,
    params: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The call's body: the app's other parameters (top_p, seed, ...) under ours."""
    payload: dict[str, Any] = {
        **(params or {}),
        "model": model,
        "messages": messages,
        "temperature": temperature,
    }
    if max_tokens is not None:
        payload["max_tokens"] = max_tokens
    return payload


def _outcome_status(outcome: Completion | Failure | None) -> int | str | None:
    """An attempt's status for the observer: 200, the failure's status, or its kind."""
    if isinstance(outcome, Completion):
        return 200
    if isinstance(outcome, Failure):
        return outcome.status or outcome.kind
    return None


def _error_status(exc: UpstreamError) -> int | str:
    """The status of an attempt that raised (4xx statuses, streams broken midway, our bugs)."""
    if isinstance(exc, UpstreamStatusError) and exc.status_code:
        return exc.status_code
    if isinstance(exc, UpstreamStreamBroken):
        return "stream_broken"
    return "error"


def _verdict(outcome: Completion | Failure | None) -> Verdict:
    """What a try says about the provider's load (an exception says nothing)."""
    if isinstance(outcome, Completion):
        return "ok"
    if isinstance(outcome, Failure) and outcome.kind == "rate_limited":
        return "overloaded"
    return "neutral"
