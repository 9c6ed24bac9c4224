"""LOOK-M's Prometheus metrics, served by vLLM's own ``GET /metrics``.

vLLM's ``/metrics`` exports ``prometheus_client``'s default registry when one API server runs
(``vllm.v1.metrics.prometheus.get_prometheus_registry``), and a multiprocess collector over
``PROMETHEUS_MULTIPROC_DIR`` otherwise; metrics created here with the default registry appear in
both cases (prometheus_client writes them to that directory when the variable is set).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from lookm_vllm.stats import CompressionStats

COMPRESSED_REQUESTS = Counter(
    "lookm_compressed_requests",
    "Requests whose prompt KV cache LOOK-M compressed.",
)
KV_TOKENS_EVICTED = Counter(
    "lookm_kv_tokens_evicted",
    "Prompt KV positions evicted by compression (prompt_tokens - kv_tokens_kept).",
)
COMPRESSED_PROMPT_TOKENS = Counter(
    "lookm_compressed_prompt_tokens",
    "Prompt positions of compressed requests, by modality (text, image, video; image and video "
    "tokens are the ones LOOK-M may evict).",
    ["modality"],
)
KV_BLOCKS_FREED = Counter(
    "lookm_kv_blocks_freed",
    "KV cache blocks returned to the pool by compression.",
)
COMPRESSION_SECONDS = Histogram(
    "lookm_compression_seconds",
    "Device time a request's compression took in the engine (selection, merge, compaction; "
    "scoring is not included). Requests whose timing was not measured yet when they finished "
    "are not observed.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
SCORING_SECONDS = Histogram(
    "lookm_scoring_seconds",
    "Device time a request's attention scoring took in the engine, summed over layers: the extra "
    "attention of the scoring queries (every prompt query for full scoring, the last W for "
    "window scoring) over the prompt's keys that ranks the KV pairs; it runs inside the prefill "
    "and is not part of lookm_compression_seconds. Requests whose timing was not measured yet "
    "when they finished, and methods that do not score (streaming, random), are not observed.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

MM_CACHE_RETRIES = Counter(
    "lookm_mm_cache_retries",
    "Chat completions sent to the engine again after vLLM's multimodal processor-cache miss "
    "(P0/P1 cache drift), one per retry (server/retry.py).",
)
MM_CACHE_RETRIES_EXHAUSTED = Counter(
    "lookm_mm_cache_retries_exhausted",
    "Chat completions answered 503 (Retry-After) because every retry met a multimodal "
    "processor-cache miss.",
)


def observe(stats: CompressionStats) -> None:
    """Count one finished compressed request from its engine stats."""
    COMPRESSED_REQUESTS.inc()
    KV_TOKENS_EVICTED.inc(max(0, stats.prompt_tokens - stats.kv_tokens_kept))
    KV_BLOCKS_FREED.inc(stats.kv_blocks_freed)
    media = {"image": stats.image_tokens, "video": stats.video_tokens}
    media["text"] = max(0, stats.prompt_tokens - sum(media.values()))
    for modality, count in media.items():
        COMPRESSED_PROMPT_TOKENS.labels(modality=modality).inc(count)
    if stats.compression_ms is not None:
        COMPRESSION_SECONDS.observe(stats.compression_ms / 1000.0)
    if stats.scoring_ms:   # None: not measured yet; 0: the method does not score
        SCORING_SECONDS.observe(stats.scoring_ms / 1000.0)
