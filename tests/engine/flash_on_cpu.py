"""Serve attention on vLLM-CPU through LOOK-M's FLASH_ATTN wrappers (test-only).

vLLM's CPU platform always selects the backend registered as ``CPU_ATTN``; registering the LOOK-M
FlashAttention wrapper there makes a CPU engine run the CUDA path's classes end to end: vLLM's
``FlashAttentionMetadataBuilder`` under ``LookMBuilderMixin``, ``FlashAttentionImpl.forward``
under ``LookMImplMixin`` and ``FlashAttnLayout`` over the cache. What cannot run on a CPU is
replaced, and only that: the two compiled FlashAttention ops that ``flash_attn.py`` imports from
``vllm_flash_attn`` on CUDA builds (absent from vLLM-CPU), by torch code with their documented
semantics over the same cache layout:

* ``flash_attn_varlen_func``: paged, variable-length attention; query row ``j`` of a request
  with ``n`` queries and ``seqused_k = L`` keys attends to keys ``[0, L - n + j]`` (causal,
  aligned at the bottom right), keys read through ``block_table``;
* ``reshape_and_cache_flash``: write each token's key/value at its slot (``-1``: padding);
  for an fp8 cache, the code of ``value / scale`` rounded to nearest (as CUDA's conversion does).

and, for fp8 caches, the capability check that asks the (absent) FlashAttention build whether it
takes fp8 caches. Queries are quantized by vLLM's own attention layer, as on CUDA.

Nothing else of vLLM is changed. ``install()`` must run in the engine's process before the
engine is created (``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lookm_vllm.vllm_adapter.backends.flash_attn import (
    LookMFlashAttentionBackend,
    LookMFlashAttentionImpl,
)

# How often the replaced ops ran (the scenario reports it: proof the FA path served).
CALLS = {"flash_attn_varlen_func": 0, "reshape_and_cache_flash": 0, "fp8_queries": 0}


def _numbers(tensor, descale):
    """FlashAttention's view of a possibly fp8 operand: value x its descale (per tensor here)."""
    if tensor.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2) or descale is None:
        return tensor
    return tensor.to(torch.float32) * descale.flatten()[0]


def paged_varlen_attention(*, q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k,
                           softmax_scale, causal, block_table, window_size=None,
                           alibi_slopes=None, softcap=0, q_descale=None, k_descale=None,
                           v_descale=None, **unused):
    """``flash_attn_varlen_func`` over a paged cache ``k, v: [blocks, block_size, Hkv, d]``."""
    assert causal is True and alibi_slopes is None and not softcap
    assert window_size in (None, [-1, -1], (-1, -1))
    CALLS["flash_attn_varlen_func"] += 1
    CALLS["fp8_queries"] += q.dtype == torch.float8_e4m3fn
    q, k, v = _numbers(q, q_descale), _numbers(k, k_descale), _numbers(v, v_descale)
    block_size, num_kv_heads = k.shape[1], k.shape[2]
    starts = cu_seqlens_q.tolist()
    lengths = seqused_k.tolist()
    out_heads = out.view(out.shape[0], -1, q.shape[-1])
    for i, length in enumerate(lengths[:len(starts) - 1]):
        first, last = starts[i], starts[i + 1]
        n = last - first
        if n == 0:
            continue
        assert n <= max_seqlen_q and length <= max_seqlen_k
        ids = block_table[i, :-(-length // block_size)].long()
        keys = k[ids].reshape(-1, num_kv_heads, k.shape[-1])[:length].transpose(0, 1)
        values = v[ids].reshape(-1, num_kv_heads, v.shape[-1])[:length].transpose(0, 1)
        queries = q[first:last].transpose(0, 1)                     # [Hq, n, d]
        group = queries.shape[0] // num_kv_heads
        visible = (torch.arange(length)[None, :]
                   <= torch.arange(length - n, length)[:, None]).to(queries.device)
        attended = F.scaled_dot_product_attention(
            queries.float(), keys.float().repeat_interleave(group, 0),
            values.float().repeat_interleave(group, 0), attn_mask=visible, scale=softmax_scale)
        out_heads[first:last] = attended.transpose(0, 1).to(out.dtype)
    return out


def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                      k_scale, v_scale):
    """``reshape_and_cache_flash`` for ``key_cache, value_cache: [blocks, block_size, Hkv, d]``
    views."""
    CALLS["reshape_and_cache_flash"] += 1
    if kv_cache_dtype != "auto":
        assert kv_cache_dtype in ("fp8", "fp8_e4m3") and key_cache.dtype == torch.uint8
        key = fp8_codes(key, k_scale)
        value = fp8_codes(value, v_scale)
    slots = slot_mapping.long()
    valid = slots >= 0
    tokens = torch.arange(slots.shape[0], device=slots.device)[valid]
    slots = slots[valid]
    block_size = key_cache.shape[1]
    key_cache[slots // block_size, slots % block_size] = key[tokens].to(key_cache.dtype)
    value_cache[slots // block_size, slots % block_size] = value[tokens].to(value_cache.dtype)


def fp8_codes(values, scale):
    """The fp8 (e4m3) codes of ``values / scale``, rounded to nearest, saturating."""
    scaled = values.to(torch.float32) / scale.flatten()[0]
    return scaled.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)


class TorchFlashAttentionImpl(LookMFlashAttentionImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # vllm_flash_attn is not installed on CPU, so no version was detected; FA2 is the one
        # without ahead-of-time scheduling (its metadata inputs are unit-tested separately).
        self.vllm_flash_attn_version = 2


class TorchFlashAttentionBackend(LookMFlashAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return TorchFlashAttentionImpl


def install() -> None:
    from vllm.v1.attention.backends import flash_attn
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from lookm_vllm.vllm_adapter import plugin

    plugin.register()  # first, so the engine's own plugin loading does not override this
    flash_attn.flash_attn_varlen_func = paged_varlen_attention
    flash_attn.reshape_and_cache_flash = reshape_and_cache
    flash_attn.flash_attn_supports_kv_cache_dtype = lambda *args, **kwargs: True
    register_backend(AttentionBackendEnum.CPU_ATTN,
                     f"{__name__}.{TorchFlashAttentionBackend.__qualname__}")
