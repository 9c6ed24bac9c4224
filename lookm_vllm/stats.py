"""What the engine reports about one request's compression, shared by the vLLM adapter (which
writes it) and the server (which reads it). No vLLM or torch import.

It travels from the engine to the server inside ``RequestOutput.kv_transfer_params[STATS_KEY]``
as a plain dict (vLLM serialises ``kv_transfer_params`` between processes), built by
:meth:`CompressionStats.to_dict` and read back with :meth:`CompressionStats.from_dict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

# The entry of ``RequestOutput.kv_transfer_params`` (and of ``usage``) holding the stats.
STATS_KEY = "kv_compression"
# The fields a client sees in ``usage.kv_compression``.
USAGE_FIELDS = ("method", "budget", "max_kv_tokens", "prompt_tokens", "image_tokens",
                "video_tokens", "kv_tokens_kept", "kv_blocks_freed", "prefix_reused_tokens")


@dataclass(frozen=True)
class CompressionStats:
    """One request's compression, as the engine saw it.

    Attributes
    ----------
    compressed : bool
        Whether the prompt's KV cache was compressed (False: the request finished with its
        first token, e.g. ``max_tokens=1``: compression runs in the step after it; or nothing
        could be freed). A request that ends in the step that compressed it reports the plan's
        holes, without device timings.
    method, budget, max_kv_tokens
        The request's compression config (``budget`` is None when the request gave
        ``max_kv_tokens``, which is None otherwise).
    prompt_tokens, kv_tokens_kept, kv_blocks_freed : int
        Prompt length, KV positions kept per layer and head, blocks returned to the pool.
    pool_free_blocks_before, pool_free_blocks_after : int or None
        The pool's free blocks around freeing this request's holes (None when not compressed).
    scoring_ms, compression_ms : float or None
        Device time of scoring and of compression (selection, merge, compaction), summed over
        layers; None until measured (on CUDA the events are read without synchronising, so a
        request may finish before its times arrive).
    image_tokens, video_tokens : int
        Prompt positions holding image / video embeddings (the tokens LOOK-M may evict).
    prefix_reused_tokens : int
        Prompt tokens read from vLLM's prefix cache instead of prefilled (0 with prefix caching
        off, and always 0 for full scoring, which re-prefills its whole prompt privately).
    skipped : str or None
        Why a request asking for compression was left uncompressed, when it was.
    """

    compressed: bool
    method: str
    budget: float | None
    prompt_tokens: int
    kv_tokens_kept: int
    kv_blocks_freed: int
    pool_free_blocks_before: int | None = None
    pool_free_blocks_after: int | None = None
    scoring_ms: float | None = None
    compression_ms: float | None = None
    max_kv_tokens: int | None = None
    image_tokens: int = 0
    video_tokens: int = 0
    prefix_reused_tokens: int = 0
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionStats:
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})

    def usage(self) -> dict[str, Any]:
        """The public part, for ``usage.kv_compression`` of an OpenAI response."""
        return {name: getattr(self, name) for name in USAGE_FIELDS}
