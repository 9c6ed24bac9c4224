"""``usage.kv_compression``: what a response tells its client about the request's compression.

The engine reports a compressed request's stats in ``RequestOutput.kv_transfer_params``
(``lookm_vllm.vllm_adapter.connector``); the server moves the public part of them into the
OpenAI ``usage`` object, counts them in the metrics, and drops the raw ``kv_transfer_params``.
"""

from __future__ import annotations

from typing import Any

from lookm_vllm.vllm_adapter.connector import STATS_KEY

from . import metrics

USAGE_FIELDS = ("method", "budget", "prompt_tokens", "kv_tokens_kept", "kv_blocks_freed")


def take_stats(kv_transfer_params: Any) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Split LOOK-M's stats out of ``kv_transfer_params``: ``(stats, the other entries)``, each
    ``None`` when absent."""
    if not isinstance(kv_transfer_params, dict):
        return None, None
    rest = {k: v for k, v in kv_transfer_params.items() if k != STATS_KEY}
    return kv_transfer_params.get(STATS_KEY), rest or None


def report(stats: dict[str, Any]) -> dict[str, Any]:
    """Count one finished request in the metrics; return its ``usage.kv_compression``.

    Called exactly once per request (when its final output arrives). Stats with
    ``compressed: false`` are the connector's summary of a request that finished before it was
    compressed: reported to the client, not counted as a compression.
    """
    if stats.get("compressed"):
        metrics.observe(stats)
    return {key: stats[key] for key in USAGE_FIELDS}


def shape_response(body: dict[str, Any]) -> dict[str, Any]:
    """A non-streaming chat completion with its stats moved into ``usage.kv_compression``."""
    stats, rest = take_stats(body.pop("kv_transfer_params", None))
    if rest is not None:
        body["kv_transfer_params"] = rest
    if stats is not None:
        entry = report(stats)
        if isinstance(body.get("usage"), dict):
            body["usage"]["kv_compression"] = entry
    return body
