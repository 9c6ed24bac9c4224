"""``usage.kv_compression`` in streamed chat completions.

vLLM's stream generator (``OpenAIServingChat.chat_completion_stream_generator``) never puts
``kv_transfer_params`` into a chunk. The hook wraps the ``RequestOutput`` stream it consumes to
catch the final output's stats (counting them in the metrics whether or not the client asked for
usage), and adds them to the final usage chunk (``choices == []``, sent when
``stream_options.include_usage`` is set). The private names touched are checked in
``tests/test_server_contract.py``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from typing import Any

from .usage import report, take_stats


def add_to_usage_chunk(chunk: str, entry: dict[str, Any]) -> str | None:
    """``chunk`` with ``usage.kv_compression = entry`` if it is the final usage chunk, else None."""
    if not chunk.startswith("data: {"):
        return None
    data = json.loads(chunk[len("data: "):])
    if data.get("choices") != [] or not isinstance(data.get("usage"), dict):
        return None
    data["usage"]["kv_compression"] = entry
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def install_stream_hook() -> None:
    """Wrap ``OpenAIServingChat.chat_completion_stream_generator`` (idempotent)."""
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat

    original = OpenAIServingChat.chat_completion_stream_generator
    if getattr(original, "__lookm_hook__", False):
        return

    @functools.wraps(original)
    async def stream_generator(self, request, result_generator, *args, **kwargs):
        entry: dict[str, Any] | None = None

        async def capture(outputs: AsyncIterator[Any]) -> AsyncIterator[Any]:
            nonlocal entry
            async for output in outputs:
                if output.finished:
                    stats, _ = take_stats(output.kv_transfer_params)
                    if stats is not None:
                        entry = report(stats)
                yield output

        pending = True
        async for chunk in original(self, request, capture(result_generator), *args, **kwargs):
            if entry is not None and pending:
                shaped = add_to_usage_chunk(chunk, entry)
                if shaped is not None:
                    chunk, pending = shaped, False
            yield chunk

    stream_generator.__lookm_hook__ = True
    OpenAIServingChat.chat_completion_stream_generator = stream_generator
