"""Per-layer work of one compressed request inside an attention forward. No vLLM import.

:func:`process_request_layer` runs right after the stock attention of a layer wrote ``output``
for every query row of the step: it scores the request's prompt queries against the paged keys.
The chunk that completes the prompt does not compress: the first output token comes from the
uncompressed prefill anyway, so compression is *deferred* to the request's next step
(:func:`compress_deferred_layer`, right BEFORE that step's attention of the layer), off the path
of the first token (TTFT). Its last scoring queries (at most :data:`DEFER_SCORING_QUERIES`, e.g.
the window of window scoring) are kept and scored then too. The next step's read view already
leaves out the plan's holes (``RequestPlan.holes``: known without scores), and every layer is
compressed before its attention reads the cache. Only a replay after preemption (a chunk that
completes the prompt AND holds output tokens, which first saw the compressed cache) compresses
at once. Device work is timed with :class:`DeviceTimer` (CUDA events, never a synchronisation).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lookm_vllm.core import AttentionAccumulator

from .compaction import (
    Compaction,
    HoleMap,
    compact_prompt,
    gather_keys,
    gather_prompt,
    read_slots,
)
from .kv_layout import KVCodec, PlainCodec
from .plan import RequestPlan

# Scoring queries of the prompt's last chunk kept for the next step (per layer: [n, Hq, d]);
# more than this (full scoring of a long last chunk) are scored in the prefill step itself.
DEFER_SCORING_QUERIES = 512

# Set LOOKM_DEBUG_DUMP_DIR to save, per request and compressed layer, the kept KV read back from
# the paged cache (tests compare it with lookm_vllm.core on transformers' KV).
DUMP_ENV = "LOOKM_DEBUG_DUMP_DIR"


class DeviceTimer:
    """Sums the durations of intervals of device work without synchronising the device.

    On the CPU an interval is wall-clock time. On CUDA it is measured by a pair of events on the
    current stream, read only once they have completed (:meth:`ready`); a
    ``torch.cuda.synchronize`` per layer would stall the engine and asynchronous scheduling.
    """

    def __init__(self) -> None:
        self._seconds = 0.0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def interval(self, device: torch.device):
        if device.type != "cuda":
            t0 = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - t0
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._pending.append((start, end))

    def ready(self) -> bool:
        """Whether every interval has been measured (folds in the completed CUDA ones)."""
        if self._pending and self._pending[-1][1].query():   # events complete in stream order
            self._seconds += sum(s.elapsed_time(e) for s, e in self._pending) / 1e3
            self._pending.clear()
        return not self._pending

    @property
    def milliseconds(self) -> float:
        return round(self._seconds * 1e3, 3)


@dataclass
class WorkerRequest:
    """One compressed request on a worker: its plan, running scores, and once compressed, its
    holes."""

    plan: RequestPlan
    accumulators: dict[str, AttentionAccumulator] = field(default_factory=dict)
    holes: list[int] | None = None          # set once compressed (all layers agree)
    hole_map: HoleMap | None = None
    num_kept: int = 0
    scoring: DeviceTimer = field(default_factory=DeviceTimer)
    compression: DeviceTimer = field(default_factory=DeviceTimer)
    reported: bool = False                  # holes sent to the scheduler
    timings_reported: bool = False
    # Prefix caching: private blocks for the live full prompt blocks (the originals may be
    # shared or hashed and are never written); ``skip``: the pool had none to give, so the
    # request is not compressed. ``row``: the block row the compacted prompt is read through.
    targets: list[int] | None = None
    skip: bool = False
    row: Tensor | None = None
    # Deferred compression: the prompt is complete and the next step compresses it (before its
    # attention); per layer, the last chunk's scoring queries not scored yet (query, first).
    deferred: bool = False
    deferred_queries: dict[str, tuple[Tensor, int]] = field(default_factory=dict)

    @property
    def compressed(self) -> bool:
        return self.holes is not None


@dataclass(frozen=True)
class RowWork:
    """What one layer must do for one batch row in this step."""

    req_id: str
    row: int
    token_start: int        # first query row of this request in the flattened batch
    position_start: int     # logical position of that query (= tokens already computed)
    num_tokens: int


def process_request_layer(req_id: str, req: WorkerRequest, item: RowWork, layer_name: str,
                          query: Tensor, output: Tensor, key_cache: Tensor, value_cache: Tensor,
                          block_row: Tensor, scale: float, codec: KVCodec) -> None:
    """Score this layer's prompt queries of one request and, at the prompt's end, compress it.

    Parameters
    ----------
    query : Tensor
        ``[num_tokens, Hq, d]``, the step's queries as the backend received them.
    output : Tensor
        The step's attention output (rows of ``query``), already written by the stock kernel.
    key_cache, value_cache : Tensor
        ``[num_blocks, Hkv, block_size, d]`` views of the layer's paged cache (``kv_layout``).
    block_row : Tensor
        The request's physical block ids in logical order.
    scale : float
        The layer's softmax scale.
    codec : KVCodec
        What the cache entries mean (plain numbers, or fp8 codes with the layer's scales).
    """
    plan = req.plan
    end = min(item.position_start + item.num_tokens, plan.prompt_len)
    completes_prompt = end == plan.prompt_len and item.position_start + item.num_tokens >= end
    # Rows past the prompt: a preempted request replaying its outputs, which saw the compressed
    # cache when first decoded: compress now and redo their attention.
    replay = item.position_start + item.num_tokens > plan.prompt_len
    n_scoring = plan.num_scoring_queries
    first = max(item.position_start, plan.prompt_len - n_scoring)
    offset = item.token_start + first - item.position_start
    stored_keys = None
    if completes_prompt and not replay and 0 < end - first <= DEFER_SCORING_QUERIES:
        req.deferred_queries[layer_name] = (query[offset:offset + end - first].clone(), first)
    elif n_scoring and first < end:
        stored_keys = _score(req, layer_name, query[offset:offset + end - first], first, end,
                             key_cache, block_row, scale, codec)
    if not completes_prompt:
        return
    if not replay:
        req.deferred = True
        return
    _compress_layer(req_id, req, layer_name, key_cache, value_cache, block_row, stored_keys,
                    codec)
    _attend_past_prompt(req, item, query, output, key_cache, value_cache, block_row, scale, codec)


def compress_deferred_layer(req_id: str, req: WorkerRequest, layer_name: str,
                            key_cache: Tensor, value_cache: Tensor, block_row: Tensor,
                            scale: float, codec: KVCodec) -> None:
    """Compress one layer of a request whose prompt completed in an earlier step, before this
    step's attention of the layer: score its kept queries, then compact (``block_row``: the
    request's original, uncompacted block row)."""
    stored_keys = None
    pending = req.deferred_queries.pop(layer_name, None)
    if pending is not None:
        queries, first = pending
        stored_keys = _score(req, layer_name, queries, first, req.plan.prompt_len, key_cache,
                             block_row, scale, codec)
    _compress_layer(req_id, req, layer_name, key_cache, value_cache, block_row, stored_keys,
                    codec)


def _score(req: WorkerRequest, layer_name: str, queries: Tensor, first: int, end: int,
           key_cache: Tensor, block_row: Tensor, scale: float, codec: KVCodec) -> Tensor:
    """Add the attention of prompt queries ``[first, end)`` (``queries`` ``[n, Hq, d]``) to the
    layer's scores; returns the stored keys of positions ``[0, end)`` it gathered."""
    with req.scoring.interval(key_cache.device):
        acc = req.accumulators.get(layer_name)
        if acc is None:
            acc = req.accumulators[layer_name] = AttentionAccumulator(key_cache.shape[1],
                                                                      scale=scale)
        stored_keys = gather_keys(key_cache, block_row, end,
                                  scoring_gather_dtype(key_cache, codec))   # values unused
        acc.update(queries.transpose(0, 1), codec.decode(stored_keys, "key"), query_start=first)
    return stored_keys


def scoring_gather_dtype(key_cache: Tensor, codec: KVCodec) -> torch.dtype | None:
    """The dtype scoring gathers the prompt's keys in: on the CPU a cache of plain numbers is
    gathered straight as float32, what scoring and the merge compute in (the same numbers: such
    a codec stores them as they are); otherwise the cache's own (None)."""
    plain_cpu = key_cache.device.type == "cpu" and isinstance(codec, PlainCodec)
    return torch.float32 if plain_cpu else None


def _compress_layer(req_id: str, req: WorkerRequest, layer_name: str, key_cache: Tensor,
                    value_cache: Tensor, block_row: Tensor, stored_keys: Tensor | None,
                    codec: KVCodec) -> None:
    acc = req.accumulators.pop(layer_name, None)
    scores = None if acc is None else acc.scores
    dump_dir = os.environ.get(DUMP_ENV)
    if dump_dir:  # before the cache is rewritten
        before = gather_prompt(key_cache, value_cache, block_row, req.plan.prompt_len)
    if req.skip:  # nothing to write to: left uncompressed
        result = Compaction(holes=[], num_kept=req.plan.prompt_len)
    else:
        with req.compression.interval(key_cache.device):
            result = compact_prompt(key_cache, value_cache, block_row, req.plan, scores,
                                    stored_keys=stored_keys, codec=codec, targets=req.targets)
    if dump_dir and result.slots is not None:
        after = read_slots(key_cache, value_cache, result.row, result.slots)
        _dump(Path(dump_dir) / req_id / f"epoch{req.plan.epoch}", layer_name, before, after,
              scores, result, codec)
    if req.holes is None:
        req.holes, req.num_kept = result.holes, result.num_kept
        req.row = result.row
        req.deferred = False
        req.hole_map = HoleMap.from_holes(
            result.holes, req.targets if result.holes and req.targets is not None else None)
    elif req.holes != result.holes:  # the plan is score-independent: this cannot differ
        raise RuntimeError(f"layer {layer_name} freed blocks {result.holes}, "
                           f"earlier layers {req.holes}")


def _attend_past_prompt(req: WorkerRequest, item: RowWork, query: Tensor, output: Tensor,
                        key_cache: Tensor, value_cache: Tensor, block_row: Tensor,
                        scale: float, codec: KVCodec) -> None:
    """Redo attention for rows of this chunk that lie past the prompt, on the compressed cache.

    Only a preempted request replaying its output tokens has such rows (vLLM recomputes
    prompt + outputs in one prefill). When those tokens were first decoded they saw the
    compressed cache, so they must see it again, or the replay would diverge.
    """
    prompt_len = req.plan.prompt_len
    total = item.position_start + item.num_tokens
    num = total - prompt_len
    if num <= 0 or not req.holes:
        return
    block_size = key_cache.shape[2]
    live = torch.from_numpy(req.hole_map.live_columns(-(-total // block_size)))
    length = total - len(req.holes) * block_size
    row = block_row if req.row is None else req.row
    keys, values = gather_prompt(key_cache, value_cache, row[live.to(row.device)], length)
    first = item.token_start + prompt_len - item.position_start
    q = query[first:first + num].float().transpose(0, 1)                # [Hq, n, d]
    keys, values = codec.decode(keys, "key").float(), codec.decode(values, "value").float()
    positions = torch.arange(length - num, length, device=q.device)
    causal = torch.arange(length, device=q.device)[None, :] <= positions[:, None]
    attended = torch.nn.functional.scaled_dot_product_attention(
        q, keys, values, attn_mask=causal, scale=scale, enable_gqa=True)  # [Hq, n, d]
    rows = output[first:first + num]
    rows.copy_(attended.transpose(0, 1).reshape(rows.shape).to(rows.dtype))


def _dump(directory: Path, layer_name: str, before, after, scores, result,
          codec: KVCodec) -> None:
    """Debug/test aid: the layer's prompt KV and scores before compression, and what the paged
    cache holds for the kept positions after it (as numbers; also the stored bytes, for
    caches of codes)."""
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    directory.mkdir(parents=True, exist_ok=True)
    record = {"kept": result.kept.cpu(), "slots": result.slots.cpu(), "holes": result.holes,
              "keys_before": codec.decode(before[0], "key").cpu(),
              "values_before": codec.decode(before[1], "value").cpu(),
              "scores": None if scores is None else scores.cpu(),
              "keys": codec.decode(after[0], "key").cpu(),
              "values": codec.decode(after[1], "value").cpu()}
    if not isinstance(codec, PlainCodec):
        record |= {"stored_keys_before": before[0].cpu(), "stored_values_before": before[1].cpu(),
                   "stored_keys": after[0].cpu(), "stored_values": after[1].cpu(),
                   "k_scale": codec.k_scale, "v_scale": codec.v_scale}
    torch.save(record, directory / f"{layer_name}.rank{rank}.pt")
