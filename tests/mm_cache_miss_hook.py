"""Test hook: the engine answers chosen chat requests with vLLM's own multimodal cache miss.

Loaded only by tests, into the server under test, as one of its vLLM ``--middleware`` classes
(``--middleware tests.mm_cache_miss_hook.ForceMultiModalCacheMiss``, the server started in the
repository root): importing it patches ``AsyncMPClient.add_request_async``, the API process's
last step before a request goes to the engine core. A request whose ``vllm_xargs`` carry
``{"lookm_test_mm_cache_miss": N}`` gets, on each of its first N attempts (counted per request
id), one more multimodal feature: a copy of its first image with no data, under a hash the
engine has never seen. The engine core's receiver cache then raises a genuine
``MultiModalCacheMissError`` for that hash (after storing the request's real items, which keeps
the API process's shadow cache right), and vLLM answers with its retryable cache-miss output
exactly as for the real race. Requests without the key are not touched.
"""

from __future__ import annotations

import dataclasses
import functools
import uuid
from collections import Counter

KEY = "lookm_test_mm_cache_miss"
ATTEMPTS: Counter[str] = Counter()


def install() -> None:
    from vllm.v1.engine.core_client import AsyncMPClient

    original = AsyncMPClient.add_request_async
    if getattr(original, "__lookm_test_hook__", False):
        return

    @functools.wraps(original)
    async def add_request_async(self, request):
        extra = getattr(request.sampling_params, "extra_args", None) or {}
        if KEY in extra and request.mm_features:
            ATTEMPTS[request.external_req_id] += 1
            if ATTEMPTS[request.external_req_id] <= int(extra[KEY]):
                bogus = f"lookm-test-miss-{uuid.uuid4().hex}"
                request.mm_features = [*request.mm_features, dataclasses.replace(
                    request.mm_features[0], data=None, mm_hash=bogus, identifier=bogus)]
        return await original(self, request)

    add_request_async.__lookm_test_hook__ = True
    AsyncMPClient.add_request_async = add_request_async


class ForceMultiModalCacheMiss:
    """A pass-through ASGI middleware; loading it installs the hook."""

    def __init__(self, app) -> None:
        self.app = app
        install()

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)


install()
