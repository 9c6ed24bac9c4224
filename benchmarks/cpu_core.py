"""CPU microbenchmark of the pure-torch LOOK-M core, for one request and one layer.

Shapes default to LLaVA-v1.5-7B (32 query heads, 32 KV heads, head_dim 128) on a 9,800-token
prompt that is half image tokens (the paper's MileBench-like regime). Not a test: run it by hand,
``python -m benchmarks.cpu_core [--length L] [--repeat R]``, and read the table.

Full scoring is about 0.4 TFLOP at the default length (every query against every earlier key),
so it dominates on a CPU; window scoring (SnapKV's W=32) is the cheap alternative.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import lookm_vllm.core.merge as merge_module
import lookm_vllm.core.scoring as scoring_module
from lookm_vllm.core import CompressionConfig, accumulated_attention, compress
from lookm_vllm.vllm_adapter import layer_compute
from lookm_vllm.vllm_adapter.compaction import gather_keys
from lookm_vllm.vllm_adapter.kv_layout import CpuAttnLayout, PlainCodec
from lookm_vllm.vllm_adapter.layer_compute import WorkerRequest
from lookm_vllm.vllm_adapter.plan import RequestPlan

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def image_layout(length: int, num_images: int = 8, image_share: float = 0.5) -> torch.Tensor:
    """``num_images`` equal image spans covering ``image_share`` of the prompt, text between."""
    is_image = torch.zeros(length, dtype=torch.bool)
    span = int(image_share * length / num_images)
    stride = length // num_images
    for image in range(num_images):
        start = image * stride + (stride - span) // 2
        is_image[start: start + span] = True
    return is_image


def time_ms(function: Callable[[], object], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=9800, help="prompt tokens (default 9800)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per row (default 3)")
    parser.add_argument("--heads", type=int, default=32, help="query heads (default 32)")
    parser.add_argument("--kv-heads", type=int, default=32, help="KV heads (default 32)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim (default 128)")
    parser.add_argument("--window", type=int, default=32, help="observation window W")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--chunk", type=int, default=2048,
                        help="prefill chunk of the paged-cache row (vLLM-CPU's default 2048)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    length, head_dim = args.length, args.head_dim
    queries = torch.randn(args.heads, length, head_dim, dtype=dtype)
    keys = torch.randn(args.kv_heads, length, head_dim, dtype=dtype)
    values = torch.randn(args.kv_heads, length, head_dim, dtype=dtype)
    is_image = image_layout(length)
    window_queries = queries[:, -args.window:].contiguous()

    # Warm up kernels and allocators on a small slice, so the first timed run is not an outlier.
    accumulated_attention(queries[:, -64:, :], keys[:, :256])
    scores = accumulated_attention(window_queries, keys)
    compress(keys, values, scores, is_image, CompressionConfig())

    rows: list[tuple[str, list[float]]] = [
        ("QK^T matmul floor (full scoring's blocks)",
         time_ms(lambda: matmul_floor(queries, keys), args.repeat)),
        ("full scoring (all queries)",
         time_ms(lambda: accumulated_attention(queries, keys), args.repeat)),
        (f"window scoring (W={args.window})",
         time_ms(lambda: accumulated_attention(window_queries, keys), args.repeat)),
    ]
    paged = PagedPrompt(queries, keys, block_size=128)
    rows += [
        (f"full scoring from a paged cache, {args.chunk}-token chunks",
         time_ms(lambda: paged.score(args.chunk), args.repeat)),
        ("  of which gathering keys [0, end) per chunk",
         time_ms(lambda: paged.gather(args.chunk), args.repeat)),
    ]
    kept = None
    configs = [(f"compress lookm, merge={merge}", CompressionConfig(merge=merge))
               for merge in ("none", "pivotal", "average", "weighted")]
    configs.append(("compress lookm, merge=pivotal, same_modality",
                    CompressionConfig(merge="pivotal", merge_scope="same_modality")))
    for name, config in configs:
        out = compress(keys, values, scores, is_image, config)
        kept = out.num_kept
        rows.append((name, time_ms(lambda c=config: compress(keys, values, scores, is_image, c),
                                   args.repeat)))
    evicted = length - kept
    rows.append((f"merge floor: bmm + max, {evicted} x {kept} per head",
                 time_ms(lambda: similarity_floor(keys[:, :evicted], keys[:, :kept]),
                         args.repeat)))

    print(f"LOOK-M core on CPU, one request, one layer: L={length} "
          f"({int(is_image.sum())} image tokens), {args.heads} query / {args.kv_heads} KV heads, "
          f"d={head_dim}, {args.dtype}, budget 0.2 -> {kept} kept per head, "
          f"{torch.get_num_threads()} torch threads, {args.repeat} runs")
    width = max(len(name) for name, _ in rows)
    print(f"{'step':<{width}}  {'median ms':>10}  {'min ms':>10}")
    for name, times in rows:
        print(f"{name:<{width}}  {statistics.median(times):>10.1f}  {min(times):>10.1f}")
    median = {name: statistics.median(times) for name, times in rows}
    floor, full = median["QK^T matmul floor (full scoring's blocks)"], \
        median["full scoring (all queries)"]
    plain = median["compress lookm, merge=none"]
    pivotal_merge = median["compress lookm, merge=pivotal"] - plain
    print(f"\nfull scoring / matmul floor: {full / floor:.2f}x (target <= 2x)")
    print(f"pivotal merge (compress pivotal - compress none): {pivotal_merge:.1f} ms = "
          f"{100 * pivotal_merge / full:.1f} % of full scoring (target <= 25 %); its floor "
          f"(the similarity products and argmax alone): {median[rows[-1][0]]:.1f} ms; the "
          f"FLOP ratio of the two searches, E*K / (L^2/2): "
          f"{evicted * kept / (length * length / 2):.2f}")
    chunked, gathers = (median[rows[3][0]], median[rows[4][0]])
    print(f"full scoring from the paged cache in {args.chunk}-token chunks: {chunked / full:.2f}x "
          f"the one-shot scoring; re-gathering the keys [0, end) each chunk: {gathers:.1f} ms = "
          f"{100 * gathers / chunked:.1f} % of it")
    same = median["compress lookm, merge=pivotal, same_modality"] - plain
    print(f"pivotal merge with merge_scope=same_modality: {same:.1f} ms = "
          f"{100 * same / full:.1f} % of full scoring")


class PagedPrompt:
    """The prompt's keys in a CPU_ATTN paged cache (shuffled blocks), scored the way the engine
    adapter does during a chunked prefill: each chunk's queries against the keys ``[0, end)``
    gathered from the cache (``layer_compute._score``)."""

    def __init__(self, queries: torch.Tensor, keys: torch.Tensor, block_size: int) -> None:
        heads, length, dim = keys.shape
        num_blocks = -(-length // block_size)
        cache = torch.zeros(num_blocks, heads, block_size, 2 * dim, dtype=keys.dtype)
        self.key_cache, _ = CpuAttnLayout().split(cache)
        self.row = torch.randperm(num_blocks)
        padded = torch.zeros(heads, num_blocks * block_size, dim, dtype=keys.dtype)
        padded[:, :length] = keys
        self.key_cache[self.row] = padded.view(heads, num_blocks, block_size, dim).transpose(0, 1)
        self.queries, self.length = queries.transpose(0, 1).contiguous(), length
        self.plan = RequestPlan(CompressionConfig(), length, ((0, length),))
        self.codec = PlainCodec(keys.dtype)

    def score(self, chunk: int) -> None:
        request = WorkerRequest(self.plan)
        scale = self.queries.shape[-1] ** -0.5
        for first in range(0, self.length, chunk):
            end = min(first + chunk, self.length)
            layer_compute._score(request, "layer", self.queries[first:end], first, end,
                                 self.key_cache, self.row, scale, self.codec)

    def gather(self, chunk: int) -> None:
        dtype = layer_compute.scoring_gather_dtype(self.key_cache, self.codec)
        for first in range(0, self.length, chunk):
            gather_keys(self.key_cache, self.row, min(first + chunk, self.length), dtype)


def similarity_floor(evicted: torch.Tensor, kept: torch.Tensor) -> None:
    """The merge's similarity search as bare ``torch.bmm`` + ``max`` (no normalisation, no
    gathers), in the row blocks ``core.merge`` uses."""
    heads, num_evicted, _ = evicted.shape
    kept_t = kept.float().transpose(1, 2)
    step = max(1, merge_module._MAX_BLOCK_ELEMENTS // (heads * kept.shape[1]))
    for first in range(0, num_evicted, step):
        torch.bmm(evicted[:, first:first + step].float(), kept_t).max(dim=-1)


def matmul_floor(queries: torch.Tensor, keys: torch.Tensor) -> None:
    """Only the ``Q K^T`` products full scoring computes: the same causal row blocks and key
    cuts as ``AttentionAccumulator`` on the CPU, as plain ``torch.bmm`` (no softmax, no sums)."""
    num_q_heads, length, head_dim = queries.shape
    num_kv_heads = keys.shape[0]
    group = num_q_heads // num_kv_heads
    q = queries.float().reshape(num_kv_heads, group, length, head_dim)
    k_t = keys.float().transpose(1, 2).contiguous()   # the layout the accumulator multiplies
    step = max(scoring_module._CPU_MIN_ROWS,
               scoring_module._CPU_BLOCK_ELEMENTS // (num_q_heads * length))
    for first in range(0, length, step):
        last = min(first + step, length)
        block = q[:, :, first:last].reshape(num_kv_heads, -1, head_dim)
        torch.bmm(block, k_t[:, :, :last])


if __name__ == "__main__":
    main()
