"""LOOK-M scoring and merging on one GPU, against a Llama-7B-shaped prefill. Self-contained.

Needs only torch and Triton (no vLLM, no downloads); imports ``lookm_vllm`` from this checkout.

    python benchmarks/gpu_scoring.py --out results.json            # H200: about 2-3 minutes
    python benchmarks/gpu_scoring.py --quick --out quick.json      # fewer sizes and repeats
    python benchmarks/gpu_scoring.py --cpu-smoke --out smoke.json  # CPU: tiny sizes, Triton
                                                                   # interpreter; code path only

Sections (each one failing is recorded in the JSON and the run goes on; the JSON is rewritten
after every section, so a killed run keeps what it measured):

1. correctness: Triton scores vs a float64 torch reference (max abs / rel error), MHA, GQA,
   head_dim 80 in fp16, an observation window, and prefill-chunk accumulation through ``out``.
2. kept sets: realistic structured q/k (RoPE, attention sink, image tokens in clusters) at 9.8k
   tokens; the kept sets of LOOK-M (50 % and 90 % image tokens) and H2O selected from Triton
   scores vs from float64 scores; the Triton merge assignment vs ``lookm_vllm.core``'s torch one.
3. timings at L = 2k, 9.8k, 16k, per layer and for 32 layers (one layer timed, times 32: every
   layer has the same shapes): Triton full scoring (and its two passes), the core torch scoring
   (chunked float32), window scoring (W = 32), ``compress`` per merge (pivotal / average /
   weighted, selection included) with ``kernel="torch"`` and ``kernel="triton"`` (the assignment),
   and the prefill of 32 random Llama-7B decoder layers with SDPA (flash) at the same length.

FLOP convention: a causal (query, key) pair costs 2 * d FLOPs per query head for q . k. The
kernel computes q . k twice (pass 1: log-sum-exp; pass 2: column sums), so its executed FLOPs
are 4 * d * Hq * pairs, pairs = L (L + 1) / 2 for full scoring. That equals the "0.8 TFLOP per
layer" at L = 9.8k quoted for Q.K^T over the full square once. Achieved TFLOP/s use executed
FLOPs and are compared with 790 TFLOP/s (dense bf16 measured on H200).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PEAK_BF16_TFLOPS = 790.0
NUM_LAYERS = 32
LLAMA_7B = {"hidden": 4096, "heads": 32, "intermediate": 11008, "head_dim": 128}
WINDOW = 32
MERGES = ("pivotal", "average", "weighted")
IMAGE_TOKENS_PER_IMAGE = 576  # LLaVA-1.5: 24 x 24 patches
T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {message}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/gpu_scoring.json"))
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny sizes on CPU through Triton's interpreter: exercises the code path only",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=240.0,
        help="skip the remaining optional measurements once this many seconds have passed",
    )
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Plan: every size and repeat count in one place.
# --------------------------------------------------------------------------------------------


def _case(name, hq, hkv, d, length, lq, dtype="bfloat16"):
    return {"name": name, "hq": hq, "hkv": hkv, "d": d, "length": length, "lq": lq,
            "dtype": dtype}


def make_plan(args) -> dict:
    if args.cpu_smoke:
        return {
            "device": "cpu",
            "heads": 4,
            "head_dim": 64,
            "correctness": [
                _case("mha_L96", 4, 4, 64, 96, 96),
                _case("gqa_d80_fp16_L77", 4, 2, 80, 77, 77, "float16"),
                _case("window8_L100", 4, 4, 64, 100, 8),
            ],
            "chunk_check": {"hq": 4, "hkv": 2, "d": 64, "length": 90, "chunks": [0, 30, 31, 90]},
            "kept_lengths": [160],
            "lengths": [96, 160],
            "torch_full_lengths": [96, 160],
            "reps": {"triton": 1, "torch": 1, "window": 1, "merge": 1, "prefill": 1},
            "model": {"layers": 2, "hidden": 256, "heads": 4, "intermediate": 512, "head_dim": 64},
        }
    quick = args.quick
    correctness = [
        _case("mha_L1024", 32, 32, 128, 1024, 1024),
        _case("window32_L4096", 32, 32, 128, 4096, WINDOW),
    ]
    if not quick:
        correctness += [
            _case("gqa32x8_L2048", 32, 8, 128, 2048, 2048),
            _case("gqa8x2_d80_fp16_L777", 8, 2, 80, 777, 777, "float16"),
        ]
    return {
        "device": "cuda",
        "heads": 32,
        "head_dim": 128,
        "correctness": correctness,
        "chunk_check": {"hq": 32, "hkv": 32, "d": 128, "length": 3000,
                        "chunks": [0, 1000, 2048, 3000]},
        "kept_lengths": [2048] if quick else [2048, 9800],
        "lengths": [9800, 2048] if quick else [9800, 2048, 16384],
        "torch_full_lengths": [9800, 2048] if quick else [9800, 2048, 16384],
        "reps": {"triton": 5, "torch": 1 if quick else 2, "window": 10,
                 "merge": 2 if quick else 3, "prefill": 1 if quick else 2},
        "model": {"layers": NUM_LAYERS, **LLAMA_7B},
    }


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class Recorder:
    """Results dict written to JSON after every section; a failing section is recorded."""

    def __init__(self, path: Path, args) -> None:
        self.path = path
        self.results = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "conventions": {
                "flops": "executed = 4 * d * Hq * causal_pairs (q.k in both passes); "
                "causal_pairs = Lq * (query_start + 1) + Lq * (Lq - 1) / 2",
                "layers": f"one layer timed, x{NUM_LAYERS} (all layers have the same shapes)",
                "peak_bf16_tflops": PEAK_BF16_TFLOPS,
                "times": "milliseconds, median over repeats, CUDA events after warmup",
            },
            "sections": {},
            "errors": {},
        }
        self.save()

    @contextlib.contextmanager
    def section(self, name: str):
        log(f"== {name}")
        self.current = name
        start = time.perf_counter()
        try:
            yield self.results["sections"].setdefault(name, {})
        except Exception as exc:  # recorded and reported; the run goes on
            self.results["errors"][name] = f"{type(exc).__name__}: {exc}"
            log(f"!! {name} failed: {type(exc).__name__}: {exc}")
            traceback.print_exc()
        finally:
            self.results["sections"].setdefault(name, {})["section_s"] = round(
                time.perf_counter() - start, 2
            )
            free_memory()
            self.save()

    @contextlib.contextmanager
    def part(self, record: dict, name: str):
        """One measurement of a section: a failure is recorded and the section goes on."""
        try:
            yield
        except Exception as exc:  # recorded and reported; the run goes on
            message = f"{type(exc).__name__}: {exc}"
            record.setdefault("errors", {})[name] = message
            self.results["errors"][f"{self.current}/{name}"] = message
            log(f"!! {self.current}/{name} failed: {message}")
            traceback.print_exc()
            free_memory()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=2, default=str))
        tmp.replace(self.path)


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_ms(fn, device: str, warmup: int = 1, reps: int = 5) -> dict:
    """Median / min wall time of ``fn()`` in ms (CUDA events on GPU)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "reps": reps}


