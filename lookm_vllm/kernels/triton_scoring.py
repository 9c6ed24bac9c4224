"""Accumulated attention (paper Eq. 4) as two Triton passes that never materialise L x L.

Score of key j in KV head g = sum over queries i and over the query heads h of group g of
``softmax(q_h,i . K_g^T * scale + causal mask)[j]``, the same quantity as
:func:`lookm_vllm.core.scoring.accumulated_attention` (query head h reads KV head ``h // group``,
consecutive groups as Llama's ``repeat_kv``; a group's heads are summed onto its KV head).

Pass 1 (:func:`triton_query_logsumexp`) is a flash-attention forward without the V product: each
program owns (query head, query tile) and streams the causal key tiles, keeping a running row max
and sum, and writes every query's log-sum-exp. Pass 2 owns (KV head, key tile), recomputes
``q . k`` for every query tile (and every query head of the group) that can see the tile,
``exp(s - lse)`` is then the exact softmax weight, and it sums them into a [BLOCK_M, BLOCK_N]
float32 register tile that is reduced over queries only once, at the end. One program writes each
output element, so no atomics are needed and the result is deterministic.

FLOPs: each pass multiplies every causal (query, key) pair once: 2 * d * Hq * pairs per pass,
pairs ~= Lq * L - Lq^2 / 2 (L^2 / 2 for full scoring), so the two passes execute
4 * d * Hq * pairs. The softmax row normaliser could come from the prefill's flash attention
(which computes it anyway): pass ``lse=`` to skip pass 1 and halve the work.

Importing this module never needs a GPU nor Triton: ``TRITON_AVAILABLE`` says whether the kernels
exist and :func:`cuda_kernels_usable` whether a tensor can be handed to them. With
``TRITON_INTERPRET=1`` set before Triton is first imported (and at launch), the kernels run on CPU
tensors through Triton's interpreter (slow; used by the CPU tests).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

try:  # Triton is optional: CPU installs and CI run without it.
    import triton
    import triton.language as tl
    import triton.testing
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

TRITON_AVAILABLE = triton is not None

__all__ = [
    "TRITON_AVAILABLE",
    "cuda_kernels_usable",
    "interpreter_active",
    "triton_accumulated_attention",
    "triton_query_logsumexp",
]

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def block_d(head_dim: int) -> int:
    """head_dim padded to a power of two (>= 16, tl.dot's minimum); the pad is masked."""
    return max(16, 1 << max(0, (head_dim - 1).bit_length()))


if TRITON_AVAILABLE:

    # Sizes are not specialised on (Triton would compile a variant per "divisible by 16" / "== 1"
    # pattern of L, Lq and query_start); shape_class is only an autotuning key.
    _SIZE_ARGS = ["num_queries", "num_keys", "query_start", "shape_class"]

    @triton.jit(do_not_specialize=_SIZE_ARGS)
    def _query_lse_kernel(
        Q, K, LSE,
        stride_qh, stride_qm, stride_kh, stride_kn, stride_lh,
        num_queries, num_keys, query_start, qk_scale, shape_class,
        NUM_Q_HEADS: tl.constexpr, GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # Late query tiles see the most keys: launch them first so the tail of the grid is short.
        num_tiles = tl.cdiv(num_queries, BLOCK_M)
        pid = tl.program_id(0)
        tile = num_tiles - 1 - pid // NUM_Q_HEADS
        q_head = pid % NUM_Q_HEADS
        kv_head = q_head // GROUP

        m0 = tile * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q_ptrs = Q + q_head.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < num_queries) & d_ok[None, :], other=0.0)
        positions = query_start + offs_m
        k_base = K + kv_head.to(tl.int64) * stride_kh

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        # Keys below full_end are seen by every row of the tile: no causal mask there. Every key
        # exists (query_start + num_queries <= num_keys), so only head_dim padding is masked.
        full_end = ((query_start + m0 + 1) // BLOCK_N) * BLOCK_N
        for n0 in range(0, full_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                        mask=d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
            m_i = m_new
        # The diagonal tiles. Key 0 is seen by every row, and it lies in the first tile processed
        # (here when full_end == 0), so m_i is finite after that tile and no row gets NaN.
        diag_end = tl.minimum(query_start + m0 + BLOCK_M, num_keys)
        for n0 in range(full_end, diag_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                        mask=(offs_n[:, None] < num_keys) & d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            seen = (offs_n[None, :] <= positions[:, None]) & (offs_n[None, :] < num_keys)
            s = tl.where(seen, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
            m_i = m_new

        tl.store(LSE + q_head.to(tl.int64) * stride_lh + offs_m, m_i + tl.log2(l_i),
                 mask=offs_m < num_queries)

    @triton.jit(do_not_specialize=_SIZE_ARGS)
    def _key_colsum_kernel(
        Q, K, LSE, OUT,
        stride_qh, stride_qm, stride_kh, stride_kn, stride_lh, stride_oh, stride_on,
        num_queries, num_keys, query_start, qk_scale, shape_class,
        NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # Early key tiles are seen by the most queries: launch them first.
        pid = tl.program_id(0)
        kv_head = pid % NUM_KV_HEADS
        n0 = (pid // NUM_KV_HEADS) * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        k_base = K + kv_head.to(tl.int64) * stride_kh
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=(offs_n[:, None] < num_keys) & d_ok[None, :], other=0.0)
        k_t = tl.trans(k)

        # Queries before m_start cannot see any key of the tile; from m_full on, every row sees
        # every key of the tile (no causal mask). Rows past num_queries load lse = +inf, so their
        # weights are exp2(-inf) = 0; key columns past num_keys are never stored.
        m_start = (tl.maximum(n0 - query_start, 0) // BLOCK_M) * BLOCK_M
        m_full = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - query_start, 0), BLOCK_M) * BLOCK_M
        diag_end = tl.minimum(m_full, num_queries)

        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for g in range(GROUP):
            q_head = (kv_head * GROUP + g).to(tl.int64)
            q_base = Q + q_head * stride_qh
            lse_base = LSE + q_head * stride_lh
            for m0 in range(m_start, diag_end, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                row_ok = offs_m < num_queries
                q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
                            mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
                s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
                seen = offs_n[None, :] <= (query_start + offs_m)[:, None]
                acc += tl.exp2(tl.where(seen, s, float("-inf")) - lse[:, None])
            for m0 in range(m_full, num_queries, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                row_ok = offs_m < num_queries
                q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
                            mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
                s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
                acc += tl.exp2(s - lse[:, None])

        out_ptrs = OUT + kv_head.to(tl.int64) * stride_oh + offs_n * stride_on
        key_ok = offs_n < num_keys
        previous = tl.load(out_ptrs, mask=key_ok, other=0.0)
        tl.store(out_ptrs, previous + tl.sum(acc, axis=0), mask=key_ok)

    def _configs(pairs):
        return [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in pairs
        ]

    def quick_bench(kernel_call, quantiles):
        """Autotuning benchmark: 20 ms per config instead of Triton's default 100 ms."""
        return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)

    # A few Hopper/Ampere-friendly shapes (BLOCK_M = 32 for observation windows); configs that
    # do not fit a GPU's shared memory are skipped by the autotuner. Tuned once per head_dim,
    # group size, dtype and shape class (windows and chunks / mid-size / long prefills).
    _AUTOTUNE_KW = {"key": ["HEAD_DIM", "GROUP", "shape_class"], "do_bench": quick_bench}
    _query_lse_tuned = triton.autotune(
        _configs([(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3)]),
        **_AUTOTUNE_KW,
    )(_query_lse_kernel)
    # Pass 2 accumulates into OUT, so autotuning trials must not leave their sums behind.
    _key_colsum_tuned = triton.autotune(
        _configs([(128, 128, 8, 3), (128, 64, 8, 3), (64, 128, 4, 3), (32, 128, 4, 3)]),
        restore_value=["OUT"],
        **_AUTOTUNE_KW,
    )(_key_colsum_kernel)

    _KERNELS_INTERPRETED = type(_query_lse_kernel).__name__ == "InterpretedFunction"
    # Small tiles for the interpreter: several tiles (and both loop kinds) already at L ~ 64.
    _INTERPRETER_CONFIGS = {
        "query_lse": triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}),
        "key_colsum": triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}),
        "cosine_argmax": triton.Config({"BLOCK_E": 32, "BLOCK_K": 16}),
    }
else:  # pragma: no cover - depends on the environment
    _KERNELS_INTERPRETED = False

# Kernel name -> triton.Config that replaces autotuning (tests run every config this way).
_FORCED_CONFIGS: dict = {}


def launch(name: str, tuned, grid, args: tuple, meta: dict) -> None:
    """Run an autotuned kernel, or its plain kernel with a forced / the interpreter's config.

    ``grid`` maps the block sizes of a config to the launch grid.
    """
    config = _FORCED_CONFIGS.get(name)
    if config is None and _KERNELS_INTERPRETED:
        config = _INTERPRETER_CONFIGS[name]
    if config is None:
        tuned[grid](*args, **meta)
    else:
        tuned.fn[grid(config.kwargs)](*args, **meta, **config.all_kwargs())


def interpreter_active() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return _KERNELS_INTERPRETED


def triton_dispatch(tensor: Tensor) -> bool:
    """Whether ``lookm_vllm.core`` should hand ``tensor``'s work to these kernels.

    True when :func:`cuda_kernels_usable` and the environment does not set ``LOOKM_TRITON=0``
    (which forces the pure-torch reference path, e.g. to compare the two).
    """
    return tensor.is_cuda and os.environ.get("LOOKM_TRITON", "1") != "0" \
        and cuda_kernels_usable(tensor)


def cuda_kernels_usable(tensor: Tensor) -> bool:
    """Whether the compiled Triton kernels can run on ``tensor``.

    Parameters
    ----------
    tensor : Tensor
        A tensor the kernels would read (queries or keys).

    Returns
    -------
    bool
        True when Triton is installed (not in interpreter mode), the tensor lives on a CUDA (or
        ROCm) device of compute capability >= 8.0 (bf16 tensor cores) and its dtype is
        float16, bfloat16 or float32.
    """
    if not TRITON_AVAILABLE or _KERNELS_INTERPRETED or not tensor.is_cuda:
        return False
    if tensor.dtype not in SUPPORTED_DTYPES:
        return False
    return torch.cuda.get_device_capability(tensor.device)[0] >= 8


def kernel_inputs(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Check that the kernels can run on ``tensors`` (one dtype and device) and prepare them."""
    first = tensors[0]
    interpreted = (
        _KERNELS_INTERPRETED and first.device.type == "cpu" and first.dtype in SUPPORTED_DTYPES
    )
    if not (cuda_kernels_usable(first) or interpreted):
        raise RuntimeError(
            "Triton kernels cannot run here: need Triton and a CUDA device of compute "
            "capability >= 8.0 with float16/bfloat16/float32 tensors (or CPU tensors with "
            f"TRITON_INTERPRET=1 set before Triton's import); got {first.dtype} on "
            f"{first.device}, TRITON_AVAILABLE={TRITON_AVAILABLE}"
        )
    if interpreted and first.dtype == torch.bfloat16:
        # Triton's interpreter has no bfloat16 arithmetic (its tl.dot multiplies the uint16 bit
        # patterns, triton-lang/triton#11584); float32 holds every bfloat16 value exactly.
        tensors = tuple(t.float() for t in tensors)
    # Rows may be strided (e.g. a [tokens, heads, d] buffer viewed as [heads, tokens, d]); only
    # the head_dim axis must be contiguous.
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def _validate(queries: Tensor, keys: Tensor, query_start: int | None) -> tuple[int, Tensor, Tensor]:
    if queries.ndim != 3 or keys.ndim != 3:
        raise ValueError(
            f"queries must be [Hq, Lq, d] and keys [Hkv, L, d], got {tuple(queries.shape)} and "
            f"{tuple(keys.shape)}"
        )
    num_q_heads, num_queries, head_dim = queries.shape
    num_kv_heads, num_keys, key_dim = keys.shape
    if head_dim != key_dim:
        raise ValueError(f"query head_dim {head_dim} != key head_dim {key_dim}")
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads}")
    if queries.dtype != keys.dtype or queries.device != keys.device:
        raise ValueError(
            f"queries ({queries.dtype}, {queries.device}) and keys ({keys.dtype}, {keys.device}) "
            "must share dtype and device"
        )
    if query_start is None:
        query_start = num_keys - num_queries
    if query_start < 0 or query_start + num_queries > num_keys:
        raise ValueError(
            f"queries at positions [{query_start}, {query_start + num_queries}) need keys up to "
            f"there, got {num_keys} keys"
        )
    queries, keys = kernel_inputs(queries, keys)
    return query_start, queries, keys


def _shape_class(num_queries: int) -> int:
    return 0 if num_queries <= 256 else 1 if num_queries <= 4096 else 2


def _launch_kwargs(queries: Tensor, scale: float | None) -> dict:
    head_dim = queries.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    return {
        "qk_scale": scale * LOG2E,
        "HEAD_DIM": head_dim,
        "BLOCK_D": block_d(head_dim),
        # Tensor cores would round float32 inputs to tf32 (10-bit mantissa): keep them exact.
        "DOT_PRECISION": "ieee" if queries.dtype == torch.float32 else "tf32",
        "shape_class": _shape_class(queries.shape[1]),
    }


def _query_lse_log2(queries: Tensor, keys: Tensor, query_start: int, kw: dict) -> Tensor:
    """Pass 1: per query row, log2-sum-exp2 of its causal logits (in log2 units)."""
    num_q_heads, num_queries, _ = queries.shape
    num_kv_heads, num_keys, _ = keys.shape
    lse = torch.empty(num_q_heads, num_queries, dtype=torch.float32, device=queries.device)
    args = (
        queries, keys, lse,
        queries.stride(0), queries.stride(1), keys.stride(0), keys.stride(1), lse.stride(0),
        num_queries, num_keys, query_start, kw["qk_scale"], kw["shape_class"],
    )
    meta = {
        "NUM_Q_HEADS": num_q_heads,
        "GROUP": num_q_heads // num_kv_heads,
        "HEAD_DIM": kw["HEAD_DIM"],
        "BLOCK_D": kw["BLOCK_D"],
        "DOT_PRECISION": kw["DOT_PRECISION"],
    }
    launch("query_lse", _query_lse_tuned,
           lambda m: (triton.cdiv(num_queries, m["BLOCK_M"]) * num_q_heads,), args, meta)
    return lse


def triton_query_logsumexp(
    queries: Tensor, keys: Tensor, query_start: int | None = None, scale: float | None = None
) -> Tensor:
    """Pass 1 alone: the natural-log softmax normaliser of every query over its causal keys.

    Parameters
    ----------
    queries, keys, query_start, scale
        As in :func:`triton_accumulated_attention`.

    Returns
    -------
    Tensor
        float32 ``[Hq, Lq]``: ``logsumexp_j<=pos(i) (q_i . k_j * scale)``, the ``softmax_lse``
        flash attention returns.
    """
    query_start, queries, keys = _validate(queries, keys, query_start)
    kw = _launch_kwargs(queries, scale)
    if queries.shape[1] == 0:
        return torch.empty(queries.shape[:2], dtype=torch.float32, device=queries.device)
    return _query_lse_log2(queries, keys, query_start, kw) / LOG2E


def triton_accumulated_attention(
    queries: Tensor,
    keys: Tensor,
    query_start: int | None = None,
    out: Tensor | None = None,
    *,
    scale: float | None = None,
    lse: Tensor | None = None,
) -> Tensor:
    """Accumulated causal softmax attention per KV head and key, without an L x L matrix.

    Parameters
    ----------
    queries : Tensor
        ``[Hq, Lq, d]``, float16/bfloat16/float32, at absolute positions
        ``query_start .. query_start + Lq - 1``; the query at position p sees keys ``[0, p]``.
        Any strides with a contiguous last axis. A window score is the same call with the last
        W queries.
    keys : Tensor
        ``[Hkv, L, d]``, same dtype and device, post-RoPE as cached. ``Hq`` must be a multiple of
        ``Hkv``; query head h reads KV head ``h // (Hq / Hkv)`` and a group is summed onto it.
    query_start : int, optional
        Absolute position of the first query; ``L - Lq`` (the last prompt positions) when not
        given. ``query_start + Lq <= L``. With ``out``, scores accumulate over prefill chunks.
    out : Tensor, optional
        float32 ``[Hkv, L]`` (any strides, e.g. ``buffer[:, :L]``) to which the scores are ADDED
        in place; a new zero tensor when not given.
    scale : float, optional
        Softmax scale; ``1 / sqrt(d)`` when not given.
    lse : Tensor, optional
        ``[Hq, Lq]`` natural-log softmax normaliser of each query (e.g. flash attention's
        ``softmax_lse`` from the prefill itself, with the same ``scale``); skips pass 1.

    Returns
    -------
    Tensor
        ``out``: float32 ``[Hkv, L]``, every query row contributing a total weight of 1.
    """
    query_start, queries, keys = _validate(queries, keys, query_start)
    num_q_heads, num_queries, _ = queries.shape
    num_kv_heads, num_keys, _ = keys.shape
    if out is None:
        out = torch.zeros(num_kv_heads, num_keys, dtype=torch.float32, device=keys.device)
    elif out.shape != (num_kv_heads, num_keys) or out.dtype != torch.float32:
        raise ValueError(
            f"out must be float32 [{num_kv_heads}, {num_keys}], got {out.dtype} {tuple(out.shape)}"
        )
    elif out.device != keys.device:
        raise ValueError(f"out is on {out.device}, keys on {keys.device}")
    if num_queries == 0:
        return out

    kw = _launch_kwargs(queries, scale)
    if lse is None:
        lse_log2 = _query_lse_log2(queries, keys, query_start, kw)
    else:
        if lse.shape != (num_q_heads, num_queries):
            raise ValueError(f"lse must be [{num_q_heads}, {num_queries}], got {tuple(lse.shape)}")
        lse_log2 = (lse.to(device=keys.device, dtype=torch.float32) * LOG2E).contiguous()

    args = (
        queries, keys, lse_log2, out,
        queries.stride(0), queries.stride(1), keys.stride(0), keys.stride(1), lse_log2.stride(0),
        out.stride(0), out.stride(1),
        num_queries, num_keys, query_start, kw["qk_scale"], kw["shape_class"],
    )
    meta = {
        "NUM_KV_HEADS": num_kv_heads,
        "GROUP": num_q_heads // num_kv_heads,
        "HEAD_DIM": kw["HEAD_DIM"],
        "BLOCK_D": kw["BLOCK_D"],
        "DOT_PRECISION": kw["DOT_PRECISION"],
    }
    launch("key_colsum", _key_colsum_tuned,
           lambda m: (triton.cdiv(num_keys, m["BLOCK_N"]) * num_kv_heads,), args, meta)
    return out
