"""Compress one request's prompt KV in place in a paged cache. No vLLM import.

The paged cache keeps LOGICAL addressing (positions, slot mapping, token counts); compression
turns some whole blocks of the prompt into holes:

1. gather the prompt's K/V ``[Hkv, P, d]`` through the request's block-table row;
2. ``lookm_vllm.core.compress`` with ``evictable`` = positions of the plan's evictable blocks and
   ``keep_multiple`` = block size, so every head keeps the same, block-aligned number of
   evictable positions;
3. write every kept non-evictable position back to its own slot (merges may have changed it), and
   pack each head's kept evictable positions, in order, into the first ``k / block_size`` of the
   evictable blocks (attention over a cache is order-free and keys carry their own RoPE);
4. the remaining evictable blocks are holes: the worker's read view skips them and the scheduler
   returns them to the pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lookm_vllm.core import compress

from .plan import RequestPlan


@dataclass(frozen=True)
class Compaction:
    """The outcome of compressing one layer of one request.

    Attributes
    ----------
    holes : list of int
        Logical block indices of the prompt that no longer hold live KV (ascending).
    num_kept : int
        KV positions kept per head (== prompt_len - len(holes) * block_size).
    kept, slots : Tensor or None
        int64 ``[Hkv, K]``: each head's kept positions and the logical slot (block index *
        block_size + offset) each now lives in; None when nothing was compressed.
    """

    holes: list[int]
    num_kept: int
    kept: Tensor | None = None
    slots: Tensor | None = None


def gather_prompt(key_cache: Tensor, value_cache: Tensor, block_row: Tensor, length: int
                  ) -> tuple[Tensor, Tensor]:
    """``[Hkv, length, d]`` keys and values of positions ``[0, length)`` of one request."""
    block_size = key_cache.shape[2]
    num_blocks = -(-length // block_size)
    ids = block_row[:num_blocks].to(device=key_cache.device, dtype=torch.long)

    def take(cache: Tensor) -> Tensor:
        blocks = cache.index_select(0, ids)                      # [nb, Hkv, bs, d]
        heads = blocks.permute(1, 0, 2, 3).reshape(cache.shape[1], -1, cache.shape[3])
        return heads[:, :length]

    return take(key_cache), take(value_cache)


def compact_prompt(key_cache: Tensor, value_cache: Tensor, block_row: Tensor, plan: RequestPlan,
                   scores: Tensor | None) -> Compaction:
    """Compress a request's prompt in one layer's paged cache, in place.

    Parameters
    ----------
    key_cache, value_cache : Tensor
        ``[num_blocks, Hkv, block_size, d]`` views of the layer's cache (see ``kv_layout``).
    block_row : Tensor
        The request's physical block ids, logical block order (at least the prompt's blocks).
    plan : RequestPlan
        The request's plan.
    scores : Tensor or None
        float32 ``[Hkv, P]`` accumulated attention (None for methods that need none).
    """
    block_size = key_cache.shape[2]
    length = plan.prompt_len
    evictable_blocks = plan.evictable_blocks(block_size)
    if not evictable_blocks:
        return Compaction(holes=[], num_kept=length)
    keys, values = gather_prompt(key_cache, value_cache, block_row, length)
    evictable = plan.evictable_mask(block_size).to(keys.device)
    out = compress(keys, values, None if scores is None else scores[:, :length],
                   plan.is_image().to(keys.device), plan.config,
                   evictable=evictable, keep_multiple=block_size)
    if not out.compressed:
        return Compaction(holes=[], num_kept=length)

    kept_evictable = evictable[out.kept]                          # [Hkv, K]
    # Slot of every kept row: its own slot, or its rank among the head's kept evictable rows
    # inside the packed region.
    logical = out.kept.clone()
    rank = kept_evictable.long().cumsum(dim=1) - 1
    region = torch.tensor(evictable_blocks, device=keys.device, dtype=torch.long)
    packed = region[rank.clamp(min=0) // block_size] * block_size + rank.clamp(min=0) % block_size
    logical = torch.where(kept_evictable, packed, logical)
    index = _slot_index(block_row, logical, block_size)
    key_cache[index] = out.keys.to(key_cache.dtype)
    value_cache[index] = out.values.to(value_cache.dtype)

    kept_region_blocks = out.num_kept_evictable // block_size
    return Compaction(holes=evictable_blocks[kept_region_blocks:], num_kept=out.num_kept,
                      kept=out.kept, slots=logical)


def read_slots(key_cache: Tensor, value_cache: Tensor, block_row: Tensor, slots: Tensor
               ) -> tuple[Tensor, Tensor]:
    """Read ``[Hkv, K, d]`` keys and values back from logical ``slots`` ``[Hkv, K]``."""
    index = _slot_index(block_row, slots, key_cache.shape[2])
    return key_cache[index], value_cache[index]


def _slot_index(block_row: Tensor, slots: Tensor, block_size: int
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Advanced index ``(block, head, offset)`` into a ``[blocks, Hkv, block_size, d]`` view for
    per-head logical ``slots`` ``[Hkv, K]`` of the request whose blocks are ``block_row``."""
    row = block_row.to(device=slots.device, dtype=torch.long)
    head = torch.arange(slots.shape[0], device=slots.device)[:, None].expand_as(slots)
    return row[slots // block_size], head, slots % block_size


def compacted_view(block_table: Tensor, seq_lens: Tensor, holed: list[tuple[int, list[int]]],
                   block_size: int) -> tuple[Tensor, Tensor]:
    """The read view of compressed requests: their block-table rows without the holes.

    Returns new ``(block_table, seq_lens)`` (the inputs are persistent runner buffers and are not
    modified): for each ``(row, holes)`` the row's blocks are shifted left over the holes and its
    sequence length drops by ``len(holes) * block_size``. Slot mapping and positions stay
    logical, so new tokens are still written to (and RoPE'd at) their uncompressed positions.
    """
    block_table = block_table.clone()
    seq_lens = seq_lens.clone()
    for row, holes in holed:
        num_blocks = -(-int(seq_lens[row]) // block_size)
        dropped = set(holes)
        keep = [i for i in range(num_blocks) if i not in dropped]
        block_table[row, :len(keep)] = block_table[row, keep]
        seq_lens[row] -= len(holes) * block_size
    return block_table, seq_lens
