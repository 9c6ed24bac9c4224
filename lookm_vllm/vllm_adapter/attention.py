"""Attention-backend wrappers: the compacted read view (builder) and the scoring/compression hook
(impl). Layout knowledge lives in ``kv_layout``; everything else is shared.

They are registered over vLLM's CPU_ATTN (and FLASH_ATTN on CUDA) by ``plugin.register`` but stay
exact pass-throughs unless the LOOK-M connector is configured for the engine
(``lookm_enabled``), decided once when vLLM builds them.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache

import torch

from .compaction import compacted_view
from .kv_layout import CpuAttnLayout, FlashAttnLayout, KVLayout
from .options import lookm_enabled
from .worker_state import STATE


class LookMBuilderMixin:
    """Adds the compacted view of compressed requests and this step's scoring work."""

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        enabled = getattr(self, "_lookm_enabled", None)
        if enabled is None:
            enabled = self._lookm_enabled = lookm_enabled(self.vllm_config)
        if not enabled or not STATE.requests:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        cm = common_attn_metadata
        seq_lens_cpu = (cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None
                        else cm.seq_lens.cpu())
        work, holed = STATE.rows(cm.num_reqs, cm.query_start_loc_cpu, seq_lens_cpu)
        if holed:
            block_size = self.kv_cache_spec.block_size
            block_table, seq_lens = compacted_view(cm.block_table_tensor, cm.seq_lens, holed,
                                                   block_size)
            changes = {"block_table_tensor": block_table, "seq_lens": seq_lens}
            if cm.seq_lens_cpu_upper_bound is not None:
                upper = cm.seq_lens_cpu_upper_bound.clone()
                for row, holes in holed:
                    upper[row] -= len(holes) * block_size
                changes["seq_lens_cpu_upper_bound"] = upper
            cm = replace(cm, **changes)
        metadata = super().build(common_prefix_len, cm, fast_build)
        metadata.lookm_work = work
        return metadata


class LookMImplMixin:
    """Runs the stock attention, then scores/compresses this layer for the step's prompt rows."""

    layout: KVLayout

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        result = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                 output_scale, output_block_scale)
        work = getattr(attn_metadata, "lookm_work", None)
        if work:
            with torch.inference_mode():
                STATE.process_layer(layer.layer_name, work, query, output, kv_cache,
                                    attn_metadata.block_table, self.layout, self.scale)
        return result


@cache
def _cpu_classes():
    from vllm.v1.attention.backends.cpu_attn import (
        CPUAttentionBackend,
        CPUAttentionBackendImpl,
        CPUAttentionMetadataBuilder,
    )

    class LookMCPUAttentionBuilder(LookMBuilderMixin, CPUAttentionMetadataBuilder):
        def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)
            if lookm_enabled(vllm_config) and self.isa not in CpuAttnLayout.SUPPORTED_ISAS:
                raise ValueError(
                    f"LOOK-M does not support the CPU attention kernel '{self.isa}' (its paged "
                    f"key layout is not known); use dtype float32/float16, or a CPU without "
                    f"AMX for bfloat16. Supported: {CpuAttnLayout.SUPPORTED_ISAS}")

    class LookMCPUAttentionImpl(LookMImplMixin, CPUAttentionBackendImpl):
        layout = CpuAttnLayout()

    class LookMCPUAttentionBackend(CPUAttentionBackend):
        @staticmethod
        def get_impl_cls():
            return LookMCPUAttentionImpl

        @staticmethod
        def get_builder_cls():
            return LookMCPUAttentionBuilder

    return LookMCPUAttentionBackend


@cache
def _flash_classes():
    from vllm.v1.attention.backends.flash_attn import (
        FlashAttentionBackend,
        FlashAttentionImpl,
        FlashAttentionMetadataBuilder,
    )

    class LookMFlashAttentionBuilder(LookMBuilderMixin, FlashAttentionMetadataBuilder):
        pass

    class LookMFlashAttentionImpl(LookMImplMixin, FlashAttentionImpl):
        layout = FlashAttnLayout()

    class LookMFlashAttentionBackend(FlashAttentionBackend):
        @staticmethod
        def get_impl_cls():
            return LookMFlashAttentionImpl

        @staticmethod
        def get_builder_cls():
            return LookMFlashAttentionBuilder

    return LookMFlashAttentionBackend


def __getattr__(name: str):
    # Resolved lazily by vLLM's backend registry (by qualified name), so that importing this
    # module never imports a backend the platform cannot load.
    if name == "LookMCPUAttentionBackend":
        return _cpu_classes()
    if name == "LookMFlashAttentionBackend":
        return _flash_classes()
    raise AttributeError(name)
