"""LOOK-M over vLLM's FLASH_ATTN backend (CUDA)."""

from __future__ import annotations

from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)

from ..attention import LookMBuilderMixin, LookMImplMixin
from ..kv_layout import FlashAttnLayout


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
