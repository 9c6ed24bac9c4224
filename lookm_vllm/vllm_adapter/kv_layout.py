"""One small adapter per attention backend's paged-cache layout. No vLLM import.

Everything else (gather, compaction, write-back) works on per-layer views
``key_cache, value_cache: [num_blocks, num_kv_heads, block_size, head_dim]`` that alias the
backend's cache tensor, so writes through them land in vLLM's cache. What the entries mean is the
cache's ``KVCodec``: plain numbers, or fp8 codes with per-layer scales.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


class KVLayout(Protocol):
    def split(self, kv_cache: Tensor) -> tuple[Tensor, Tensor]:
        """Views ``(key_cache, value_cache)`` shaped ``[num_blocks, Hkv, block_size, d]``."""
        ...


class CpuAttnLayout:
    """vLLM CPU_ATTN: one contiguous tensor ``[num_blocks, Hkv, block_size, 2 * d]`` per layer.

    Each (block, head) holds ``block_size * d`` key elements, then as many value elements.
    Values are stored ``[block_size, d]``; keys, for the ``vec``/``vec16`` kernels, TRANSPOSED
    (``[d, block_size]``, what ``cpu_attn_reshape_and_cache`` writes). The ``amx`` kernel (bf16
    on AMX CPUs) packs keys differently and is refused (``SUPPORTED_ISAS``). A contract test
    checks both layouts against ``cpu_attn_reshape_and_cache`` on the installed build.
    """

    SUPPORTED_ISAS = ("vec", "vec16")

    def split(self, kv_cache: Tensor) -> tuple[Tensor, Tensor]:
        if not kv_cache.is_contiguous():
            raise ValueError("CPU_ATTN cache tensor is expected to be contiguous")
        num_blocks, num_kv_heads, block_size, two_d = kv_cache.shape
        head_dim = two_d // 2
        size = (num_blocks, num_kv_heads, block_size, head_dim)
        block_stride, head_stride = kv_cache.stride(0), kv_cache.stride(1)
        base = kv_cache.storage_offset()
        keys = kv_cache.as_strided(size, (block_stride, head_stride, 1, block_size), base)
        values = kv_cache.as_strided(size, (block_stride, head_stride, head_dim, 1),
                                     base + block_size * head_dim)
        return keys, values


class FlashAttnLayout:
    """vLLM 0.32 FLASH_ATTN: one tensor per layer, LOGICAL shape ``[num_blocks, Hkv, block_size,
    2 * d]`` (its physical stride order may differ, e.g. block-position-major), keys in the first
    ``d`` of the last axis, values in the second (``FlashAttentionImpl.forward`` splits it so).
    Logical indexing makes the views right whatever the strides.
    """

    def split(self, kv_cache: Tensor) -> tuple[Tensor, Tensor]:
        head_dim = kv_cache.shape[-1] // 2
        return kv_cache[..., :head_dim], kv_cache[..., head_dim:]


class KVCodec(Protocol):
    """How a cache stores numbers: what compression reads (``decode``) and writes (``encode``)."""

    def decode(self, stored: Tensor, kind: str) -> Tensor:
        """The numbers held by ``stored`` (entries of the key or value cache, ``kind``)."""
        ...

    def encode(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """What the cache stores for ``keys`` and ``values`` (``[Hkv, K, d]`` each)."""
        ...

    def decode_query(self, query: Tensor) -> Tensor:
        """The queries ``[T, Hq, d]`` as numbers (some backends receive them quantized)."""
        ...


@dataclass(frozen=True)
class PlainCodec:
    """A cache of plain numbers (float32 / float16 / bfloat16): stored as they are."""

    dtype: torch.dtype

    def decode(self, stored: Tensor, kind: str) -> Tensor:
        return stored

    def encode(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        return keys.to(self.dtype), values.to(self.dtype)

    def decode_query(self, query: Tensor) -> Tensor:
        return query


# vLLM's --kv-cache-dtype names of fp8 caches -> the float8 format of their codes.
FP8_FORMATS = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
               "fp8_e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class Fp8Codec:
    """An fp8 cache: one byte per entry, the code of a float8 number, times the layer's
    per-tensor scale (one for keys, one for values).

    Decoding is exact arithmetic (code value x scale, in float32). Encoding is the backend's own
    cache writer (``quantize``), with the SAME scales: a merged entry is stored exactly as vLLM
    would store that value, and nothing another token shares is rescaled. Entries that are kept
    unmerged are never re-encoded (their codes are copied: see ``compaction.compact_prompt``).
    """

    float8: torch.dtype
    k_scale: float
    v_scale: float
    quantize: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
    # Scale of queries the backend receives quantized (FLASH_ATTN): one value, or one per KV
    # head; None when queries arrive as numbers (CPU_ATTN).
    q_scale: Tensor | None = None

    def decode(self, stored: Tensor, kind: str) -> Tensor:
        scale = self.k_scale if kind == "key" else self.v_scale
        return stored.view(self.float8).to(torch.float32) * scale

    def encode(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        return self.quantize(keys, values)

    def decode_query(self, query: Tensor) -> Tensor:
        if self.q_scale is None or query.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2,
                                                        torch.float8_e4m3fnuz):
            return query
        scale = self.q_scale.to(device=query.device, dtype=torch.float32).flatten()
        if scale.numel() > 1:  # per KV head: consecutive query heads share one
            scale = scale.repeat_interleave(query.shape[1] // scale.numel())[:, None]
        return query.to(torch.float32) * scale
