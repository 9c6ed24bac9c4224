"""``LookMMiddleware``: what LOOK-M adds to vLLM's OpenAI app, as one pure ASGI middleware.

Installed with vLLM's own ``--middleware lookm_vllm.server.middleware.LookMMiddleware``
(``lookm-serve`` always adds it; a stock ``python -m vllm.entrypoints.openai.api_server`` may too).
Per request:

* a body larger than ``--max-request-mb`` is refused (HTTP 400) before anything parses it;
* every JSON body is checked against the media policy (``validation.check_media``), and
  ``POST /v1/chat/completions`` bodies are also validated and rewritten by
  ``validation.prepare_chat_request`` (a top-level ``kv_compression`` object becomes
  ``vllm_xargs["kv_compression"]``), off the event loop, before vLLM sees them; a refusal is an
  HTTP 400 with an OpenAI error body naming the offending field;
* non-streaming chat completions get ``usage.kv_compression`` in place of the raw
  ``kv_transfer_params`` (``usage.shape_response``); streamed ones get it from the stream hook
  (``streaming.install_stream_hook``, installed when vLLM builds the app);
* chat completions that meet vLLM's multimodal processor-cache race are retried
  (``retry.install_retry_hook``, installed with the stream hook; ``retry.defer_invalidation``,
  installed when the app starts), and a 503 on the chat route gets a ``Retry-After`` header.

vLLM adds ``--middleware`` classes last, so this one runs before vLLM's API-key check: a request
that check will refuse is passed through untouched, so unauthenticated clients get 401, never a
validation answer.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from vllm import envs
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.middleware.authenticate import GUARDED_PREFIX, AuthenticationMiddleware

from .retry import RETRY_AFTER_S, defer_invalidation, install_retry_hook
from .streaming import install_stream_hook
from .usage import shape_response
from .validation import RequestError, RequestPolicy, check_media, prepare_chat_request

CHAT_PATH = "/v1/chat/completions"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def error_response(message: str, param: str | None = None) -> JSONResponse:
    """An HTTP 400 with vLLM's OpenAI error body (type ``BadRequestError``, code 400)."""
    err = create_error_response(message, param=param)
    return JSONResponse(err.model_dump(), status_code=err.error.code)


class _TooLarge(Exception):
    pass


async def _read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body; past ``limit`` bytes the rest is drained (so the client can read
    the answer) and ``_TooLarge`` raised."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # disconnected
            return b"".join(chunks)
        size += len(message.get("body", b""))
        if size <= limit:
            chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    if size > limit:
        raise _TooLarge
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the already-read body on, then the client's later messages."""
    done = False

    async def receive_again() -> Message:
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


def _checked_body(raw: bytes, path: str, policy: RequestPolicy) -> bytes:
    """The body to hand to vLLM: ``raw`` itself unless a chat completion needed rewriting.

    Raises ``RequestError``. A body that is not JSON is handed on for vLLM to answer.
    """
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return raw
    if path != CHAT_PATH:
        check_media(body, policy)
        return raw
    prepared = prepare_chat_request(body, policy)
    return raw if prepared is body else json.dumps(prepared, ensure_ascii=False).encode()


class _ServerState:
    """What the middleware needs from the server's parsed arguments (``app.state.args``)."""

    def __init__(self, app: Any, inner: ASGIApp) -> None:
        args = getattr(getattr(app, "state", None), "args", None)
        self.policy = RequestPolicy.from_args(args)
        self.auth = None
        # The tokens vLLM's own AuthenticationMiddleware gets (serve/middleware/register.py).
        tokens = [key for key in (getattr(args, "api_key", None) or [envs.VLLM_API_KEY]) if key]
        if tokens:
            self.auth = AuthenticationMiddleware(inner, tokens=tokens)

    def refused_by_auth(self, scope: Scope, path: str) -> bool:
        return (self.auth is not None and path.startswith(GUARDED_PREFIX)
                and not self.auth.verify_token(Headers(scope=scope)))


class LookMMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._state: _ServerState | None = None
        self._started = False
        install_stream_hook()
        install_retry_hook()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._started:  # the lifespan startup, or else the first request
            self._started = True
            app = scope.get("app")
            defer_invalidation(getattr(getattr(app, "state", None), "engine_client", None))
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        if self._state is None:
            self._state = _ServerState(scope.get("app"), self.app)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if self._state.refused_by_auth(scope, path):
            await self.app(scope, receive, send)
            return
        policy = self._state.policy
        try:
            raw = await _read_body(receive, policy.max_request_bytes)
        except _TooLarge:
            mb = policy.max_request_bytes / (1 << 20)
            await error_response(f"request body larger than this server's limit of {mb:g} MB "
                                 "(--max-request-mb)")(scope, receive, send)
            return
        if Headers(scope=scope).get("content-type", "").startswith("application/json"):
            try:
                checked = await anyio.to_thread.run_sync(_checked_body, raw, path, policy)
            except RequestError as exc:
                await error_response(exc.message, exc.param)(scope, receive, send)
                return
            if checked is not raw:
                raw = checked
                scope = dict(scope)
                scope["headers"] = [(k, v) for k, v in scope["headers"]
                                    if k.lower() != b"content-length"]
                scope["headers"].append((b"content-length", str(len(raw)).encode()))
        if path == CHAT_PATH:
            send = _ShapeJsonResponse(send)
        await self.app(scope, _replay(raw, receive), send)


class _ShapeJsonResponse:
    """A ``send`` that rewrites a successful JSON chat completion with ``shape_response``;
    streamed (event-stream) and error responses pass through, a 503 with ``Retry-After``."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._start: Message | None = None
        self._chunks: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = Headers(raw=message.get("headers", []))
            if message["status"] == 503 and "retry-after" not in headers:
                message = dict(message)
                message["headers"] = [*message.get("headers", []),
                                      (b"retry-after", str(RETRY_AFTER_S).encode())]
            content_type = headers.get("content-type", "")
            if message["status"] == 200 and content_type.startswith("application/json"):
                self._start = message
                return
        elif message["type"] == "http.response.body" and self._start is not None:
            self._chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            data = json.loads(b"".join(self._chunks))
            if isinstance(data, dict):
                data = shape_response(data)
            # rendered as starlette's JSONResponse renders vLLM's responses
            body = json.dumps(data, ensure_ascii=False, allow_nan=False,
                              separators=(",", ":")).encode()
            start, self._start = self._start, None
            MutableHeaders(scope=start)["content-length"] = str(len(body))
            await self._send(start)
            await self._send({"type": "http.response.body", "body": body, "more_body": False})
            return
        await self._send(message)