def causal_pairs(length: int, num_queries: int) -> int:
    query_start = length - num_queries
    return num_queries * (query_start + 1) + num_queries * (num_queries - 1) // 2


def over_budget(args, what: str, record: dict) -> bool:
    if time.perf_counter() - T0 > args.budget_s:
        record.setdefault("skipped", []).append(f"{what}: past --budget-s {args.budget_s}")
        log(f"   skip {what}: past the time budget")
        return True
    return False


def install_config_stub() -> type:
    """Stand in for ``lookm_vllm.core.config`` where pydantic is missing (the bare GPU image has
    torch and Triton but no pydantic). The benchmark builds configs with explicit method and
    merge only, so a frozen dataclass with the paper's defaults (budget 0.2 = alpha1 + alpha2,
    recent 0.1 = alpha1) and the same derived fields is enough to run the real core code."""
    import dataclasses
    import types

    attention_methods = frozenset({"lookm", "h2o", "snapkv"})

    @dataclasses.dataclass(frozen=True)
    class CompressionConfig:
        method: str = "lookm"
        budget: float | None = 0.2
        max_kv_tokens: int | None = None
        recent_ratio: float = 0.1
        merge: str | None = None
        merge_scope: str = "all"
        scoring: str | None = None
        window: int = WINDOW
        seed: int = 0
        sink_tokens: int = 4

        def __post_init__(self):
            if self.max_kv_tokens is not None:
                object.__setattr__(self, "budget", None)
            if self.merge is None:
                object.__setattr__(self, "merge", "pivotal" if self.method == "lookm" else "none")
            if self.scoring is None:
                object.__setattr__(self, "scoring", "window" if self.method == "snapkv" else "full")

        @classmethod
        def parse(cls, obj):
            if obj is None:
                return cls()
            return obj if isinstance(obj, cls) else cls(**obj)

        def model_dump(self, mode="python"):
            # What RequestPlan.to_dict() calls (benchmarks/gpu_adapter_check.py); every field is
            # a JSON scalar, so both modes are the same dict.
            return dataclasses.asdict(self)

        @property
        def is_active(self):
            return self.method != "none" and (self.max_kv_tokens is not None or self.budget < 1.0)

        @property
        def needs_attention(self):
            return self.is_active and self.method in attention_methods

    module = types.ModuleType("lookm_vllm.core.config")
    module.CompressionConfig = CompressionConfig
    module.ATTENTION_METHODS = attention_methods
    module.__getattr__ = lambda name: object  # type aliases (Method, MergeName, ...) if imported
    sys.modules["lookm_vllm.core.config"] = module
    return CompressionConfig


