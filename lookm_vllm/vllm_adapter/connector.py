"""``LookMConnector``: the scheduler/worker glue of LOOK-M, as a vLLM V1 KV connector.

vLLM names touched here (each has a contract test in tests/test_vllm_contract.py):
- ``KVConnectorBase_V1`` / ``SupportsHMA`` hooks: ``on_new_request``, ``build_connector_meta``,
  ``update_connector_output``, ``request_finished_all_groups``, ``handle_preemptions``,
  ``build_connector_worker_meta``;
- ``Request.block_hashes`` / ``update_block_hashes`` / ``_block_hasher`` /
  ``num_computed_tokens`` (``prefix_cache.py``: with prefix caching a compressed request reads
  the cached blocks its scoring does not recompute, and its later blocks get private hashes);
- ``Request.num_output_tokens`` (a request that ends in the step that compressed it);
- ``BlockPool.get_new_blocks`` / ``free_blocks`` and the manager's ``req_to_blocks`` (the
  compacted prompt goes to private blocks that replace the originals, which stay cached);
- ``KVCacheManager.coordinator.single_type_managers[0]._remove_blocks_in_range`` (frees holes,
  leaving vLLM's ``null_block`` in their place, as sliding-window attention does) and
  ``block_pool.get_num_free_blocks``.

Scheduler side: keeps one ``_SchedRequest`` per compressed request, sends its plan to the workers
when it is (re)scheduled, frees the hole blocks the workers report, and puts the per-request
stats into ``RequestOutput.kv_transfer_params["kv_compression"]``.
Worker side: forwards plans to ``worker_state.STATE`` and ships its results back.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
    SupportsHMA,
)

from lookm_vllm.stats import STATS_KEY, CompressionStats

from .options import EXTRA_ARGS_KEY, default_config, request_config
from .plan import RequestPlan
from .prefix_cache import hit_cap, num_holes, rechain_hashes
from .worker_state import STATE

logger = logging.getLogger(__name__)
# --kv-cache-dtype values LOOK-M may serve: plain numbers, and fp8 codes with per-layer scales.
# Each backend's wrapper says which of them it serves (checked on the worker, where the backend
# is known: attention.check_engine_setup).
SERVED_CACHE_DTYPES = ("auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2")
TIMING_KEYS = ("scoring_ms", "compression_ms")


@dataclass
class LookMMetadata(KVConnectorMetadata):
    """Scheduler -> workers, once per step."""

    plans: dict[str, dict] = field(default_factory=dict)
    drop: list[str] = field(default_factory=list)
    # Prefix caching, with the prompt's last chunk: {req_id: {"epoch", "blocks"}}, the private
    # blocks the compacted prompt is written to (None: not compressed, the pool had none).
    targets: dict[str, dict] = field(default_factory=dict)


@dataclass
class LookMWorkerMetadata(KVConnectorWorkerMetadata):
    """Workers -> scheduler, per request: its holes (the step it was compressed, the same plan
    on every TP rank) and/or its scoring/compression times (once the device measured them)."""

    results: dict[str, dict] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, LookMWorkerMetadata)
        merged = {req_id: dict(result) for req_id, result in self.results.items()}
        for req_id, result in other.results.items():
            mine = merged.setdefault(req_id, {})
            if "holes" in mine and "holes" in result and mine["holes"] != result["holes"]:
                raise RuntimeError(f"tensor-parallel ranks disagree on the holes of {req_id}")
            for key, value in result.items():
                if key in TIMING_KEYS and key in mine:   # the slowest rank
                    mine[key] = max(mine[key], value)
                else:
                    mine.setdefault(key, value)
        return LookMWorkerMetadata(merged)


@dataclass
class _SchedRequest:
    plan: RequestPlan
    sent: bool = False
    stats: CompressionStats | None = None
    # Prefix caching (prefix_cache.py): the vLLM request, the private blocks allocated for its
    # compacted prompt (until the workers report it), the cached tokens its prefill started from.
    request: Any = None
    targets_sent: bool = False
    private: list | None = None
    reused_tokens: int = 0
    skipped: str | None = None
    # Prefix caching: the block-hash salt of this epoch, and whether the hashes are in their
    # published state (ordinary up to the prompt's last full block) or capped for a lookup.
    salt: str = ""
    published: bool = False


def media_spans(request: Any, modality: str = "image") -> tuple[tuple[int, int], ...]:
    """Half-open position ranges of a request's embedding tokens of one modality (``image`` or
    ``video``): the runs of each placeholder's ``is_embed`` (e.g. Qwen2-VL's vision start/end
    tokens are not in them)."""
    spans = []
    for feature in request.mm_features or ():
        if feature.modality != modality:
            continue
        pos = feature.mm_position
        if pos.is_embed is None:
            spans.append((pos.offset, pos.offset + pos.length))
            continue
        run_start = None
        for i, embed in enumerate(pos.is_embed.tolist() + [False]):
            if embed and run_start is None:
                run_start = i
            elif not embed and run_start is not None:
                spans.append((pos.offset + run_start, pos.offset + i))
                run_start = None
    return tuple(sorted(spans))


def image_spans(request: Any) -> tuple[tuple[int, int], ...]:
    """Half-open position ranges of a request's image embedding tokens."""
    return media_spans(request, "image")


