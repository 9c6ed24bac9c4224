"""LOOK-M over vLLM's CPU_ATTN backend (vLLM-CPU), plain and fp8 caches."""

from __future__ import annotations

import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from ..attention import PLAIN_CACHE_NAMES, LookMBuilderMixin, LookMImplMixin
from ..kv_layout import FP8_FORMATS, CpuAttnLayout, Fp8Codec


class LookMCPUAttentionBuilder(LookMBuilderMixin, CPUAttentionMetadataBuilder):
    lookm_cache_dtypes = PLAIN_CACHE_NAMES + tuple(FP8_FORMATS)

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device, **kwargs):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device, **kwargs)
        if self._lookm_enabled and self.isa not in CpuAttnLayout.SUPPORTED_ISAS:
            raise ValueError(
                f"LOOK-M does not support the CPU attention kernel '{self.isa}' (its paged "
                f"key layout is not known); use dtype float32/float16, or a CPU without "
                f"AMX for bfloat16. Supported: {CpuAttnLayout.SUPPORTED_ISAS}")


class LookMCPUAttentionImpl(LookMImplMixin, CPUAttentionBackendImpl):
    layout = CpuAttnLayout()

    def lookm_codec(self, layer, kv_cache):
        if not self.is_fp8_kv_cache:
            return None
        k_scale, v_scale = layer._k_scale_float, layer._v_scale_float
        block_size = kv_cache.shape[2]
        isa, cache_dtype = layer.isa, self.kv_cache_dtype

        def quantize(keys: torch.Tensor, values: torch.Tensor):
            """vLLM's own CPU cache writer, into scratch blocks, read back in token order."""
            num_heads, num, head_dim = keys.shape
            num_blocks = -(-num // block_size)
            scratch = torch.zeros(num_blocks, num_heads, block_size, 2 * head_dim,
                                  dtype=kv_cache.dtype, device=kv_cache.device)
            key_view, value_view = scratch.view(num_blocks, num_heads, 2 * block_size,
                                                head_dim).chunk(2, dim=2)
            slots = torch.arange(num, device=kv_cache.device)
            ops.cpu_attn_reshape_and_cache(
                keys.transpose(0, 1).contiguous(), values.transpose(0, 1).contiguous(),
                key_view, value_view, slots, isa, k_scale=k_scale, v_scale=v_scale,
                kv_cache_dtype=cache_dtype)
            stored_keys, stored_values = self.layout.split(scratch)

            def tokens(view):  # [blocks, H, bs, d] -> [H, num, d]
                return view.permute(1, 0, 2, 3).reshape(num_heads, -1, head_dim)[:, :num]

            return tokens(stored_keys), tokens(stored_values)

        return Fp8Codec(FP8_FORMATS[cache_dtype], k_scale, v_scale, quantize)


class LookMCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return LookMCPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return LookMCPUAttentionBuilder
