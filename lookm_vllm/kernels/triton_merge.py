"""Fused cosine-similarity argmax for merging evicted KV pairs (paper Eq. 9), one Triton kernel.

:func:`lookm_vllm.core.merge.assign_to_kept` sends each evicted token to its most cosine-similar
kept token, per head, through blocks of an ``[H, E, K]`` float32 similarity matrix (about
0.45 L x 0.55 L per head under LOOK-M's text prior: 24 M entries per head at L = 9.8k). Here each
program owns (head, tile of evicted tokens), streams the kept keys in tiles, and keeps a running
max / argmax per row, so nothing of size E x K is written. Dot products run on tensor cores in
the keys' own dtype with float32 accumulation (bf16 x bf16 products are exact in float32), and are
scaled by float32 inverse norms afterwards; float32 inputs use 3xTF32, about float32 accuracy.

Same results as the torch version up to float32 rounding: an argmax may differ only where two
kept tokens are within ~1e-6 of each other in cosine similarity.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .triton_scoring import TRITON_AVAILABLE, block_d, kernel_inputs

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from .triton_scoring import launch, quick_bench

__all__ = ["triton_cosine_argmax"]

# torch.nn.functional.normalize's default: x / max(||x||, eps).
NORM_EPS = 1e-12


if TRITON_AVAILABLE:

    @triton.jit(do_not_specialize=["num_evicted", "num_kept"])
    def _cosine_argmax_kernel(
        EVICTED, KEPT, INV_E, INV_K, GROUP_E, GROUP_K, BEST, BEST_IDX,
        stride_eh, stride_em, stride_kh, stride_kn, stride_ieh, stride_ikh,
        stride_geh, stride_gkh, stride_bh,
        num_evicted, num_kept,
        HAS_GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        head = tl.program_id(1).to(tl.int64)
        offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        e_ok = offs_e < num_evicted
        ev = tl.load(EVICTED + head * stride_eh + offs_e[:, None] * stride_em + offs_d[None, :],
                     mask=e_ok[:, None] & d_ok[None, :], other=0.0)
        inv_e = tl.load(INV_E + head * stride_ieh + offs_e, mask=e_ok, other=0.0)
        if HAS_GROUPS:
            group_e = tl.load(GROUP_E + head * stride_geh + offs_e, mask=e_ok, other=-2)

        best = tl.full([BLOCK_E], float("-inf"), dtype=tl.float32)
        best_idx = tl.zeros([BLOCK_E], dtype=tl.int32)
        for k0 in range(0, num_kept, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < num_kept
            kept = tl.load(KEPT + head * stride_kh + offs_k[:, None] * stride_kn + offs_d[None, :],
                           mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            inv_k = tl.load(INV_K + head * stride_ikh + offs_k, mask=k_ok, other=0.0)
            dots = tl.dot(ev, tl.trans(kept), input_precision=DOT_PRECISION)
            sim = dots * inv_e[:, None] * inv_k[None, :]
            allowed = k_ok[None, :]
            if HAS_GROUPS:
                group_k = tl.load(GROUP_K + head * stride_gkh + offs_k, mask=k_ok, other=-3)
                allowed = allowed & (group_e[:, None] == group_k[None, :])
            sim = tl.where(allowed, sim, float("-inf"))
            tile_best, tile_idx = tl.max(sim, axis=1, return_indices=True,
                                         return_indices_tie_break_left=True)
            # Strictly greater: on a tie the earlier kept token wins, as in torch's max(dim).
            better = tile_best > best
            best = tl.where(better, tile_best, best)
            best_idx = tl.where(better, k0 + tile_idx, best_idx)

        tl.store(BEST + head * stride_bh + offs_e, best, mask=e_ok)
        tl.store(BEST_IDX + head * stride_bh + offs_e, best_idx, mask=e_ok)

    _cosine_argmax_tuned = triton.autotune(
        [
            triton.Config({"BLOCK_E": e, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for e, k, w, s in [(128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 3), (64, 64, 4, 3)]
        ],
        key=["HEAD_DIM", "HAS_GROUPS"],
        do_bench=quick_bench,
    )(_cosine_argmax_kernel)


def _inverse_norms(x: Tensor) -> Tensor:
    return x.float().norm(dim=-1).clamp_min_(NORM_EPS).reciprocal_().contiguous()


def triton_cosine_argmax(
    kept_keys: Tensor,
    evicted_keys: Tensor,
    kept_group: Tensor | None = None,
    evicted_group: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Most cosine-similar allowed kept key of every evicted key, per head (fused, no E x K).

    Parameters
    ----------
    kept_keys : Tensor
        ``[H, K, d]`` keys of the kept tokens, float16/bfloat16/float32. Pass the cache's own
        dtype: half-precision products are exact in the float32 accumulator.
    evicted_keys : Tensor
        ``[H, E, d]`` keys of the evicted tokens, same dtype and device.
    kept_group, evicted_group : Tensor, optional
        integer ``[H, K]`` and ``[H, E]``: an evicted token may only go to a kept token of the same
        group (e.g. its modality); kept tokens of group -1 receive nothing. Both or neither.

    Returns
    -------
    target : Tensor
        int64 ``[H, E]``, index into the head's kept tokens (0 where no target is allowed).
    similarity : Tensor
        float32 ``[H, E]``, the cosine similarity to the target (-inf where none is allowed).
    valid : Tensor
        bool ``[H, E]``, whether the token has a target; these are the fields of
        :class:`lookm_vllm.core.merge.Assignment`.
    """
    if (kept_group is None) != (evicted_group is None):
        raise ValueError("pass both kept_group and evicted_group, or neither")
    if kept_keys.ndim != 3 or evicted_keys.shape[::2] != kept_keys.shape[::2]:
        raise ValueError(
            f"kept_keys [H, K, d] and evicted_keys [H, E, d] disagree: {tuple(kept_keys.shape)}, "
            f"{tuple(evicted_keys.shape)}"
        )
    if kept_keys.dtype != evicted_keys.dtype or kept_keys.device != evicted_keys.device:
        raise ValueError("kept_keys and evicted_keys must share dtype and device")
    kept_keys, evicted_keys = kernel_inputs(kept_keys, evicted_keys)

    num_heads, num_evicted, head_dim = evicted_keys.shape
    device = kept_keys.device
    best = torch.empty(num_heads, num_evicted, dtype=torch.float32, device=device)
    best_idx = torch.empty(num_heads, num_evicted, dtype=torch.int32, device=device)
    if num_evicted == 0 or kept_keys.shape[1] == 0:
        best.fill_(float("-inf"))
        best_idx.zero_()
    else:
        has_groups = kept_group is not None
        if has_groups:
            group_k = kept_group.to(device=device, dtype=torch.int32).contiguous()
            group_e = evicted_group.to(device=device, dtype=torch.int32).contiguous()
        else:  # never read: HAS_GROUPS is a compile-time False
            group_k = group_e = best_idx
        inv_k, inv_e = _inverse_norms(kept_keys), _inverse_norms(evicted_keys)
        args = (
            evicted_keys, kept_keys, inv_e, inv_k, group_e, group_k, best, best_idx,
            evicted_keys.stride(0), evicted_keys.stride(1), kept_keys.stride(0),
            kept_keys.stride(1), inv_e.stride(0), inv_k.stride(0), group_e.stride(0),
            group_k.stride(0), best.stride(0),
            num_evicted, kept_keys.shape[1],
        )
        meta = {
            "HAS_GROUPS": has_groups,
            "HEAD_DIM": head_dim,
            "BLOCK_D": block_d(head_dim),
            "DOT_PRECISION": "tf32x3" if kept_keys.dtype == torch.float32 else "tf32",
        }
        launch("cosine_argmax", _cosine_argmax_tuned,
               lambda m: (triton.cdiv(num_evicted, m["BLOCK_E"]), num_heads), args, meta)
    return best_idx.to(torch.int64), best, torch.isfinite(best)
