"""Worker-process registry of compressed requests. No vLLM import.

One ``WorkerState`` per worker process (module global ``STATE``), fed by three vLLM hooks:
- the runner hook records the request order of the step's batch (rows of the attention metadata);
- the connector's ``handle_preemptions`` (the first hook of a step) adds plans and drops
  finished/preempted requests;
- the attention backend asks :meth:`WorkerState.rows` what each row needs (scoring work, a
  deferred compression, a compacted read view), runs :meth:`WorkerState.compress_deferred`
  before each layer's attention and :meth:`WorkerState.process_layer` after it (the per-layer
  compute lives in ``layer_compute``).
The connector's ``build_connector_worker_meta`` then ships the step's results to the scheduler:
the holes as soon as a request is compressed, its device timings once they are measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from .compaction import HoleMap
from .kv_layout import KVCodec, KVLayout, PlainCodec
from .layer_compute import (
    DUMP_ENV,
    RowWork,
    WorkerRequest,
    compress_deferred_layer,
    process_request_layer,
)
from .plan import RequestPlan

__all__ = ["DUMP_ENV", "STATE", "RowWork", "WorkerRequest", "WorkerState"]


@dataclass
class WorkerState:
    requests: dict[str, WorkerRequest] = field(default_factory=dict)
    step_req_ids: list[str] = field(default_factory=list)
    results: dict[str, dict] = field(default_factory=dict)
    active: bool = False

    # --- connector metadata --------------------------------------------------------------
    def apply(self, plans: dict[str, dict], drop: list[str],
              targets: dict[str, dict] | None = None) -> None:
        for req_id in drop:
            self.requests.pop(req_id, None)
            self.results.pop(req_id, None)
        for req_id, data in plans.items():
            plan = RequestPlan.from_dict(data)
            current = self.requests.get(req_id)
            if current is None or current.plan.epoch != plan.epoch:
                self.requests[req_id] = WorkerRequest(plan)
        # Prefix caching: where this step's compaction writes (sent with the prompt's last
        # chunk): private blocks, or None when the pool had none (the request stays whole).
        for req_id, data in (targets or {}).items():
            req = self.requests.get(req_id)
            if req is not None and req.plan.epoch == data["epoch"]:
                req.targets = data["blocks"]
                req.skip = data["blocks"] is None

    def take_results(self) -> dict[str, dict]:
        results, self.results = self.results, {}
        return results

    # --- attention metadata (builder) ----------------------------------------------------
    def rows(self, num_reqs: int, query_start_loc: Tensor, seq_lens: Tensor, block_size: int
             ) -> tuple[list[RowWork], list[tuple[int, HoleMap]], list[RowWork]]:
        """Split this step's rows into prefill work, deferred compressions and compacted reads.

        ``query_start_loc`` and ``seq_lens`` are the CPU copies (exact: no speculative decoding).
        Returns ``(work, holed, deferred)``: rows whose prompt is (partly) in this step, rows
        reading a compressed cache ``(row, holes)``, and rows whose prompt this step compresses
        before each layer's attention (they are in ``holed`` too, with the plan's holes: every
        layer is compressed before its attention reads the view).
        """
        work, holed, deferred = [], [], []
        if not self.requests:
            return work, holed, deferred
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
                    holed.append((row, req.hole_map))
            elif req.deferred:
                deferred.append(RowWork(req_id, row, qsl[row], start, num_tokens))
                holes = [] if req.skip else req.plan.holes(block_size)
                if holes:
                    req.hole_map = HoleMap.from_holes(holes, req.targets)
                    holed.append((row, req.hole_map))
            elif start < req.plan.prompt_len:
                work.append(RowWork(req_id, row, qsl[row], start, num_tokens))
        return work, holed, deferred

    # --- attention forward -----------------------------------------------------------------
    def process_layer(self, layer_name: str, work: list[RowWork], query: Tensor, output: Tensor,
                      kv_cache: Tensor, block_table: Tensor, layout: KVLayout,
                      scale: float, codec: KVCodec | None = None) -> None:
        """Score this layer's prompt queries and, at the prompt's end, compress the layer.

        Runs after the stock attention of the layer wrote ``output`` for every query row.
        ``codec``: what the cache entries mean (default: plain numbers of its dtype).
        """
        key_cache, value_cache = layout.split(kv_cache)
        codec = codec or PlainCodec(key_cache.dtype)
        query = codec.decode_query(query)
        for item in work:
            process_request_layer(item.req_id, self.requests[item.req_id], item, layer_name,
                                  query, output, key_cache, value_cache, block_table[item.row],
                                  scale, codec)

    def compress_deferred(self, layer_name: str, deferred: list[RowWork], kv_cache: Tensor,
                          block_table: Tensor, layout: KVLayout, scale: float,
                          codec: KVCodec | None = None) -> None:
        """Compress this layer of the requests whose prompt completed in an earlier step,
        before this step's attention of the layer reads the compacted view. ``block_table``:
        the runner's (uncompacted) block table of the step."""
        key_cache, value_cache = layout.split(kv_cache)
        codec = codec or PlainCodec(key_cache.dtype)
        for item in deferred:
            req = self.requests[item.req_id]
            compress_deferred_layer(item.req_id, req, layer_name, key_cache, value_cache,
                                    block_table[item.row], scale, codec)

    def finish_step(self) -> None:
        """Record what to report after the forward: the holes of requests compressed in this
        step, and the timings of compressed requests whose device work has been measured."""
        for req_id, req in self.requests.items():
            if not req.compressed:
                continue
            if not req.reported:
                req.reported = True
                self.results[req_id] = {
                    "epoch": req.plan.epoch,
                    "holes": req.holes,
                    "prompt_tokens": req.plan.prompt_len,
                    "kv_tokens_kept": req.num_kept,
                }
            if not req.timings_reported and req.scoring.ready() and req.compression.ready():
                req.timings_reported = True
                entry = self.results.setdefault(req_id, {"epoch": req.plan.epoch})
                entry["scoring_ms"] = req.scoring.milliseconds
                entry["compression_ms"] = req.compression.milliseconds


STATE = WorkerState()
