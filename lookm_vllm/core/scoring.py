"""Accumulated attention (paper Eq. 4): how much attention each prompt key received.

Score of key j in KV head g = sum over the observed queries i and over the query heads h of group g
of softmax(q_h,i . K^T / sqrt(d) + causal mask)[j].

GQA: query head h reads KV head ``h // (Hq / Hkv)`` (Llama's ``repeat_kv``), and the scores of a
group are SUMMED onto their KV head. A mean would differ by the constant group size only, which
changes no ranking and no text prior; the sum keeps MHA scores identical to the paper's per-head
sums and makes every key's total over all heads equal the number of (head, query) rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import Kernel, check_kernel, use_triton

if TYPE_CHECKING:  # config.py imports this module (through selection.py): no runtime import back
    from .config import CompressionConfig

# Upper bound on the elements of one [Hq, queries, keys] logits block: queries are processed in
# chunks so a 16k-token prompt never materialises an L x L matrix (64 MiB per block in float32).
_MAX_BLOCK_ELEMENTS = 1 << 24
_CPU_BLOCK_ELEMENTS = 1 << 20
_CPU_MIN_ROWS = 32
_CPU_TRANSPOSE_MIN_ROWS = 512

SNAPKV_POOL_KERNEL = 5


@dataclass
class AttentionAccumulator:
    """Running accumulated-attention scores over the chunks of a prefill.

    Call :meth:`update` once per prefill chunk with that chunk's queries and all keys so far; the
    softmax of each query is normalised over every key it sees, so the sum over chunks equals the
    one-shot score.

    Parameters
    ----------
    num_kv_heads : int
        Number of KV heads of the layer.
    scale : float, optional
        Softmax scale; ``1 / sqrt(head_dim)`` when not given.
    kernel : {"auto", "torch", "triton"}
        The implementation (:mod:`lookm_vllm.core.dispatch`); ``"auto"``: Triton for CUDA tensors
        unless ``LOOKM_TRITON=0``.

    Attributes
    ----------
    scores : Tensor
        float32 ``[num_kv_heads, Lk_max]``, the longest key length seen so far; keys that arrived
        after a chunk simply received nothing from it (zero padding).
    """

    num_kv_heads: int
    scale: float | None = None
    kernel: Kernel = "auto"
    scores: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_kv_heads < 1:
            raise ValueError(f"num_kv_heads must be >= 1, got {self.num_kv_heads}")
        check_kernel(self.kernel)
        self.scores = torch.zeros(self.num_kv_heads, 0, dtype=torch.float32)

    def update(self, queries: Tensor, keys: Tensor, query_start: int) -> None:
        """Add the attention of one chunk of queries to the scores.

        Parameters
        ----------
        queries : Tensor
            ``[Hq, Lq, d]``, the queries at absolute positions ``query_start .. query_start+Lq-1``.
        keys : Tensor
            ``[Hkv, Lk, d]``, the keys at positions ``0 .. Lk-1`` (at least up to the last query).
        query_start : int
            Absolute position of the first query.
        """
        num_q_heads, num_queries, head_dim = queries.shape
        num_kv_heads, num_keys, key_dim = keys.shape
        if num_kv_heads != self.num_kv_heads:
            raise ValueError(f"keys have {num_kv_heads} heads, accumulator {self.num_kv_heads}")
        if head_dim != key_dim:
            raise ValueError(f"query head_dim {head_dim} != key head_dim {key_dim}")
        if num_q_heads % num_kv_heads:
            raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads}")
        if query_start < 0 or query_start + num_queries > num_keys:
            raise ValueError(
                f"queries at positions [{query_start}, {query_start + num_queries}) need keys up "
                f"to there, got {num_keys} keys"
            )

        device = keys.device
        if self.scores.device != device or self.scores.shape[1] < num_keys:
            grow = max(0, num_keys - self.scores.shape[1])
            self.scores = F.pad(self.scores.to(device), (0, grow))
        if num_queries == 0:
            return

        if use_triton(self.kernel, queries):
            from lookm_vllm.kernels import triton_accumulated_attention

            triton_accumulated_attention(queries, keys, query_start,
                                         out=self.scores[:, :num_keys], scale=self.scale)
            return
        group = num_q_heads // num_kv_heads
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(head_dim)
        # [Hq, Lq, d] -> [Hkv, group, Lq, d]: consecutive query heads share a KV head.
        q = (queries.to(torch.float32) * scale).reshape(num_kv_heads, group, num_queries, head_dim)
        k = keys.to(torch.float32)
        k_t = k.transpose(1, 2)                                            # [Hkv, d, Lk]
        if keys.is_cuda:
            step = max(1, _MAX_BLOCK_ELEMENTS // (num_q_heads * num_keys))
        else:
            # Row blocks of Q times a K^T whose rows are contiguous: 1.25-1.6x faster on the
            # CPU than times the transposed view of [Hkv, L, d] keys. Worth its copy (~2 % of
            # full scoring's products at 9.8k tokens) when there are many query rows; keys
            # gathered from CPU_ATTN's blocks already come this way.
            if k_t.stride(-1) != 1 and num_queries * group >= _CPU_TRANSPOSE_MIN_ROWS:
                k_t = k_t.contiguous()
            # CPU caches favour ~4 MiB blocks (2x faster than 64 MiB at L=4.6k), but each head
            # needs enough query rows for an efficient matmul (32 heads x 9.8k keys: 3x faster).
            step = max(_CPU_MIN_ROWS, _CPU_BLOCK_ELEMENTS // (num_q_heads * num_keys))
        for first in range(0, num_queries, step):
            last = min(first + step, num_queries)
            # Causality: nothing after the chunk's last query is ever seen, so cut the keys there.
            seen = query_start + last
            rows = group * (last - first)
            q_block = q[:, :, first:last].reshape(num_kv_heads, rows, head_dim)
            logits = torch.bmm(q_block, k_t[:, :, :seen])
            # Only the keys at or after the block's first query can lie in its future: mask that
            # diagonal band, not the whole block.
            band = query_start + first
            positions = torch.arange(band, query_start + last, device=device)
            future = torch.arange(band, seen, device=device)[None, :] > positions[:, None]
            logits.view(num_kv_heads, group, last - first, seen)[..., band:].masked_fill_(
                future, -math.inf)
            # Softmax in place, and its row normalisation folded into the sum over rows (one
            # matmul with the reciprocal denominators): the block is never copied.
            probabilities = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
            inverse_total = probabilities.sum(dim=-1, keepdim=True).reciprocal_()
            self.scores[:, :seen] += torch.bmm(inverse_total.transpose(1, 2),
                                               probabilities).squeeze(1)


def accumulated_attention(queries: Tensor, keys: Tensor, scale: float | None = None,
                          kernel: Kernel = "auto") -> Tensor:
    """Accumulated attention of the last ``Lq`` prompt queries onto all prompt keys (Eq. 4).

    Parameters
    ----------
    queries : Tensor
        ``[Hq, Lq, d]``, the queries of the LAST ``Lq`` prompt positions (all of them for the
        paper's full scoring, the last W for an observation window).
    keys : Tensor
        ``[Hkv, L, d]``, all prompt keys (post-RoPE, as cached). ``Hq`` must be a multiple of
        ``Hkv``; query heads are summed onto their KV head (see the module docstring).
    scale : float, optional
        Softmax scale; ``1 / sqrt(d)`` when not given.
    kernel : {"auto", "torch", "triton"}
        The implementation (:mod:`lookm_vllm.core.dispatch`).

    Returns
    -------
    Tensor
        float32 ``[Hkv, L]`` scores, computed in float32 whatever the input dtype.
    """
    accumulator = AttentionAccumulator(keys.shape[0], scale=scale, kernel=kernel)
    accumulator.update(queries, keys, query_start=keys.shape[1] - queries.shape[1])
    return accumulator.scores


def scoring_queries(config: CompressionConfig, prompt_len: int) -> int:
    """How many of the last prompt queries the engine must capture for ``config``.

    Parameters
    ----------
    config : CompressionConfig
        The request's compression config.
    prompt_len : int
        Number of prompt tokens.

    Returns
    -------
    int
        ``prompt_len`` for full scoring, ``min(window, prompt_len)`` for window scoring (and
        SnapKV by default), 0 when the method needs no attention scores (or is inactive). The
        queries at positions ``prompt_len - n ..`` feed :class:`AttentionAccumulator`.
    """
    if not config.needs_attention:
        return 0
    if config.scoring == "window":
        return min(config.window, prompt_len)
    return prompt_len


def snapkv_pool(scores: Tensor, kernel_size: int = SNAPKV_POOL_KERNEL) -> Tensor:
    """SnapKV's smoothing: 1-D average pool over the key axis, stride 1, zero padding.

    Keeps the neighbours of an important token, so clustered information survives. The divisor is
    always ``kernel_size`` (``count_include_pad``), as in SnapKV's code.

    Parameters
    ----------
    scores : Tensor
        ``[H, L]`` scores.
    kernel_size : int
        Odd pooling width.

    Returns
    -------
    Tensor
        ``[H, L]`` pooled scores.
    """
    return F.avg_pool1d(scores, kernel_size=kernel_size, stride=1, padding=kernel_size // 2)