def _stats(plan: RequestPlan, **fields: Any) -> CompressionStats:
    counts = plan.modality_counts()
    return CompressionStats(method=plan.config.method, budget=plan.config.budget,
                            max_kv_tokens=plan.config.max_kv_tokens,
                            image_tokens=counts["image"], video_tokens=counts["video"], **fields)


def check_supported(vllm_config: Any, kv_cache_config: Any | None) -> None:
    """Refuse, at engine start, setups the plugin cannot serve correctly."""
    problems = []
    model_config = vllm_config.model_config
    parallel = vllm_config.parallel_config
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding")
    if parallel.pipeline_parallel_size > 1:
        problems.append("pipeline parallelism")
    if getattr(parallel, "decode_context_parallel_size", 1) > 1 or \
            getattr(parallel, "prefill_context_parallel_size", 1) > 1:
        problems.append("context parallelism")
    if model_config is not None:
        if model_config.is_encoder_decoder:
            problems.append("encoder-decoder models")
        if model_config.use_mla:
            problems.append("MLA attention")
        if getattr(model_config, "is_hybrid", False):
            problems.append("hybrid (Mamba/linear-attention) models")
    if getattr(parallel, "use_ubatching", False):
        problems.append("micro-batching (--enable-dbo / ubatch_size > 1)")
    cache_dtype = getattr(getattr(vllm_config, "cache_config", None), "cache_dtype", "auto")
    if cache_dtype not in SERVED_CACHE_DTYPES:
        problems.append(f"--kv-cache-dtype {cache_dtype} (a quantized cache LOOK-M cannot read "
                        f"and write exactly; served: {', '.join(SERVED_CACHE_DTYPES)})")
    if getattr(vllm_config, "use_v2_model_runner", False):
        problems.append("the V2 model runner (set VLLM_USE_V2_MODEL_RUNNER=0)")
    if kv_cache_config is not None:
        groups = kv_cache_config.kv_cache_groups
        spec_names = {type(g.kv_cache_spec).__name__ for g in groups}
        if len(groups) != 1 or spec_names != {"FullAttentionSpec"}:
            problems.append(f"KV cache groups {sorted(spec_names)} (only one full-attention "
                            "group is supported: no sliding window, no hybrid layers)")
    if problems:
        raise ValueError("LOOK-M KV compression (LookMConnector) does not support "
                         + ", ".join(problems) + ".")


def check_attention_backend(vllm_config: Any) -> None:
    """Refuse to start when a decoder attention layer is not served by the LOOK-M wrappers
    (e.g. CUDA picked FlashInfer or Triton attention): it would never be compressed."""
    from vllm.model_executor.layers.attention import Attention

    from .attention import LookMImplMixin
    from .backends import supported_names

    layers = vllm_config.compilation_config.static_forward_context
    foreign = sorted({type(layer.impl).__name__ for layer in layers.values()
                      if isinstance(layer, Attention) and layer.attn_type == "decoder"
                      and not isinstance(layer.impl, LookMImplMixin)})
    if foreign:
        raise ValueError(f"LOOK-M supports the {' and '.join(supported_names())} attention "
                         f"backends; this engine uses {foreign} (on CUDA pass "
                         f"--attention-backend FLASH_ATTN).")


