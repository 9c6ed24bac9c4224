"""What the LOOK-M attention-backend wrappers add to vLLM's backends, shared by all of them:
the compacted read view and the start-time checks (builder), and the scoring/compression hook
(impl). The wrapper classes themselves are in ``backends/`` (one module per vLLM backend, see
``backends.BACKENDS``); layout knowledge lives in ``kv_layout``.

The wrappers are registered over vLLM's backends by ``plugin.register`` but stay exact
pass-throughs unless the LOOK-M connector is configured for the engine (``lookm_enabled``),
decided once when vLLM builds them.

Invariants relied on (each checked at start or by a contract test):
- attention runs EAGERLY every step: Python in ``build`` and ``forward`` must run per step, and
  the compacted view is a new tensor per step. So no full CUDA graphs, and piecewise graphs only
  with attention as a splitting op (``check_engine_setup``); the builder declares
  ``AttentionCGSupport.NEVER`` so vLLM's own resolution picks PIECEWISE (or NONE) by itself.
- the metadata rows are the runner's batch rows (no micro-batching, which renumbers them) and
  the block table is in the KV manager's blocks (kernel block size == manager block size), so
  the holes the scheduler frees are the columns the view removes.
- the CPU sequence lengths (``seq_lens_cpu_upper_bound``) are exact: no speculative decoding.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .compaction import compacted_view
from .kv_layout import KVCodec, KVLayout
from .options import lookm_enabled
from .worker_state import STATE

# Element types of caches holding plain numbers; fp8 caches hold uint8 codes (kv_layout).
PLAIN_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PLAIN_CACHE_NAMES = ("auto", "float16", "bfloat16")


def check_engine_setup(vllm_config, kv_cache_spec, cache_dtypes: tuple[str, ...]) -> None:
    """Refuse, when a worker builds its attention metadata builders (the cudagraph mode is final
    by then), engine setups in which the compacted view would be ignored or misplaced, or whose
    cache this backend's wrapper cannot read and write (``cache_dtypes``: the
    ``--kv-cache-dtype`` values it serves)."""
    problems = []
    compilation = vllm_config.compilation_config
    mode = compilation.cudagraph_mode
    if mode is not None and mode.has_full_cudagraphs():
        problems.append(f"full CUDA graphs (cudagraph_mode={mode.name}; replayed graphs read "
                        "the runner's block table, not the compacted one: use "
                        "-cc.cudagraph_mode=PIECEWISE, and no attention+quant fusion)")
    elif (mode is not None and mode.has_piecewise_cudagraphs()
          and not compilation.splitting_ops_contain_attention()):
        problems.append("CUDA graphs that capture attention (attention must be a splitting op "
                        "of the piecewise graphs)")
    if vllm_config.parallel_config.use_ubatching:
        problems.append("micro-batching (--enable-dbo / ubatch_size > 1 renumbers the batch rows)")
    manager_block_size = vllm_config.cache_config.block_size
    if kv_cache_spec.block_size != manager_block_size:
        problems.append(f"an attention kernel block size ({kv_cache_spec.block_size}) other "
                        f"than the KV cache block size ({manager_block_size}); pass "
                        f"--block-size {kv_cache_spec.block_size}")
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype not in cache_dtypes:
        problems.append(f"--kv-cache-dtype {cache_dtype} with this attention backend (served: "
                        f"{', '.join(cache_dtypes)})")
    elif cache_dtype in PLAIN_CACHE_NAMES and kv_cache_spec.dtype not in PLAIN_CACHE_DTYPES:
        problems.append(f"a {kv_cache_spec.dtype} KV cache (the model's default cache dtype is "
                        "quantized; pass --kv-cache-dtype explicitly)")
    if problems:
        raise ValueError("LOOK-M KV compression (LookMConnector) does not support "
                         + "; ".join(problems) + ".")


class LookMBuilderMixin:
    """Adds the compacted view of compressed requests and this step's scoring work."""

    # The --kv-cache-dtype values this backend's wrapper serves (its impl's codec reads them).
    lookm_cache_dtypes: tuple[str, ...] = PLAIN_CACHE_NAMES

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device, **kwargs):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device, **kwargs)
        self._lookm_enabled = lookm_enabled(vllm_config)
        self._lookm_view_buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        if self._lookm_enabled:
            check_engine_setup(vllm_config, kv_cache_spec, self.lookm_cache_dtypes)

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
        from vllm.v1.attention.backend import AttentionCGSupport

        if lookm_enabled(vllm_config):  # Python runs per step: attention stays out of graphs
            return AttentionCGSupport.NEVER
        return super().get_cudagraph_support(vllm_config, kv_cache_spec)

    def _view_buffers(self, block_table: torch.Tensor, seq_lens: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Persistent device buffers for the compacted view (grown, rarely, to the batch)."""
        buffers = self._lookm_view_buffers
        rows, width = block_table.shape
        if buffers is None or buffers[0].shape[0] < rows or buffers[0].shape[1] != width:
            buffers = self._lookm_view_buffers = (
                torch.empty((max(rows, 1), width), dtype=block_table.dtype,
                            device=block_table.device),
                torch.empty(max(rows, 1), dtype=seq_lens.dtype, device=seq_lens.device))
        return buffers

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        if not self._lookm_enabled or not STATE.requests:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        cm = common_attn_metadata
        seq_lens_cpu = cm.seq_lens_cpu_upper_bound
        if seq_lens_cpu is None:  # not on the V1 runner's path; never expected
            seq_lens_cpu = cm.seq_lens.cpu()
        source_table = cm.block_table_tensor
        work, holed, deferred = STATE.rows(cm.num_reqs, cm.query_start_loc_cpu, seq_lens_cpu,
                                           self.kv_cache_spec.block_size)
        if holed:
            block_table, seq_lens, lens_cpu = compacted_view(
                cm.block_table_tensor, cm.seq_lens, seq_lens_cpu, holed,
                self.kv_cache_spec.block_size,
                out=self._view_buffers(cm.block_table_tensor, cm.seq_lens))
            changes = {"block_table_tensor": block_table, "seq_lens": seq_lens}
            if cm.seq_lens_cpu_upper_bound is not None:
                changes["seq_lens_cpu_upper_bound"] = lens_cpu
            cm = replace(cm, **changes)
        metadata = super().build(common_prefix_len, cm, fast_build)
        metadata.lookm_work = work
        metadata.lookm_deferred = deferred
        metadata.lookm_source_table = source_table   # uncompacted rows, for the compression
        return metadata


class LookMImplMixin:
    """Compresses this layer for requests whose prompt completed in an earlier step, runs the
    stock attention, then scores this layer for the step's prompt rows."""

    layout: KVLayout

    def lookm_codec(self, layer, kv_cache) -> KVCodec | None:
        """What this layer's cache entries mean; None: plain numbers of the cache's dtype.
        Backends serving quantized caches override it."""
        return None

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        deferred = getattr(attn_metadata, "lookm_deferred", None)
        if deferred:  # before the attention: it reads the compacted view of these rows
            with torch.inference_mode():
                STATE.compress_deferred(layer.layer_name, deferred, kv_cache,
                                        attn_metadata.lookm_source_table, self.layout,
                                        self.scale, self.lookm_codec(layer, kv_cache))
        result = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                 output_scale, output_block_scale)
        work = getattr(attn_metadata, "lookm_work", None)
        if work:
            with torch.inference_mode():
                STATE.process_layer(layer.layer_name, work, query, output, kv_cache,
                                    attn_metadata.block_table, self.layout, self.scale,
                                    self.lookm_codec(layer, kv_cache))
        return result
