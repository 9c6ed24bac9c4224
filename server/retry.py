"""Chat completions survive vLLM's multimodal processor-cache race: a transparent, bounded retry.

What vLLM 0.32 does. The API process (P0) keeps a metadata-only shadow of the engine core's (P1)
multimodal processor cache and sends an image's processed data only when its shadow says P1
lacks it. The shadow is updated when a request is *rendered* (``renderers/base.py``, one worker),
P1 when the request *arrives*; nothing makes requests arrive in the order they were rendered (a
streamed request reaches the engine only once its response starts, a request whose client hangs
up between rendering and sending never arrives), so P1 can be asked for an item nobody sent it:

* ``multimodal/cache/lru.py`` ``LruKeyReplicatedReceiverCache.get_and_update_item`` raises
  ``MultiModalCacheMissError`` (``multimodal/cache/base.py``; ``get_and_update_features``
  collects every missing hash of the request);
* ``v1/engine/core.py`` ``EngineCoreProc.process_input_sockets`` catches it around
  ``preprocess_add_request`` and ``_handle_mm_cache_miss`` logs a warning and answers an
  ``EngineCoreOutput(finish_reason=ERROR, new_token_ids=[], mm_cache_miss_hashes=[...])``;
* ``v1/engine/output_processor.py`` ``OutputProcessor.process_outputs`` turns it into a finished
  ``RequestOutput`` whose completion has ``finish_reason == "error"`` (the ``RequestError``
  marked ``retryable`` is built for pooling requests only; a generation request carries no mark);
* ``v1/engine/async_llm.py`` ``AsyncLLM._run_output_handler`` then drops the hashes from the P0
  shadow (``mm_processor_cache.invalidate``): a *new* request for the same images carries data;
* ``entrypoints/openai/chat_completion/serving.py``: ``chat_completion_full_generator`` and
  ``chat_completion_stream_generator`` call ``_raise_if_error`` (``generate/base/serving.py``),
  which logs an ERROR and raises ``GenerationError("Internal server error")``: HTTP 500, or for
  a stream, a 200 whose role chunk is followed by an error event.

What this module does (installed by ``LookMMiddleware``; the private names are checked in
``tests/test_server_contract.py``):

* ``OutputProcessor.process_outputs`` notes the request ids whose engine output carries
  ``mm_cache_miss_hashes`` (the only place the mark exists);
* ``OpenAIServingChat.create_chat_completion`` runs vLLM's own handler with a context naming the
  request, and the first ``AsyncLLM.generate`` call in that context returns a
  ``RetryingOutputs`` instead of vLLM's generator: it starts ``generate`` and waits for the first
  output; a noted cache miss is dropped and the request is rendered again
  (``render_chat_request``: the invalidated items now carry their data) and sent again, up to
  ``retries`` times (``--mm-cache-retries``, default 3), counting each retry in
  ``lookm_mm_cache_retries_total``;
* a streamed request is started (that first output awaited) before the handler returns, so no
  byte of a response is sent before the retries are settled (the response headers wait for the
  first token). When every retry missed, ``RetryableRequestError`` (vLLM's 503
  ``ServiceUnavailableError`` with an OpenAI error body) is raised instead, for streamed and
  non-streamed requests alike, and the middleware adds ``Retry-After``;
* ``defer_invalidation``: vLLM's recovery itself races. The output handler drops the stale
  hashes from the P0 cache on the event loop, while the renderer's multimodal thread may be
  between ``is_cached`` and ``_merge_mm_kwargs`` for another request with the same image: that
  request fails with ``AssertionError: Expected a cached item`` (``LruKeyReplicatedSenderCache.
  get_and_update_item``; HTTP 500 and a traceback, seen in the soak). vLLM touches the P0 cache
  only on that one-worker executor otherwise (renders, ``clear_mm_cache``); the invalidation is
  sent there too, and runs between two renders, before any render submitted after it (the
  retry's among them).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from . import metrics

# Under vLLM's logger, so that its handler and format (process, level, file) apply.
logger = logging.getLogger("vllm.lookm.retry")

DEFAULT_RETRIES = 3
# Seconds a client is told to wait before retrying a 503 (a miss clears itself at once).
RETRY_AFTER_S = 1
EXHAUSTED_MESSAGE = ("The multimodal inputs of this request could not be matched with the "
                     "engine's cache after {attempts} attempts; please retry")


class MissLog:
    """Request ids (vLLM's external ids, those of ``RequestOutput.request_id``) whose engine
    output was a multimodal cache miss, until their consumer takes them. Bounded: an entry whose
    consumer went away (client hung up) is eventually dropped."""

    def __init__(self, limit: int = 4096) -> None:
        self._hashes: OrderedDict[str, list[str]] = OrderedDict()
        self._limit = limit

    def note(self, request_id: str, hashes: list[str]) -> None:
        self._hashes[request_id] = list(hashes)
        while len(self._hashes) > self._limit:
            self._hashes.popitem(last=False)

    def take(self, request_id: str) -> list[str] | None:
        return self._hashes.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._hashes)


MISSES = MissLog()


def note_misses(engine_core_outputs: Any, request_states: dict[str, Any]) -> None:
    """Note the cache-miss outputs of one ``process_outputs`` batch (before vLLM drops the
    finished requests' states, which map engine ids to external ids)."""
    for output in engine_core_outputs:
        hashes = output.mm_cache_miss_hashes
        if hashes:
            state = request_states.get(output.request_id)
            if state is not None:
                MISSES.note(state.external_req_id, hashes)


def is_cache_miss(output: Any) -> bool:
    """Whether ``output`` (a ``RequestOutput``) is the engine's cache-miss answer: finished with
    ``finish_reason == "error"`` and noted by ``note_misses`` (the note is taken)."""
    if not output.finished or not any(c.finish_reason == "error" for c in output.outputs):
        return False
    return MISSES.take(output.request_id) is not None


@dataclass
class ChatContext:
    """One chat completion being served: what a retry needs to render it again."""

    serving: Any  # OpenAIServingChat
    request: Any  # ChatCompletionRequest
    retries: int
    outputs: RetryingOutputs | None = None


_CONTEXT: ContextVar[ChatContext | None] = ContextVar("lookm_chat_context", default=None)


class RetryingOutputs:
    """The ``RequestOutput`` stream of one chat completion, retried on a cache miss.

    ``start(engine_input)`` starts one attempt (vLLM's ``generate`` with the request's other
    arguments); ``rerender()`` renders the request again and returns its new engine input.
    ``prime()`` runs the attempts until one's first output is not a cache miss (idempotent);
    iterating primes, then yields that output and the rest of the attempt's outputs.
    """

    def __init__(self, start: Callable[[Any], AsyncIterator[Any]], engine_input: Any,
                 rerender: Callable[[], Any], retries: int, request_id: str) -> None:
        self._start = start
        self._engine_input = engine_input
        self._rerender = rerender
        self._retries = retries
        self._request_id = request_id
        self._primed = False
        self._first: Any = None
        self._outputs: Any = None
        self.attempts = 0

    async def prime(self) -> None:
        if self._primed:
            return
        self._primed = True
        engine_input = self._engine_input
        while True:
            self.attempts += 1
            outputs = self._start(engine_input)
            try:
                first = await anext(outputs)
            except StopAsyncIteration:
                self._outputs = outputs
                return
            except BaseException:
                await outputs.aclose()
                raise
            if not is_cache_miss(first):
                self._first, self._outputs = first, outputs
                return
            await outputs.aclose()
            if self.attempts > self._retries:
                break
            metrics.MM_CACHE_RETRIES.inc()
            logger.info("Request %s: multimodal processor-cache miss (vLLM's P0/P1 cache "
                        "drift); rendering and sending it again (retry %d of %d)",
                        self._request_id, self.attempts, self._retries)
            engine_input = await self._rerender()
        metrics.MM_CACHE_RETRIES_EXHAUSTED.inc()
        logger.warning("Request %s: multimodal processor-cache miss after %d attempts; "
                       "answering 503", self._request_id, self.attempts)
        from vllm.exceptions import RetryableRequestError

        raise RetryableRequestError(EXHAUSTED_MESSAGE.format(attempts=self.attempts))

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        await self.prime()
        if self._outputs is None:
            return
        try:
            if self._first is not None:
                yield self._first
            async for output in self._outputs:
                yield output
        finally:
            await self._outputs.aclose()


async def _rerender(context: ChatContext) -> Any:
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    from vllm.exceptions import RetryableRequestError

    result = await context.serving.render_chat_request(context.request)
    if isinstance(result, ErrorResponse):  # it rendered a moment ago: should not happen
        raise RetryableRequestError(result.error.message)
    _, engine_inputs = result
    return engine_inputs[0]


def _generate_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def generate(self, prompt, sampling_params, request_id, *args, **kwargs):
        context = _CONTEXT.get()
        if context is None or context.outputs is not None:
            return original(self, prompt, sampling_params, request_id, *args, **kwargs)

        def start(engine_input):
            return original(self, engine_input, sampling_params, request_id, *args, **kwargs)

        context.outputs = RetryingOutputs(start, prompt, functools.partial(_rerender, context),
                                          context.retries, request_id)
        return context.outputs

    return generate


def retries_of(raw_request: Any) -> int:
    """The server's ``--mm-cache-retries`` (``DEFAULT_RETRIES`` on a server without it)."""
    args = getattr(getattr(getattr(raw_request, "app", None), "state", None), "args", None)
    value = getattr(args, "mm_cache_retries", None)
    return DEFAULT_RETRIES if value is None else int(value)


def _create_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def create_chat_completion(self, request, raw_request=None):
        if request.use_beam_search:  # many engine requests per chat completion: not retried
            return await original(self, request, raw_request)
        context = ChatContext(self, request, retries_of(raw_request))
        token = _CONTEXT.set(context)
        try:
            result = await original(self, request, raw_request)
        finally:
            _CONTEXT.reset(token)
        if context.outputs is not None and inspect.isasyncgen(result):
            try:  # a stream: settle the retries before the response starts
                await context.outputs.prime()
            except BaseException:
                await result.aclose()
                raise
        return result

    return create_chat_completion


def _process_outputs_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def process_outputs(self, engine_core_outputs, *args, **kwargs):
        note_misses(engine_core_outputs, self.request_states)
        return original(self, engine_core_outputs, *args, **kwargs)

    return process_outputs


def _patch(cls: type, name: str, hook: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    original = getattr(cls, name)
    if getattr(original, "__lookm_hook__", False):
        return
    patched = hook(original)
    patched.__lookm_hook__ = True
    setattr(cls, name, patched)


def defer_invalidation(engine_client: Any) -> bool:
    """Make the P0 cache's ``invalidate`` run on the renderer's multimodal executor (see the
    module docstring). Returns whether it was installed now (idempotent; False without a P0
    cache, i.e. a model without multimodal inputs or a disabled cache)."""
    renderer = getattr(engine_client, "renderer", None)
    cache = getattr(renderer, "mm_processor_cache", None)
    executor = getattr(renderer, "_mm_executor", None)
    if cache is None or executor is None or getattr(cache.invalidate, "__lookm_hook__", False):
        return False
    original = cache.invalidate

    def invalidate(mm_hash: str) -> None:
        try:
            executor.submit(original, mm_hash)
        except RuntimeError:  # the executor is shut down (the server is stopping)
            original(mm_hash)

    invalidate.__lookm_hook__ = True
    cache.invalidate = invalidate
    return True


def install_retry_hook() -> None:
    """Install the three class-level hooks (idempotent); ``defer_invalidation`` needs the
    server's engine client and is installed by the middleware when the app starts."""
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.output_processor import OutputProcessor

    _patch(OutputProcessor, "process_outputs", _process_outputs_hook)
    _patch(AsyncLLM, "generate", _generate_hook)
    _patch(OpenAIServingChat, "create_chat_completion", _create_hook)
