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

With prefix caching, the full prompt blocks may be shared or hashed and are never written: the
scheduler hands over private ``targets`` (one per live full prompt block, in column order) and
step 3 writes there instead (``Compaction.row``); the originals are only read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lookm_vllm.core import CompressedKV, compress

from .kv_layout import KVCodec, PlainCodec
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
    row : Tensor or None
        The block row the kept entries were written through (``block_row`` with the live full
        prompt blocks replaced by the private ``targets``; ``block_row`` itself in place).
    """

    holes: list[int]
    num_kept: int
    kept: Tensor | None = None
    slots: Tensor | None = None
    row: Tensor | None = None


def _gather(cache: Tensor, block_row: Tensor, length: int, dtype: torch.dtype | None = None
            ) -> Tensor:
    """``[Hkv, length, d]`` entries of positions ``[0, length)`` of one request's blocks, as
    ``dtype`` (default: the cache's)."""
    block_size = cache.shape[2]
    num_blocks = -(-length // block_size)
    ids = block_row[:num_blocks].to(device=cache.device, dtype=torch.long)
    if cache.device.type == "cpu":
        return _gather_blocks(cache, ids.tolist(), length, dtype or cache.dtype)
    blocks = cache.index_select(0, ids)                          # [nb, Hkv, bs, d]
    heads = blocks.permute(1, 0, 2, 3).reshape(cache.shape[1], -1, cache.shape[3])
    return heads[:, :length].to(dtype or cache.dtype)


def _gather_blocks(cache: Tensor, ids: list[int], length: int, dtype: torch.dtype) -> Tensor:
    """The CPU gather: ONE copy per block straight into the result, converting on the way
    (``index_select`` then a head-major reshape copies twice, a dtype conversion a third time;
    scoring gathers ``[0, end)`` once per prefill chunk, so this is paid per chunk).

    The result is laid out like a block's entries: when positions are the fastest axis of the
    cache (CPU_ATTN keys, stored ``[d, block_size]`` per head), as ``[Hkv, d, L]`` returned
    transposed (still ``[Hkv, L, d]``), so that every copy moves whole rows.
    """
    _, num_heads, block_size, dim = cache.shape
    span = len(ids) * block_size
    if cache.stride(2) == 1 and dim > 1:
        out = torch.empty(num_heads, dim, span, dtype=dtype)
        for j, block in enumerate(ids):
            out[:, :, j * block_size:(j + 1) * block_size].copy_(cache[block].transpose(1, 2))
        return out.transpose(1, 2)[:, :length]
    out = torch.empty(num_heads, span, dim, dtype=dtype)
    for j, block in enumerate(ids):
        out[:, j * block_size:(j + 1) * block_size].copy_(cache[block])
    return out[:, :length]


def gather_keys(key_cache: Tensor, block_row: Tensor, length: int,
                dtype: torch.dtype | None = None) -> Tensor:
    """``[Hkv, length, d]`` keys of positions ``[0, length)`` of one request (for scoring, which
    never reads values), as ``dtype`` (default: the cache's)."""
    return _gather(key_cache, block_row, length, dtype)


def gather_prompt(key_cache: Tensor, value_cache: Tensor, block_row: Tensor, length: int
                  ) -> tuple[Tensor, Tensor]:
    """``[Hkv, length, d]`` keys and values of positions ``[0, length)`` of one request."""
    return _gather(key_cache, block_row, length), _gather(value_cache, block_row, length)


def compact_prompt(key_cache: Tensor, value_cache: Tensor, block_row: Tensor, plan: RequestPlan,
                   scores: Tensor | None, stored_keys: Tensor | None = None,
                   codec: KVCodec | None = None, targets: list[int] | None = None
                   ) -> Compaction:
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
    stored_keys : Tensor, optional
        The prompt's stored keys ``[Hkv, P, d]`` when the caller has just gathered them (scoring
        did), so they are not gathered twice; for a cache of plain numbers they may be in
        float32 (the same numbers).
    codec : KVCodec, optional
        What the cache entries mean (default: plain numbers of the cache's dtype). Compression
        runs on the decoded numbers; kept entries that nothing merged into keep their stored
        bytes (bit-exact), merged ones are encoded by the codec.
    targets : list of int, optional
        Private physical blocks for the live (non-hole) full prompt blocks, in column order:
        the kept entries of those columns are written there and the original blocks are left
        untouched (prefix caching). None: rewrite the request's own blocks in place.
    """
    block_size = key_cache.shape[2]
    length = plan.prompt_len
    evictable_blocks = plan.evictable_blocks(block_size)
    if not evictable_blocks:
        return Compaction(holes=[], num_kept=length)
    codec = codec or PlainCodec(key_cache.dtype)
    if stored_keys is None:
        stored_keys = gather_keys(key_cache, block_row, length)
    stored_values = _gather(value_cache, block_row, length)
    keys, values = codec.decode(stored_keys, "key"), codec.decode(stored_values, "value")
    evictable = plan.evictable_mask(block_size, keys.device)
    out = compress(keys, values, None if scores is None else scores[:, :length],
                   plan.is_image(keys.device), plan.config,
                   evictable=evictable, keep_multiple=block_size,
                   modality=plan.modality(keys.device))
    if not out.compressed:
        return Compaction(holes=[], num_kept=length)

    kept_evictable = evictable[out.kept]                          # [Hkv, K]
    # Slot of every kept row: its own slot, or its rank among the head's kept evictable rows
    # inside the packed region.
    logical = out.kept.clone()
    rank = kept_evictable.long().cumsum(dim=1) - 1
    region = plan.evictable_block_ids(block_size, keys.device)
    packed = region[rank.clamp(min=0) // block_size] * block_size + rank.clamp(min=0) % block_size
    logical = torch.where(kept_evictable, packed, logical)
    new_keys, new_values = _stored_rows(out, stored_keys, stored_values, codec)
    kept_region_blocks = out.num_kept_evictable // block_size
    holes = evictable_blocks[kept_region_blocks:]
    if holes != plan.holes(block_size):   # the read view may be built from the plan's holes
        raise RuntimeError(f"compression freed blocks {holes}, the plan said "
                           f"{plan.holes(block_size)}")
    row = block_row if targets is None else redirected_row(block_row, holes, targets,
                                                           length // block_size)
    index = _slot_index(row, logical, block_size)
    key_cache[index] = new_keys
    value_cache[index] = new_values
    return Compaction(holes=holes, num_kept=out.num_kept, kept=out.kept, slots=logical, row=row)


def redirected_row(block_row: Tensor, holes: list[int], targets: list[int], num_full: int
                   ) -> Tensor:
    """``block_row`` with its live full prompt columns (``[0, num_full)`` minus ``holes``)
    replaced, in order, by the private ``targets``."""
    live = sorted(set(range(num_full)) - set(holes))
    if len(live) != len(targets):
        raise RuntimeError(f"{len(targets)} private blocks for {len(live)} live prompt blocks")
    row = block_row.clone()
    if live:
        row[torch.tensor(live, device=row.device)] = torch.tensor(targets, dtype=row.dtype,
                                                                  device=row.device)
    return row


def _stored_rows(out: CompressedKV, stored_keys: Tensor, stored_values: Tensor, codec: KVCodec
                 ) -> tuple[Tensor, Tensor]:
    """What the cache stores for each kept row: its own stored bytes when nothing merged into
    it, the codec's encoding of the merged numbers otherwise."""
    original = out.kept[..., None].expand(-1, -1, stored_keys.shape[-1])
    merged = (out.merge_counts > 0)[..., None]
    if isinstance(codec, PlainCodec):  # unmerged rows of out hold the inputs as they are
        return codec.encode(out.keys, out.values)
    encoded_keys, encoded_values = codec.encode(out.keys, out.values)
    return (torch.where(merged, encoded_keys, stored_keys.gather(1, original)),
            torch.where(merged, encoded_values, stored_values.gather(1, original)))


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


@dataclass(frozen=True)
class HoleMap:
    """Which logical blocks of a compressed request still hold KV.

    Holes lie inside the prompt (``plan.evictable_blocks``); every block after them is live. The
    compacted row of a request reads, at its column ``j``, the logical column
    ``kept_columns[j]`` for ``j < len(kept_columns)`` and ``j + len(holes)`` after that.

    Attributes
    ----------
    holes : tuple of int
        Freed logical block indices, ascending.
    kept_columns : numpy.ndarray
        int64, the live logical columns before the last hole (computed once per request, so
        building a step's read view costs no per-column Python).
    private : numpy.ndarray or None
        int64 physical blocks that replace the first ``len(private)`` columns of the compacted
        row (the live full prompt blocks, written to private blocks under prefix caching).
    """

    holes: tuple[int, ...]
    kept_columns: np.ndarray
    private: np.ndarray | None = None

    @classmethod
    def from_holes(cls, holes: list[int] | tuple[int, ...],
                   private: list[int] | None = None) -> HoleMap:
        holes = tuple(sorted(holes))
        end = holes[-1] + 1 if holes else 0
        return cls(holes, np.setdiff1d(np.arange(end, dtype=np.int64), holes),
                   None if private is None else np.asarray(private, dtype=np.int64))

    def live_columns(self, num_blocks: int) -> np.ndarray:
        """Logical columns ``< num_blocks`` that hold KV, in order (``num_blocks`` covers at
        least every hole)."""
        tail = np.arange(len(self.kept_columns) + len(self.holes), num_blocks, dtype=np.int64)
        return np.concatenate([self.kept_columns, tail])


def compacted_view(block_table: Tensor, seq_lens: Tensor, seq_lens_cpu: Tensor,
                   holed: list[tuple[int, HoleMap]], block_size: int,
                   out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The read view of compressed requests: their block-table rows without the holes.

    For each ``(row, holes)`` the row's blocks are shifted left over the holes and its sequence
    length drops by ``len(holes) * block_size``; the first columns are then replaced by the
    request's private blocks when it has any (``HoleMap.private``). Slot mapping and positions
    stay logical, so new tokens are still written to (and RoPE'd at) their uncompressed
    positions.

    Built for a device-resident batch without reading anything back from the device: the
    gather index comes from the CPU sequence lengths and each request's :class:`HoleMap`, goes
    over in ONE non-blocking host-to-device copy, and a fixed handful of device ops (copy,
    gather, scatter, add) build the view, however many rows are compressed. No per-row launches,
    no device-to-host synchronisation (which would also stall asynchronous scheduling).

    Parameters
    ----------
    block_table, seq_lens : Tensor
        The step's ``[R, W]`` block table and ``[R]`` sequence lengths on the device (the
        runner's persistent buffers: never modified here).
    seq_lens_cpu : Tensor
        The same sequence lengths on the CPU (exact for every row: no speculative decoding).
    holed : list of (int, HoleMap)
        Compressed rows and their holes.
    block_size : int
        Tokens per block of ``block_table``.
    out : (Tensor, Tensor), optional
        Persistent device buffers (``[>= R, W]`` and ``[>= R]``) to build the view in; new
        tensors when not given.

    Returns
    -------
    (Tensor, Tensor, Tensor)
        The compacted block table and sequence lengths on the device, and the compacted CPU
        sequence lengths.
    """
    num_rows, width = block_table.shape
    if out is None:
        table_out, lens_out = torch.empty_like(block_table), torch.empty_like(seq_lens)
    else:
        table_out, lens_out = out[0][:num_rows], out[1][:num_rows]
    table_out.copy_(block_table)
    lens_out.copy_(seq_lens)
    lens_cpu = seq_lens_cpu.clone()
    if not holed:
        return table_out, lens_out, lens_cpu

    lens = seq_lens_cpu.numpy()
    live = [holes.live_columns(-(-int(lens[row]) // block_size)) for row, holes in holed]
    columns = max(len(cols) for cols in live)
    redirect = any(holes.private is not None for _, holes in holed)
    # One CPU tensor, one copy: [rows | hole tokens | gather index (padded, clipped)
    # | private block or -1 (only when a row has private blocks)].
    packed = np.empty((len(holed), 2 + columns * (2 if redirect else 1)), dtype=np.int64)
    packed[:, 2:2 + columns] = width - 1
    packed[:, 2 + columns:] = -1
    for i, ((row, holes), cols) in enumerate(zip(holed, live, strict=True)):
        packed[i, 0] = row
        packed[i, 1] = len(holes.holes) * block_size
        packed[i, 2:2 + len(cols)] = cols
        if holes.private is not None:
            packed[i, 2 + columns:2 + columns + len(holes.private)] = holes.private
    rows_cpu = torch.from_numpy(packed[:, 0])
    lens_cpu[rows_cpu] -= torch.from_numpy(packed[:, 1]).to(lens_cpu.dtype)
    packed_dev = torch.from_numpy(packed).to(block_table.device, non_blocking=True)
    rows, index = packed_dev[:, 0], packed_dev[:, 2:2 + columns]
    gathered = block_table.index_select(0, rows).gather(1, index)
    if redirect:
        private = packed_dev[:, 2 + columns:]
        gathered = torch.where(private >= 0, private.to(gathered.dtype), gathered)
    table_out[rows, :columns] = gathered
    lens_out.index_add_(0, rows, -packed_dev[:, 1].to(lens_out.dtype))
    return table_out, lens_out, lens_cpu
