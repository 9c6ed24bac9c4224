"""LOOK-M over vLLM's CPU_ATTN backend (vLLM-CPU)."""

from __future__ import annotations

from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from ..attention import LookMBuilderMixin, LookMImplMixin
from ..kv_layout import CpuAttnLayout


class LookMCPUAttentionBuilder(LookMBuilderMixin, CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device, **kwargs):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device, **kwargs)
        if self._lookm_enabled and self.isa not in CpuAttnLayout.SUPPORTED_ISAS:
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
