"""One small adapter per attention backend's paged-cache layout. No vLLM import.

Everything else (gather, compaction, write-back) works on per-layer views
``key_cache, value_cache: [num_blocks, num_kv_heads, block_size, head_dim]`` that alias the
backend's cache tensor, so writes through them land in vLLM's cache.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class KVLayout(Protocol):
    def split(self, kv_cache: Tensor) -> tuple[Tensor, Tensor]:
        """Views ``(key_cache, value_cache)`` shaped ``[num_blocks, Hkv, block_size, d]``."""
        ...


class CpuAttnLayout:
    """vLLM CPU_ATTN: one tensor ``[num_blocks, Hkv, block_size, 2 * d]`` per layer.

    The backend views it as ``[num_blocks, Hkv, 2 * block_size, d]`` and takes the first
    ``block_size`` rows of each block/head as keys and the next ``block_size`` as values
    (``CPUAttentionBackendImpl.forward``); a contract test checks this against
    ``cpu_attn_reshape_and_cache`` on the installed build.
    """

    def split(self, kv_cache: Tensor) -> tuple[Tensor, Tensor]:
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        both = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1)
        return both[:, :, :block_size], both[:, :, block_size:]


class FlashAttnLayout:
    """vLLM FLASH_ATTN (NHD): one tensor ``[2, num_blocks, block_size, Hkv, d]`` per layer."""

    def split(self, kv_cache: Tensor) -> tuple[Tensor, Tensor]:
        key_cache, value_cache = kv_cache.unbind(0)
        return key_cache.transpose(1, 2), value_cache.transpose(1, 2)
