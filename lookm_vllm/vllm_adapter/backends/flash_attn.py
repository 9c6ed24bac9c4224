"""LOOK-M over vLLM's FLASH_ATTN backend (CUDA), plain and fp8 caches."""

from __future__ import annotations

import torch
from vllm.platforms import current_platform
from vllm.utils.torch_utils import is_quantized_kv_cache
from vllm.v1.attention.backends import flash_attn
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)

from ..attention import PLAIN_CACHE_NAMES, LookMBuilderMixin, LookMImplMixin
from ..kv_layout import FlashAttnLayout, Fp8Codec


class LookMFlashAttentionBuilder(LookMBuilderMixin, FlashAttentionMetadataBuilder):
    lookm_cache_dtypes = PLAIN_CACHE_NAMES + ("fp8", "fp8_e4m3")


class LookMFlashAttentionImpl(LookMImplMixin, FlashAttentionImpl):
    layout = FlashAttnLayout()

    def lookm_codec(self, layer, kv_cache):
        if not is_quantized_kv_cache(self.kv_cache_dtype):
            return None
        cache_dtype = self.kv_cache_dtype
        k_scale, v_scale = layer._k_scale, layer._v_scale

        def quantize(keys: torch.Tensor, values: torch.Tensor):
            """vLLM's own FlashAttention cache writer, into scratch blocks, in token order."""
            num_heads, num, head_dim = keys.shape
            block_size = kv_cache.shape[2]
            num_blocks = -(-num // block_size)
            scratch = torch.zeros(num_blocks, num_heads, block_size, 2 * head_dim,
                                  dtype=kv_cache.dtype, device=kv_cache.device)
            key_view, value_view = scratch.transpose(1, 2).split(head_dim, dim=-1)
            # looked up at call time: the module imports it on CUDA builds only
            flash_attn.reshape_and_cache_flash(
                keys.transpose(0, 1), values.transpose(0, 1),
                key_view, value_view, torch.arange(num, device=kv_cache.device), cache_dtype,
                k_scale, v_scale)
            stored_keys, stored_values = self.layout.split(scratch)

            def tokens(view):  # [blocks, H, bs, d] -> [H, num, d]
                return view.permute(1, 0, 2, 3).reshape(num_heads, -1, head_dim)[:, :num]

            return tokens(stored_keys), tokens(stored_values)

        # Queries reach this backend quantized with the layer's q scale when it takes them so
        # (the attention layer's query_quant), as numbers otherwise.
        q_scale = layer._q_scale if self.supports_quant_query_input else None
        return Fp8Codec(current_platform.fp8_dtype(), layer._k_scale_float,
                        layer._v_scale_float, quantize, q_scale)


class LookMFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return LookMFlashAttentionImpl

    @staticmethod
    def get_builder_cls():
        return LookMFlashAttentionBuilder
