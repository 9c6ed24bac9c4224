"""``usage.kv_compression``: what a response tells its client about the request's compression.

The engine reports a compressed request's stats in ``RequestOutput.kv_transfer_params``
(:class:`lookm_vllm.stats.CompressionStats`, written by the vLLM adapter's connector); the server
moves the public part of them into the OpenAI ``usage`` object, counts them in the metrics, and
drops the raw ``kv_transfer_params``.
"""

from __future__ import annotations

from typing import Any

from lookm_vllm.stats import STATS_KEY, CompressionStats

from . import metrics


def take_stats(kv_transfer_params: Any) -> tuple[CompressionStats | None, dict[str, Any] | None]:
    """Split LOOK-M's stats out of ``kv_transfer_params``: ``(stats, the other entries)``, each
    ``None`` when absent."""
    if not isinstance(kv_transfer_params, dict):
        return None, None
    rest = {k: v for k, v in kv_transfer_params.items() if k != STATS_KEY}
    raw = kv_transfer_params.get(STATS_KEY)
    return (None if raw is None else CompressionStats.from_dict(raw)), rest or None


def report(stats: CompressionStats) -> dict[str, Any]:
    """Count one finished request in the metrics; return its ``usage.kv_compression``.

    Called exactly once per request (when its final output arrives). A request that was not
    compressed (it finished first) is reported to the client, not counted as a compression.
    """
    if stats.compressed:
        metrics.observe(stats)
    return stats.usage()


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
