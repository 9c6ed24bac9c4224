"""LOOK-M, the algorithm: pure torch on ``[kv_heads, seq, head_dim]`` tensors, no vLLM import.

Per layer, at the end of prefill::

    acc = AttentionAccumulator(num_kv_heads)
    acc.update(queries_chunk, keys_so_far, query_start)     # once per prefill chunk
    out = compress(keys, values, acc.scores, is_image, config)

``scoring_queries(config, prompt_len)`` says how many of the last prompt queries must be fed.
The heavy loops run in torch or, on CUDA, in the Triton kernels: ``kernel="auto" | "torch" |
"triton"`` on each function that has both (:mod:`.dispatch`).
"""

from .compress import CompressedKV, compress
from .config import CompressionConfig
from .dispatch import KERNELS, Kernel
from .merge import (
    MERGES,
    Assignment,
    AverageMerge,
    KVMerge,
    PivotalMerge,
    WeightedMerge,
    assign_to_kept,
)
from .scoring import AttentionAccumulator, accumulated_attention, scoring_queries, snapkv_pool
from .selection import (
    SELECTORS,
    H2OSelector,
    RandomSelector,
    Selection,
    Selector,
    SnapKVSelector,
    StreamingSelector,
    TextPriorSelector,
    budget_tokens,
    important_count,
    recent_tokens,
    recent_window_size,
    select_kept,
    selector_for,
)

__all__ = [
    "KERNELS",
    "MERGES",
    "SELECTORS",
    "Assignment",
    "AttentionAccumulator",
    "AverageMerge",
    "CompressedKV",
    "CompressionConfig",
    "H2OSelector",
    "KVMerge",
    "Kernel",
    "PivotalMerge",
    "RandomSelector",
    "Selection",
    "Selector",
    "SnapKVSelector",
    "StreamingSelector",
    "TextPriorSelector",
    "WeightedMerge",
    "accumulated_attention",
    "assign_to_kept",
    "budget_tokens",
    "compress",
    "important_count",
    "recent_tokens",
    "recent_window_size",
    "scoring_queries",
    "select_kept",
    "selector_for",
    "snapkv_pool",
]