def import_core() -> str:
    """Import ``lookm_vllm.core``; returns how its config was provided."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("pydantic") is not None:
        how = "pydantic"
    else:
        install_config_stub()
        how = "dataclass stand-in (no pydantic here)"
    importlib.import_module("lookm_vllm.core")
    return how


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def image_layout(length: int, image_fraction: float):
    """bool [L]: text prefix, images of <= 576 tokens separated by text, a text question last."""
    import torch

    is_image = torch.zeros(length, dtype=torch.bool)
    num_image = round(image_fraction * length)
    if num_image == 0:
        return is_image
    num_images = max(1, round(num_image / IMAGE_TOKENS_PER_IMAGE))
    text_gap = (length - num_image) // (num_images + 1)  # prefix, between images, question
    position = text_gap
    for i in range(num_images):
        size = num_image // num_images + (1 if i < num_image % num_images else 0)
        is_image[position : position + size] = True
        position += size + text_gap
    return is_image


def rope_tables(length: int, head_dim: int, device, dtype, base: float = 10000.0):
    """cos, sin [L, d/2] of Llama's rotary embedding."""
    import torch

    half = head_dim // 2
    freqs = base ** (-torch.arange(half, device=device, dtype=torch.float32) / half)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * freqs[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope(x, cos, sin):
    """Rotary embedding (rotate-half convention) on [..., L, d], in the dtype of the tables."""
    import torch

    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].to(cos.dtype), x[..., half:].to(cos.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def realistic_layer(length, hq, hkv, d, image_fraction, device, dtype=None, seed=0):
    """One layer's post-RoPE queries [Hq, L, d], keys and values [Hkv, L, d] with structure.

    Keys share a per-head offset (keys of a real layer are far from isotropic), carry a
    relevance component along a query direction (text more relevant on average than image
    patches), image tokens form clusters of near-duplicate patches, and token 0 is an attention
    sink. Logits have a spread of a few units, as in Llama layers.
    """
    import torch

    dtype = dtype or torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    is_image = image_layout(length, image_fraction).to(device)
    group = hq // hkv
    direction = randn(hkv, 1, d)  # norm ~ sqrt(d)
    offset = 0.7 * randn(hkv, 1, d)
    relevance = torch.where(is_image, 0.7 * randn(hkv, length) - 0.3, randn(hkv, length) + 0.3)
    keys = randn(hkv, length, d) + offset + 0.25 * relevance[..., None] * direction
    image_positions = is_image.nonzero().squeeze(1)
    if image_positions.numel():
        prototypes = randn(hkv, 16, d)  # patches of an image cluster around a few prototypes
        cluster = torch.arange(image_positions.numel(), device=device) // 37 % 16
        keys[:, image_positions] = (
            0.8 * prototypes[:, cluster] + 0.6 * keys[:, image_positions] + offset
        )
    keys[:, 0] = offset[:, 0] + 2.0 * direction[:, 0]  # attention sink
    queries = randn(hq, length, d) + 0.35 * direction.repeat_interleave(group, 0)
    cos, sin = rope_tables(length, d, device, torch.float32)
    queries = rope(queries, cos, sin).to(dtype)
    keys = rope(keys, cos, sin).to(dtype)
    values = randn(hkv, length, d).to(dtype)
    return queries, keys, values, is_image


def random_qk(hq, hkv, d, length, lq, dtype, device, seed=0):
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    direction = torch.randn(d, generator=gen, device=device)
    keys = torch.randn(hkv, length, d, generator=gen, device=device)
    keys += torch.randn(hkv, length, 1, generator=gen, device=device) * direction
    queries = torch.randn(hq, lq, d, generator=gen, device=device) + 0.5 * direction
    return queries.to(dtype), keys.to(dtype)


def reference_scores(queries, keys, query_start=None):
    """Float64 accumulated causal attention, one query head at a time (L x L per head)."""
    import torch

    hq, lq, d = queries.shape
    hkv, length, _ = keys.shape
    group = hq // hkv
    query_start = length - lq if query_start is None else query_start
    positions = query_start + torch.arange(lq, device=keys.device)
    future = torch.arange(length, device=keys.device)[None, :] > positions[:, None]
    scores = torch.zeros(hkv, length, dtype=torch.float64, device=keys.device)
    for head in range(hq):
        logits = queries[head].double() @ keys[head // group].double().T / math.sqrt(d)
        logits.masked_fill_(future, float("-inf"))
        scores[head // group] += logits.softmax(-1).sum(0)
        del logits
    return scores


def error_stats(scores, reference) -> dict:
    scores = scores.double()
    diff = (scores - reference).abs()
    significant = reference > 1e-3 * reference.max()
    return {
        "max_abs": diff.max().item(),
        "max_rel": (diff[significant] / reference[significant]).max().item(),
        "max_score": reference.max().item(),
        "sum": scores.sum().item(),
        "expected_sum": reference.sum().item(),
    }


# --------------------------------------------------------------------------------------------
# Llama-7B-shaped prefill with random weights
# --------------------------------------------------------------------------------------------


class RandomLlama:
    """Decoder layers of Llama (RMSNorm, fused QKV, RoPE, causal SDPA, SwiGLU) with random
    weights, as vLLM runs them at prefill (no embedding lookup, no LM head)."""

    def __init__(self, layers, hidden, heads, intermediate, head_dim, device, seed=0):
        import torch

        self.hidden, self.heads, self.head_dim = hidden, heads, head_dim
        gen = torch.Generator(device=device).manual_seed(seed)

        def weight(rows, cols):
            w = torch.empty(rows, cols, dtype=torch.bfloat16, device=device)
            return w.normal_(0.0, 0.02, generator=gen)

        def ones():
            return torch.ones(hidden, dtype=torch.bfloat16, device=device)

        self.layers = [
            {
                "ln_attn": ones(),
                "qkv": weight(3 * heads * head_dim, hidden),
                "out": weight(hidden, heads * head_dim),
                "ln_mlp": ones(),
                "gate_up": weight(2 * intermediate, hidden),
                "down": weight(hidden, intermediate),
            }
            for _ in range(layers)
        ]
        self.final_norm = ones()
        self.num_params = sum(t.numel() for layer in self.layers for t in layer.values())

    def forward(self, x):
        import torch.nn.functional as F

        length = x.shape[0]
        cos, sin = rope_tables(length, self.head_dim, x.device, x.dtype)
        for layer in self.layers:
            h = F.rms_norm(x, (self.hidden,), layer["ln_attn"], eps=1e-5)
            q, k, v = F.linear(h, layer["qkv"]).view(length, 3, self.heads, self.head_dim).unbind(1)
            q, k = rope(q.transpose(0, 1), cos, sin), rope(k.transpose(0, 1), cos, sin)
            attn = F.scaled_dot_product_attention(
                q[None], k[None], v.transpose(0, 1)[None], is_causal=True
            )
            x = x + F.linear(attn[0].transpose(0, 1).reshape(length, -1), layer["out"])
            h = F.rms_norm(x, (self.hidden,), layer["ln_mlp"], eps=1e-5)
            gate, up = F.linear(h, layer["gate_up"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer["down"])
        return F.rms_norm(x, (self.hidden,), self.final_norm, eps=1e-5)


def flash_context(device: str):
    """SDPA restricted to the flash backend on GPU (what vLLM uses at prefill)."""
    if device != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def section_env(record: dict, plan: dict) -> None:
    import torch

    record.update(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        device=plan["device"],
    )
    try:
        import triton

        record["triton"] = triton.__version__
    except ImportError:
        record["triton"] = None
    if plan["device"] == "cuda":
        record["gpu"] = torch.cuda.get_device_name()
        record["capability"] = list(torch.cuda.get_device_capability())
        record["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30)
    from lookm_vllm import kernels

    record["triton_available"] = kernels.TRITON_AVAILABLE
    record["interpreter"] = kernels.interpreter_active()
    log(f"   {record}")


def section_correctness(record: dict, plan: dict) -> None:
    import torch

    from lookm_vllm.kernels import triton_accumulated_attention

    try:
        from lookm_vllm.core import accumulated_attention
    except ImportError:
        accumulated_attention = None
    device = plan["device"]
    for case in plan["correctness"]:
        dtype = getattr(torch, case["dtype"])
        queries, keys = random_qk(case["hq"], case["hkv"], case["d"], case["length"], case["lq"],
                                  dtype, device)
        start = time.perf_counter()
        scores = triton_accumulated_attention(queries, keys)
        if device == "cuda":
            torch.cuda.synchronize()
        first_call_s = time.perf_counter() - start  # compile + autotune
        reference = reference_scores(queries, keys)
        stats = error_stats(scores, reference)
        stats["first_call_s"] = round(first_call_s, 2)
        if accumulated_attention is not None:
            stats["core_torch_max_abs"] = error_stats(
                accumulated_attention(queries, keys, kernel="torch"), reference
            )["max_abs"]
        record[case["name"]] = stats
        log(f"   {case['name']}: {stats}")

    chunk = plan["chunk_check"]
    queries, keys = random_qk(chunk["hq"], chunk["hkv"], chunk["d"], chunk["length"],
                              chunk["length"], torch.bfloat16, device, seed=1)
    buffer = torch.zeros(chunk["hkv"], chunk["length"], device=device)
    bounds = chunk["chunks"]
    for start, end in itertools.pairwise(bounds):
        triton_accumulated_attention(queries[:, start:end], keys[:, :end], start,
                                     out=buffer[:, :end])
    stats = error_stats(buffer, reference_scores(queries, keys))
    stats["chunks"] = bounds
    record["chunked_prefill"] = stats
    log(f"   chunked_prefill: {stats}")


def _kept_difference(mask, reference_mask) -> dict:
    differing = (mask != reference_mask).sum(-1)
    return {
        "identical": bool(differing.sum().item() == 0),
        "heads_differing": int((differing > 0).sum().item()),
        "positions_differing": int(differing.sum().item()),
        "kept_per_head": int(reference_mask[0].sum().item()),
    }


def section_kept_sets(record: dict, plan: dict, length: int) -> None:
    import torch

    from lookm_vllm.core import (
        CompressionConfig,
        accumulated_attention,
        assign_to_kept,
        select_kept,
        selector_for,
    )
    from lookm_vllm.kernels import triton_accumulated_attention, triton_cosine_argmax

    device = plan["device"]
    heads, d = plan["heads"], plan["head_dim"]
    record["length"] = length
    for image_fraction in (0.5, 0.9):
        queries, keys, _, is_image = realistic_layer(length, heads, heads, d, image_fraction,
                                                     device, seed=2)
        scores = triton_accumulated_attention(queries, keys)
        reference = reference_scores(queries, keys)
        torch_scores = accumulated_attention(queries, keys, kernel="torch")
        tag = f"image{int(image_fraction * 100)}"
        record[f"{tag}_scores"] = error_stats(scores, reference)
        for method in ("lookm", "h2o"):
            config = CompressionConfig(method=method)
            masks = [
                select_kept(selector_for(config), s, is_image, config, heads).kept_mask
                for s in (reference, scores, torch_scores)
            ]
            record[f"{tag}_{method}_triton_vs_float64"] = _kept_difference(masks[1], masks[0])
            record[f"{tag}_{method}_core_torch_vs_float64"] = _kept_difference(masks[2], masks[0])
            log(f"   {tag} {method}: triton {record[f'{tag}_{method}_triton_vs_float64']}, "
                f"core torch {record[f'{tag}_{method}_core_torch_vs_float64']}")

        # Merge assignment on the LOOK-M split of this layer: the kernel (on the cached dtype, as
        # compress hands it on CUDA) vs the core's torch path (float32).
        config = CompressionConfig(method="lookm")
        mask = select_kept(selector_for(config), scores, is_image, config, heads).kept_mask
        positions = torch.arange(length, device=device).expand(heads, length)
        kept = positions[mask].view(heads, -1)
        evicted = positions[~mask].view(heads, -1)

        kept_keys = keys.gather(1, kept[..., None].expand(-1, -1, d))
        evicted_keys = keys.gather(1, evicted[..., None].expand(-1, -1, d))
        target, similarity, valid = triton_cosine_argmax(kept_keys, evicted_keys)
        expected = assign_to_kept(kept_keys.float(), evicted_keys.float(), kernel="torch")
        exact = assign_to_kept(kept_keys.double(), evicted_keys.double(), kernel="torch")
        same = target == expected.target
        # Where the targets differ, how much worse (in reference cosine) the kernel's choice is.
        kept_unit = torch.nn.functional.normalize(kept_keys.float(), dim=-1)
        evicted_unit = torch.nn.functional.normalize(evicted_keys.float(), dim=-1)
        chosen = (evicted_unit * kept_unit.gather(1, target[..., None].expand(-1, -1, d))).sum(-1)
        record[f"{tag}_merge_assignment"] = {
            "evicted_per_head": evicted.shape[1],
            "target_agreement": same.float().mean().item(),
            "targets_differing": int((~same).sum().item()),
            "max_similarity_loss_where_differing": (
                (expected.similarity - chosen)[~same].max().item() if (~same).any() else 0.0
            ),
            "max_similarity_abs_diff": (similarity - expected.similarity).abs().max().item(),
            "valid_equal": bool(torch.equal(valid, expected.valid)),
            "triton_vs_float64_agreement": (target == exact.target).float().mean().item(),
            "core_float32_vs_float64_agreement": (
                (expected.target == exact.target).float().mean().item()
            ),
        }
        log(f"   {tag} merge assignment: {record[f'{tag}_merge_assignment']}")
        del queries, keys, reference, scores, torch_scores
        free_memory()


def section_timings(recorder, record: dict, plan: dict, length: int, args, model_box: dict):
    import torch

    from lookm_vllm.kernels import triton_accumulated_attention, triton_query_logsumexp

    device, heads, d = plan["device"], plan["heads"], plan["head_dim"]
    reps = plan["reps"]
    queries, keys, values, is_image = realistic_layer(length, heads, heads, d, 0.5, device,
                                                      seed=3)
    record["length"] = length
    record["image_fraction"] = round(is_image.float().mean().item(), 3)
    executed_tflop = 4 * d * heads * causal_pairs(length, length) / 1e12
    record["executed_tflop_per_layer"] = executed_tflop

    def per_layer(name, fn, tflop=None, **timing_kw):
        with recorder.part(record, name):
            timing = time_ms(fn, device, **timing_kw)
            timing[f"x{NUM_LAYERS}_ms"] = timing["median_ms"] * NUM_LAYERS
            if tflop is not None:
                timing["tflops"] = tflop / (timing["median_ms"] / 1e3)
                timing["fraction_of_peak"] = timing["tflops"] / PEAK_BF16_TFLOPS
            record[name] = timing
            log(f"   L={length} {name}: {timing['median_ms']:.3f} ms/layer, "
                f"{timing[f'x{NUM_LAYERS}_ms']:.1f} ms x{NUM_LAYERS}"
                + (f", {timing['tflops']:.0f} TFLOP/s" if tflop is not None else ""))

    # Triton scoring: full, its two passes, and the observation window.
    window = queries[:, -WINDOW:]
    per_layer("triton_full", lambda: triton_accumulated_attention(queries, keys), executed_tflop,
              reps=reps["triton"])
    per_layer("triton_pass1_lse", lambda: triton_query_logsumexp(queries, keys),
              executed_tflop / 2, reps=reps["triton"])
    with recorder.part(record, "lse"):
        lse = triton_query_logsumexp(queries, keys)
        per_layer("triton_pass2_given_lse",
                  lambda: triton_accumulated_attention(queries, keys, lse=lse),
                  executed_tflop / 2, reps=reps["triton"])
    per_layer("triton_window", lambda: triton_accumulated_attention(window, keys),
              4 * d * heads * causal_pairs(length, WINDOW) / 1e12, reps=reps["window"])

    # Core torch scoring (float32, chunked) and compress (selection + merge), with the core
    # torch assignment and with the Triton one (kernel="triton", what CUDA runs by default).
    with recorder.part(record, "core"):
        from lookm_vllm.core import CompressionConfig, accumulated_attention, compress

        per_layer("torch_window", lambda: accumulated_attention(window, keys, kernel="torch"),
                  reps=reps["window"])
        if length in plan["torch_full_lengths"] and not over_budget(
            args, f"torch_full L={length}", record
        ):
            per_layer("torch_full", lambda: accumulated_attention(queries, keys, kernel="torch"),
                      warmup=0 if length > 10000 else 1, reps=reps["torch"])
        scores = triton_accumulated_attention(queries, keys)
        for merge in ("none",) + MERGES:
            config = CompressionConfig(method="lookm", merge=merge)

            def run(config=config, kernel="torch"):
                return compress(keys, values, scores, is_image, config, kernel=kernel)

            per_layer(f"compress_{merge}_torch", run, reps=reps["merge"])
            if merge != "none":  # the merge assignment on the Triton kernel (what CUDA runs)
                per_layer(f"compress_{merge}_triton", functools.partial(run, kernel="triton"),
                          reps=reps["merge"])
    # Prefill of the Llama-7B-shaped stack at the same length.
    if over_budget(args, f"prefill L={length}", record):
        return
    with recorder.part(record, "prefill_sdpa"):
        if "model" not in model_box:
            start = time.perf_counter()
            model_box["model"] = RandomLlama(**plan["model"], device=device)
            log(f"   built random Llama ({model_box['model'].num_params / 1e9:.2f} B params) in "
                f"{time.perf_counter() - start:.1f}s")
        model = model_box["model"]
        hidden = torch.randn(length, plan["model"]["hidden"], device=device,
                             dtype=torch.bfloat16)
        try:
            with torch.inference_mode(), flash_context(device):
                timing = time_ms(lambda: model.forward(hidden), device, warmup=1,
                                 reps=reps["prefill"])
            timing["sdpa_backend"] = "flash" if device == "cuda" else "default"
        except RuntimeError as exc:  # no flash kernel for this GPU / build: let SDPA choose
            log(f"   flash SDPA unavailable ({exc}); timing SDPA's own choice")
            with torch.inference_mode():
                timing = time_ms(lambda: model.forward(hidden), device, warmup=1,
                                 reps=reps["prefill"])
            timing["sdpa_backend"] = f"default (flash failed: {exc})"
        timing["layers"] = len(model.layers)
        record["prefill_sdpa"] = timing
        prefill = timing["median_ms"] * NUM_LAYERS / len(model.layers)
        record["prefill_ms_32_layers"] = prefill
        log(f"   L={length} prefill ({len(model.layers)} layers): {timing['median_ms']:.1f} ms")

    if "prefill_ms_32_layers" not in record:
        return
    prefill = record["prefill_ms_32_layers"]

    def x32(key):
        return record[key][f"x{NUM_LAYERS}_ms"] if key in record else None

    ratios = {}
    for name, parts in {
        "triton_full_plus_pivotal_triton_over_prefill": ("triton_full", "compress_pivotal_triton"),
        "triton_full_plus_pivotal_torch_over_prefill": ("triton_full", "compress_pivotal_torch"),
        "torch_full_plus_pivotal_torch_over_prefill": ("torch_full", "compress_pivotal_torch"),
        "triton_pass2_plus_pivotal_triton_over_prefill": (
            "triton_pass2_given_lse", "compress_pivotal_triton"),
        "triton_full_over_prefill": ("triton_full",),
        "triton_window_over_prefill": ("triton_window",),
        "triton_window_plus_pivotal_triton_over_prefill": (
            "triton_window", "compress_pivotal_triton"),
    }.items():
        times = [x32(key) for key in parts]
        if all(t is not None for t in times):
            ratios[name] = sum(times) / prefill
    record["ratios"] = ratios
    log(f"   L={length} ratios: " + ", ".join(f"{k}={v:.3f}" for k, v in ratios.items()))


def print_table(results: dict) -> None:
    """One column per prompt length: ms for 32 layers, throughput, ratios to the prefill."""
    timings = {k: v for k, v in results["sections"].items() if k.startswith("timings_L")}
    names = sorted(timings, key=lambda k: timings[k].get("length", 0))
    x32 = f"x{NUM_LAYERS}_ms"
    rows = [
        ("triton full scoring", lambda t: t.get("triton_full", {}).get(x32), ".1f"),
        ("  pass 1 (lse)", lambda t: t.get("triton_pass1_lse", {}).get(x32), ".1f"),
        ("  pass 2 given lse", lambda t: t.get("triton_pass2_given_lse", {}).get(x32), ".1f"),
        ("torch full scoring (core)", lambda t: t.get("torch_full", {}).get(x32), ".1f"),
        ("triton window W=32", lambda t: t.get("triton_window", {}).get(x32), ".1f"),
        ("torch window W=32 (core)", lambda t: t.get("torch_window", {}).get(x32), ".1f"),
        ("compress, selection only", lambda t: t.get("compress_none_torch", {}).get(x32), ".1f"),
    ]
    for merge in MERGES:
        for variant in ("torch", "triton"):
            key = f"compress_{merge}_{variant}"
            rows.append((f"compress {merge} ({variant} assign)",
                         lambda t, key=key: t.get(key, {}).get(x32), ".1f"))
    rows += [
        ("prefill, 32 layers, SDPA flash", lambda t: t.get("prefill_ms_32_layers"), ".1f"),
        ("triton full, TFLOP/s executed", lambda t: t.get("triton_full", {}).get("tflops"), ".0f"),
    ]
    for label, ratio in [
        ("(triton full + pivotal triton)/prefill", "triton_full_plus_pivotal_triton_over_prefill"),
        ("(triton full + pivotal torch)/prefill", "triton_full_plus_pivotal_torch_over_prefill"),
        ("(torch full + pivotal torch)/prefill", "torch_full_plus_pivotal_torch_over_prefill"),
        ("(pass 2 only + pivotal triton)/prefill", "triton_pass2_plus_pivotal_triton_over_prefill"),
        ("triton window / prefill", "triton_window_over_prefill"),
    ]:
        rows.append((label, lambda t, ratio=ratio: t.get("ratios", {}).get(ratio), ".3f"))

    print(f"\n{'ms for 32 layers (one layer x32)':<40}" + "".join(f"{n[8:]:>12}" for n in names))
    for label, get, fmt in rows:
        values = [get(timings[n]) for n in names]
        print(f"{label:<40}" + "".join(
            f"{v:>12{fmt}}" if v is not None else f"{'-':>12}" for v in values
        ))
    print("\ncorrectness (Triton vs float64):")
    for name, stats in results["sections"].get("correctness", {}).items():
        if isinstance(stats, dict) and "max_rel" in stats:
            print(f"  {name:<28} max abs {stats['max_abs']:.2e}  max rel {stats['max_rel']:.2e}")
    for section, record in results["sections"].items():
        if not section.startswith("kept_sets_L"):
            continue
        for key, value in record.items():
            if key.endswith("_vs_float64"):
                print(f"  {section[10:]} {key:<40} identical={value['identical']} "
                      f"differing positions={value['positions_differing']}")
            elif key.endswith("_merge_assignment"):
                print(f"  {section[10:]} {key:<40} targets vs core: "
                      f"{value['target_agreement']:.6f}, vs float64: "
                      f"{value['triton_vs_float64_agreement']:.6f} (core float32: "
                      f"{value['core_float32_vs_float64_agreement']:.6f})")
    if results["errors"]:
        print("\nERRORS: " + json.dumps(results["errors"], indent=2))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:  # must precede the first import of triton / the kernels
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    plan = make_plan(args)
    if plan["device"] == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke on a CPU machine", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    recorder = Recorder(args.out, args)
    recorder.results["plan"] = {k: v for k, v in plan.items() if k != "correctness"}
    log(f"writing {args.out}; device {plan['device']}; lengths {plan['lengths']}")

    with recorder.section("env") as record:
        section_env(record, plan)
        record["core_config"] = "not importable"
        record["core_config"] = import_core()
    with recorder.section("correctness") as record:
        section_correctness(record, plan)
    for length in plan["kept_lengths"]:
        with recorder.section(f"kept_sets_L{length}") as record:
            section_kept_sets(record, plan, length)
    model_box: dict = {}
    for length in plan["lengths"]:
        with recorder.section(f"timings_L{length}") as record:
            section_timings(recorder, record, plan, length, args, model_box)
    model_box.clear()
    free_memory()
    recorder.results["total_s"] = round(time.perf_counter() - T0, 1)
    recorder.save()
    print_table(recorder.results)
    log(f"done in {recorder.results['total_s']} s; results in {args.out}")
    return 1 if recorder.results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