class LookMConnector(KVConnectorBase_V1, SupportsHMA):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        check_supported(vllm_config, kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        try:
            self._default = default_config(extra)
        except ValueError as exc:
            raise ValueError(f"invalid LOOK-M engine default (kv_connector_extra_config"
                             f"['default']): {exc}") from exc
        self._requests: dict[str, _SchedRequest] = {}
        self._drop: list[str] = []
        self._looked_up: list[str] = []
        cache_config = vllm_config.cache_config
        self._prefix_caching = bool(cache_config.enable_prefix_caching)
        self._block_size = cache_config.block_size
        if role == KVConnectorRole.WORKER:
            check_attention_backend(vllm_config)
            STATE.active = True

    # ---------------------------------------------------------------- no KV transfer at all
    @property
    def requires_kv_delivery(self) -> bool:
        return False

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        # The attention hook runs Python per step: keep attention out of full CUDA graphs.
        return True

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        # Called right after vLLM's local prefix-cache lookup of a waiting request, before its
        # blocks are allocated (and published): the lookup read the capped hashes; from now on
        # its full prompt blocks carry their ordinary hashes (prefix_cache.py).
        state = self._requests.get(request.request_id)
        if self._prefix_caching and state is not None and not state.published:
            rechain_hashes(request, hit_cap(state.plan, self._block_size), state.salt,
                           salt_at=state.plan.prompt_len // self._block_size)
            state.published = True
            self._looked_up.append(request.request_id)
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        return None

    def start_load_kv(self, forward_context, **kwargs) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        return None

    def wait_for_save(self) -> None:
        return None

    # ---------------------------------------------------------------- worker side
    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        # The first hook of a step, before the runner builds attention metadata (which needs the
        # plans); ``bind_connector_metadata`` only comes later, around the forward.
        assert isinstance(kv_connector_metadata, LookMMetadata)
        STATE.apply(kv_connector_metadata.plans, kv_connector_metadata.drop,
                    kv_connector_metadata.targets)

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        STATE.finish_step()
        results = STATE.take_results()
        return LookMWorkerMetadata(results) if results else None

    # ---------------------------------------------------------------- scheduler side
    def on_new_request(self, request) -> None:
        try:
            config = request_config((request.sampling_params.extra_args
                                     if request.sampling_params else None), self._default)
        except ValueError:  # validated at admission (validation.py); never fail the engine loop
            logger.exception("ignoring invalid %s of request %s", EXTRA_ARGS_KEY,
                             request.request_id)
            return
        if config is None or not config.is_active:
            return
        plan = RequestPlan(config, request.num_prompt_tokens, image_spans(request),
                           video_spans=media_spans(request, "video"))
        state = self._requests[request.request_id] = _SchedRequest(plan, request=request)
        if self._prefix_caching:
            # Reads the cached prompt blocks its scoring does not recompute; every later block
            # gets a private hash until the lookup is done (prefix_cache.py).
            self._cap_hashes(state)

    def _cap_hashes(self, state: _SchedRequest) -> None:
        """Hashes for a prefix-cache lookup: ordinary below the hit cap, salted (a new salt)
        from it on."""
        state.salt, state.published = f"lookm:{uuid.uuid4().hex}", False
        rechain_hashes(state.request, hit_cap(state.plan, self._block_size), state.salt)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        meta = LookMMetadata(drop=self._drop)
        self._drop = []
        # Looked up in this pass but not scheduled (no room): capped again for the next lookup.
        for req_id in self._looked_up:
            state = self._requests.get(req_id)
            if state is not None and req_id not in scheduler_output.num_scheduled_tokens:
                self._cap_hashes(state)
        self._looked_up = []
        for req_id in scheduler_output.preempted_req_ids or ():
            state = self._requests.get(req_id)
            if state is not None:  # recomputed from scratch: compress again, as a new epoch
                state.plan = replace(state.plan, epoch=state.plan.epoch + 1)
                state.sent = False
                meta.drop.append(req_id)
                self._release_private(state)
                state.targets_sent, state.skipped = False, None
                if self._prefix_caching:  # never hit its own blocks of the earlier run
                    self._cap_hashes(state)
        for req_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            state = self._requests.get(req_id)
            if state is None:
                continue
            if not state.sent:
                meta.plans[req_id] = state.plan.to_dict()
                state.sent = True
                # before _update_after_schedule: the tokens its prefill starts from (cache hit)
                state.reused_tokens = state.request.num_computed_tokens
            start = state.request.num_computed_tokens
            if (self._prefix_caching and not state.targets_sent
                    and start < state.plan.prompt_len <= start + num_tokens):
                meta.targets[req_id] = {"epoch": state.plan.epoch,
                                        "blocks": self._allocate_private(state)}
                state.targets_sent = True
        return meta

    def _allocate_private(self, state: _SchedRequest) -> list[int] | None:
        """Private blocks for the compacted prompt (the live full prompt blocks), taken when
        the prompt's last chunk is scheduled; None when the pool cannot give them."""
        holes = num_holes(state.plan, self._block_size)
        if holes == 0:
            return []
        needed = state.plan.prompt_len // self._block_size - holes
        pool = self._kv_cache_manager.block_pool
        if needed > pool.get_num_free_blocks():
            state.skipped = "no free blocks for the compacted copy"
            return None
        state.private = pool.get_new_blocks(needed) if needed else []
        return [block.block_id for block in state.private]

    def _release_private(self, state: _SchedRequest) -> None:
        """Free private blocks not yet handed to the request (finished or preempted first)."""
        if state.private:
            self._kv_cache_manager.block_pool.free_blocks(reversed(state.private))
        state.private = None

    def _adopt_private(self, req_id: str, state: _SchedRequest, holes: list[int]) -> None:
        """The workers wrote the compacted prompt to the private blocks: they replace the live
        full prompt blocks in the request's block list; the originals go back to the pool (they
        keep their hashes, so the prefix cache still serves their exact KV)."""
        manager = self._kv_cache_manager.coordinator.single_type_managers[0]
        blocks = manager.req_to_blocks[req_id]
        num_full = state.plan.prompt_len // self._block_size
        live = sorted(set(range(num_full)) - set(holes))
        originals = []
        for column, block in zip(live, state.private, strict=True):
            originals.append(blocks[column])
            blocks[column] = block
        state.private = None
        self._kv_cache_manager.block_pool.free_blocks(reversed(originals))

    def update_connector_output(self, connector_output) -> None:
        worker_meta = connector_output.kv_connector_worker_meta
        if not isinstance(worker_meta, LookMWorkerMetadata):
            return
        for req_id, result in worker_meta.results.items():
            state = self._requests.get(req_id)
            if state is None or state.plan.epoch != result["epoch"]:
                continue  # finished or preempted since: its blocks went back whole
            if "holes" in result:
                free_before = self._kv_cache_manager.block_pool.get_num_free_blocks()
                if state.private is not None:
                    if result["holes"]:
                        self._adopt_private(req_id, state, result["holes"])
                    else:
                        self._release_private(state)
                self._free_holes(req_id, result["holes"])
                free_after = self._kv_cache_manager.block_pool.get_num_free_blocks()
                state.stats = _stats(
                    state.plan, compressed=True, prompt_tokens=result["prompt_tokens"],
                    kv_tokens_kept=result["kv_tokens_kept"],
                    kv_blocks_freed=len(result["holes"]),
                    pool_free_blocks_before=free_before, pool_free_blocks_after=free_after,
                    prefix_reused_tokens=state.reused_tokens)
            if state.stats is not None:
                # Device timings arrive with the holes on the CPU, on CUDA once the events
                # completed (usually a step later); ranks may report in different steps: keep
                # the slowest.
                timings = {key: max(getattr(state.stats, key) or 0.0, result[key])
                           for key in TIMING_KEYS if key in result}
                if timings:
                    state.stats = replace(state.stats, **timings)

    def _free_holes(self, req_id: str, holes: list[int]) -> None:
        manager = self._kv_cache_manager.coordinator.single_type_managers[0]
        # One call per contiguous run: the manager stops at a block that is already null.
        runs: list[list[int]] = []
        for block in holes:
            if runs and block == runs[-1][1]:
                runs[-1][1] = block + 1
            else:
                runs.append([block, block + 1])
        for first, last in reversed(runs):
            manager._remove_blocks_in_range(req_id, first, last)

    def request_finished_all_groups(self, request, block_ids) -> tuple[bool, dict | None]:
        state = self._requests.pop(request.request_id, None)
        if state is None:
            return False, None
        self._drop.append(request.request_id)
        self._release_private(state)
        plan = state.plan
        stats = state.stats
        if stats is None and request.num_output_tokens >= 2 and not state.skipped:
            # Compressed in the step that made its last token (compression runs in the step
            # after the first token, every step after it reads the compressed cache), but vLLM
            # frees a finished request before it reads that step's connector output: the holes
            # are the plan's (score-free, what every layer freed). The pool gets them back with
            # the rest of its blocks now; the device timings never arrive.
            holes = len(plan.holes(self._block_size))
            stats = _stats(plan, compressed=True, prompt_tokens=plan.prompt_len,
                           kv_tokens_kept=plan.prompt_len - holes * self._block_size,
                           kv_blocks_freed=holes, prefix_reused_tokens=state.reused_tokens)
        # Finished with its first token (max_tokens=1): never compressed; its blocks go back.
        stats = stats or _stats(
            plan, compressed=False, prompt_tokens=plan.prompt_len,
            kv_tokens_kept=plan.prompt_len, kv_blocks_freed=0,
            prefix_reused_tokens=state.reused_tokens)
        if state.skipped:
            stats = replace(stats, compressed=False, skipped=state.skipped)
        return False, {STATS_KEY: stats.to_dict()}

    def request_finished(self, request, block_ids) -> tuple[bool, dict | None]:
        return self.request_finished_all_groups(request, (block_ids,))


__all__ = ["LookMConnector", "LookMMetadata", "LookMWorkerMetadata"]
