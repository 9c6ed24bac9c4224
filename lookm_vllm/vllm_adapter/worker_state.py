"""Worker-process state of the compression plugin. No vLLM import.

One ``WorkerState`` per worker process (module global ``STATE``), fed by three vLLM hooks:
- the runner hook records the request order of the step's batch (rows of the attention metadata);
- the connector's ``handle_preemptions`` (the first hook of a step) adds plans and drops
  finished/preempted requests;
- the attention backend reads plans, accumulates scores, compresses, and records the holes.
The connector's ``build_connector_worker_meta`` then ships the step's results to the scheduler.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lookm_vllm.core import AttentionAccumulator

from .compaction import compact_prompt, gather_prompt, read_slots
from .kv_layout import KVLayout
from .plan import RequestPlan


@dataclass
class WorkerRequest:
    plan: RequestPlan
    accumulators: dict[str, AttentionAccumulator] = field(default_factory=dict)
    holes: list[int] | None = None          # set once compressed (all layers agree)
    num_kept: int = 0
    scoring_s: float = 0.0
    compression_s: float = 0.0
    reported: bool = False

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


@dataclass
class WorkerState:
    requests: dict[str, WorkerRequest] = field(default_factory=dict)
    step_req_ids: list[str] = field(default_factory=list)
    results: dict[str, dict] = field(default_factory=dict)
    active: bool = False

    # --- connector metadata --------------------------------------------------------------
    def apply(self, plans: dict[str, dict], drop: list[str]) -> None:
        for req_id in drop:
            self.requests.pop(req_id, None)
            self.results.pop(req_id, None)
        for req_id, data in plans.items():
            plan = RequestPlan.from_dict(data)
            current = self.requests.get(req_id)
            if current is None or current.plan.epoch != plan.epoch:
                self.requests[req_id] = WorkerRequest(plan)

    def take_results(self) -> dict[str, dict]:
        results, self.results = self.results, {}
        return results

    # --- attention metadata (builder) ----------------------------------------------------
    def rows(self, num_reqs: int, query_start_loc: Tensor, seq_lens: Tensor
             ) -> tuple[list[RowWork], list[tuple[int, list[int]]]]:
        """Split this step's rows into prefill work and compacted-read rows.

        Returns ``(work, holes)``: rows whose prompt is (partly) in this step, and
        ``(row, holes)`` for rows reading a compressed cache.
        """
        work, holed = [], []
        if not self.requests:
            return work, holed
        qsl = query_start_loc.tolist()
        lens = seq_lens.tolist()
        for row, req_id in enumerate(self.step_req_ids[:num_reqs]):
            req = self.requests.get(req_id)
            if req is None:
                continue
            num_tokens = qsl[row + 1] - qsl[row]
            start = lens[row] - num_tokens
            if req.compressed:
                if req.holes:
                    holed.append((row, req.holes))
            elif start < req.plan.prompt_len:
                work.append(RowWork(req_id, row, qsl[row], start, num_tokens))
        return work, holed

    # --- attention forward -----------------------------------------------------------------
    def process_layer(self, layer_name: str, work: list[RowWork], query: Tensor, output: Tensor,
                      kv_cache: Tensor, block_table: Tensor, layout: KVLayout,
                      scale: float) -> None:
        """Score this layer's prompt queries and, at the prompt's end, compress the layer.

        Runs after the stock attention of the layer wrote ``output`` for every query row.
        """
        key_cache, value_cache = layout.split(kv_cache)
        for item in work:
            req = self.requests[item.req_id]
            plan = req.plan
            end = min(item.position_start + item.num_tokens, plan.prompt_len)
            block_row = block_table[item.row]
            n_scoring = plan.num_scoring_queries
            first = max(item.position_start, plan.prompt_len - n_scoring)
            if n_scoring and first < end:
                t0 = time.perf_counter()
                acc = req.accumulators.get(layer_name)
                if acc is None:
                    acc = req.accumulators[layer_name] = AttentionAccumulator(key_cache.shape[1])
                offset = item.token_start + first - item.position_start
                q = query[offset:offset + end - first]                    # [n, Hq, d]
                head_dim = q.shape[-1]
                # accumulate with the layer's own softmax scale
                q = q.transpose(0, 1) * (scale * math.sqrt(head_dim))
                keys, _ = gather_prompt(key_cache, value_cache, block_row, end)
                acc.update(q, keys, query_start=first)
                req.scoring_s += time.perf_counter() - t0
            if end == plan.prompt_len and item.position_start + item.num_tokens >= end:
                self._compress_layer(item.req_id, req, layer_name, key_cache, value_cache,
                                    block_row)
                self._attend_past_prompt(req, item, query, output, key_cache, value_cache,
                                         block_row, scale)

    def _attend_past_prompt(self, req: WorkerRequest, item: RowWork, query: Tensor,
                            output: Tensor, key_cache: Tensor, value_cache: Tensor,
                            block_row: Tensor, scale: float) -> None:
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
        holes = set(req.holes)
        kept_blocks = [b for b in range(-(-total // block_size)) if b not in holes]
        length = total - len(holes) * block_size
        keys, values = gather_prompt(key_cache, value_cache, block_row[kept_blocks], length)
        first = item.token_start + prompt_len - item.position_start
        q = query[first:first + num].float().transpose(0, 1)                # [Hq, n, d]
        group = q.shape[0] // keys.shape[0]
        positions = torch.arange(length - num, length, device=q.device)
        causal = torch.arange(length, device=q.device)[None, :] <= positions[:, None]
        attended = torch.nn.functional.scaled_dot_product_attention(
            q, keys.float().repeat_interleave(group, 0), values.float().repeat_interleave(group, 0),
            attn_mask=causal, scale=scale)                                   # [Hq, n, d]
        rows = output[first:first + num]
        rows.copy_(attended.transpose(0, 1).reshape(rows.shape).to(rows.dtype))

    def _compress_layer(self, req_id: str, req: WorkerRequest, layer_name: str, key_cache: Tensor,
                        value_cache: Tensor, block_row: Tensor) -> None:
        acc = req.accumulators.pop(layer_name, None)
        scores = None if acc is None else acc.scores
        dump_dir = os.environ.get(DUMP_ENV)
        if dump_dir:  # before the cache is rewritten
            before = gather_prompt(key_cache, value_cache, block_row, req.plan.prompt_len)
        t0 = time.perf_counter()
        result = compact_prompt(key_cache, value_cache, block_row, req.plan, scores)
        if key_cache.is_cuda:
            torch.cuda.synchronize(key_cache.device)
        req.compression_s += time.perf_counter() - t0
        if dump_dir and result.slots is not None:
            after = read_slots(key_cache, value_cache, block_row, result.slots)
            _dump(Path(dump_dir) / req_id / f"epoch{req.plan.epoch}", layer_name, before, after,
                  scores, result)
        if req.holes is None:
            req.holes, req.num_kept = result.holes, result.num_kept
        elif req.holes != result.holes:  # the plan is score-independent: this cannot differ
            raise RuntimeError(f"layer {layer_name} freed blocks {result.holes}, "
                               f"earlier layers {req.holes}")

    def finish_step(self) -> None:
        """Record results of requests compressed in this step (called after the forward)."""
        for req_id, req in self.requests.items():
            if req.compressed and not req.reported:
                req.reported = True
                self.results[req_id] = {
                    "epoch": req.plan.epoch,
                    "holes": req.holes,
                    "prompt_tokens": req.plan.prompt_len,
                    "kv_tokens_kept": req.num_kept,
                    "scoring_ms": round(req.scoring_s * 1e3, 3),
                    "compression_ms": round(req.compression_s * 1e3, 3),
                }


def _dump(directory: Path, layer_name: str, before, after, scores, result) -> None:
    """Debug/test aid: the layer's prompt KV and scores before compression, and what the paged
    cache holds for the kept positions after it."""
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"kept": result.kept.cpu(), "slots": result.slots.cpu(), "holes": result.holes,
                "keys_before": before[0].cpu(), "values_before": before[1].cpu(),
                "scores": None if scores is None else scores.cpu(),
                "keys": after[0].cpu(), "values": after[1].cpu()},
               directory / f"{layer_name}.rank{rank}.pt")


# Set LOOKM_DEBUG_DUMP_DIR to save, per request and compressed layer, the kept KV read back from
# the paged cache (tests compare it with lookm_vllm.core on transformers' KV).
DUMP_ENV = "LOOKM_DEBUG_DUMP_DIR"
STATE = WorkerState()
