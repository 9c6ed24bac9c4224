"""Pass/fail check of the CUDA path: the Triton kernels and the vLLM adapter's torch code.

Self-contained: torch (and Triton when present), no vLLM, no pytest, no downloads; imports
``lookm_vllm`` from this checkout. Meant for a borrowed GPU, run once by ``scripts/gpu_check.sh``.

    python benchmarks/gpu_adapter_check.py --out results/gpu/gpu_adapter_check.json   # GPU
    python benchmarks/gpu_adapter_check.py --cpu-smoke --out smoke.json   # CPU: code path only

Sections (each gets a status ``ok`` / ``failed`` / ``skipped``; a failing case is recorded and the
run goes on; the JSON is rewritten after every case, so a killed run keeps what it checked):

``env``
    Versions, the GPU, whether the core dispatches to Triton, how the config was provided.
``adapter_bfloat16``, ``adapter_float16``
    ``WorkerState.process_layer`` on a paged cache in vLLM FlashAttention's layout (logical
    ``[num_blocks, Hkv, block_size, 2 d]``), then ``WorkerState.compress_deferred`` as the
    request's next step does (compression is deferred past the first token, except in a
    replay), run on the device and on CPU from bit-identical
    inputs in the same dtype, for five configs and three modes (below); the two runs must agree.
``triton``
    ``triton_accumulated_attention`` vs a float64 torch reference (MHA, GQA 32/8, head_dim 128
    and 80, bf16 and fp16, an observation window, two prefill chunks accumulated through
    ``out``) and ``triton_cosine_argmax`` vs float64 ``assign_to_kept``. Skipped on CPU.

Adapter modes: ``one_shot`` (block-position-major physical strides, i.e. a ``[num_blocks,
block_size, Hkv, 2 d]`` allocation viewed ``.transpose(1, 2)``; the whole prompt in one step),
``two_chunks`` (contiguous cache; the prompt in two steps, the cache filled step by step, behind
another request's rows in the batch) and ``replay`` (a preempted request recomputing prompt and
outputs in one step: the rows past the prompt are re-attended on the compressed cache).

Pass criteria of an adapter run (device vs CPU; see ``compare_runs``):

* holes and kept count identical, every layer compressed, blocks of other requests untouched;
* cache entries outside the live (kept) slots bit-identical;
* kept position sets: differing positions at most ``MAX_TIE_FRACTION`` of the kept rows (float
  ties in the scores may flip a boundary token: CUDA scores come from Triton, CPU from torch);
* kept rows, compared by (head, position), within ``2 eps`` relative and ``eps`` absolute of the
  dtype; with ``merge="none"`` and identical kept sets they must be bit-identical (they are
  copies), otherwise at most ``MAX_TIE_FRACTION`` of them may differ (a near-tie in the merge's
  cosine argmax sends an evicted token to another kept token);
* without a merge, every kept row equals the original KV of its position, on each device;
* replay: output rows past the prompt within the same tolerance; prompt rows not touched.

Exit status: 0 when every check passed, 1 when one failed, 2 without CUDA (and no --cpu-smoke).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import itertools
import json
import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from benchmarks.gpu_scoring import (  # noqa: E402
    error_stats,
    free_memory,
    import_core,
    log,
    random_qk,
    reference_scores,
    section_env,
)

# Triton vs float64: the bounds of tests/test_triton_scoring.py at realistic sizes.
SCORE_RTOL, SCORE_ATOL = 1e-4, 1e-5
SUM_RTOL = 1e-5                       # every (query head, query) row distributes a weight of 1
COSINE_RTOL, COSINE_ATOL = 1e-5, 1e-6
COSINE_TIE = 1e-5                     # a target may differ from float64's only within this cosine
# Adapter, device vs CPU: at most this fraction of the kept rows may differ (float ties).
MAX_TIE_FRACTION = 0.005
REQ_ID = "req-0"
START = time.perf_counter()
NEIGHBOUR_TOKENS = 3                  # decode rows of another request ahead of ours in a batch

CONFIGS = {
    "lookm_full_pivotal": {"method": "lookm", "scoring": "full", "merge": "pivotal"},
    "lookm_window_average": {"method": "lookm", "scoring": "window", "merge": "average"},
    "h2o": {"method": "h2o", "merge": "none"},
    "snapkv": {"method": "snapkv", "merge": "none"},
    "h2o_weighted": {"method": "h2o", "merge": "weighted"},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/gpu/gpu_adapter_check.json"))
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny sizes, CPU against CPU, Triton skipped: the code path only")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Plan: every size in one place.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterShape:
    """One request's sizes. ``chunk`` splits the prompt in mode ``two_chunks``; ``replay``
    output tokens follow the prompt in mode ``replay``."""

    hq: int
    hkv: int
    head_dim: int
    block_size: int
    prompt_len: int
    image_spans: tuple[tuple[int, int], ...]
    chunk: int
    replay: int
    num_layers: int = 2
    spare_blocks: int = 3             # free blocks holding stale data


@dataclass(frozen=True)
class Mode:
    physical: str                     # "nhd": [blocks, block_size, Hkv, 2d] memory; "hnd": logical
    two_chunks: bool
    replay: bool
    row: int                          # our row of the block table (the other is a neighbour's)
    batch_offset: int                 # query rows of the neighbour ahead of ours


MODES = {
    "one_shot": Mode("nhd", two_chunks=False, replay=False, row=0, batch_offset=0),
    "two_chunks": Mode("hnd", two_chunks=True, replay=False, row=1, batch_offset=NEIGHBOUR_TOKENS),
    "replay": Mode("nhd", two_chunks=False, replay=True, row=1, batch_offset=NEIGHBOUR_TOKENS),
}

# Image spans: three LLaVA-sized images (576 tokens) between text, not block aligned; the last
# image reaches into the recent window (the last 10 % of the prompt).
GPU_SHAPES = {
    "bfloat16": AdapterShape(32, 8, 128, 16, 2000, ((37, 613), (650, 1226), (1260, 1836)),
                             chunk=1003, replay=5),
    "float16": AdapterShape(16, 4, 80, 16, 1500, ((20, 596), (610, 1186), (1200, 1376)),
                            chunk=777, replay=5),
}
SMOKE_SHAPES = {
    "bfloat16": AdapterShape(4, 2, 32, 4, 100, ((6, 30), (34, 58), (63, 93)), chunk=51, replay=3),
    "float16": AdapterShape(4, 1, 16, 8, 150, ((5, 61), (70, 118), (122, 146)), chunk=70,
                            replay=3),
}


def _triton_case(name, hq, hkv, d, length, lq, dtype, seed=0):
    return {"name": name, "hq": hq, "hkv": hkv, "d": d, "length": length, "lq": lq,
            "dtype": dtype, "seed": seed}


TRITON_SCORE_CASES = [
    _triton_case("mha32_bf16_d128_L1024", 32, 32, 128, 1024, 1024, "bfloat16"),
    _triton_case("gqa32x8_bf16_d128_L2048", 32, 8, 128, 2048, 2048, "bfloat16", seed=1),
    _triton_case("gqa8x2_fp16_d80_L777", 8, 2, 80, 777, 777, "float16", seed=2),
    _triton_case("window32_gqa32x8_bf16_L2048", 32, 8, 128, 2048, 32, "bfloat16", seed=3),
]
# Two prefill chunks accumulated through ``out`` (a strided view of the final-size buffer).
TRITON_CHUNK_CASES = [
    {**_triton_case("chunks_gqa32x8_bf16_d128_L1500", 32, 8, 128, 1500, 1500, "bfloat16", 4),
     "bounds": [0, 700, 1500]},
    {**_triton_case("chunks_gqa8x2_fp16_d80_L777", 8, 2, 80, 777, 777, "float16", 5),
     "bounds": [0, 300, 777]},
]
TRITON_COSINE_CASES = [
    {"name": "cosine_bf16_d128", "heads": 8, "kept": 400, "evicted": 1200, "d": 128,
     "dtype": "bfloat16", "groups": False},
    {"name": "cosine_fp16_d80_groups", "heads": 4, "kept": 300, "evicted": 700, "d": 80,
     "dtype": "float16", "groups": True},
]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


class Report:
    """The JSON report: one record per section with a status; failures listed at the top."""

    def __init__(self, path: Path, args: argparse.Namespace) -> None:
        self.path = path
        self.current = ""
        self.data = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "ok": None,
            "failures": [],
            "criteria": {
                "scores": f"|triton - float64| <= {SCORE_ATOL} + {SCORE_RTOL} |float64|, "
                          f"sum within {SUM_RTOL} relative",
                "cosine": f"valid equal; a target differing from float64's only within "
                          f"{COSINE_TIE} cosine; similarity within {COSINE_ATOL} + "
                          f"{COSINE_RTOL} |.|",
                "adapter": "device vs CPU, same inputs and dtype: holes and kept count equal, "
                           "non-live cache bit-identical, kept rows within 2 eps rel + eps abs, "
                           f"at most {MAX_TIE_FRACTION} of kept positions / rows differing "
                           "(float ties), none without a merge",
            },
            "sections": {},
        }
        self.save()

    @contextlib.contextmanager
    def section(self, name: str):
        """Run a section; an exception fails it, the run goes on."""
        log(f"== {name}")
        self.current = name
        record = self.data["sections"].setdefault(name, {"status": "running"})
        start = time.perf_counter()
        try:
            yield record
        except Exception as exc:  # noqa: BLE001 - recorded and reported, the run goes on
            self.fail(record, "error", f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
        finally:
            if record["status"] == "running":
                record["status"] = "failed" if record.get("failures") else "ok"
            record["section_s"] = round(time.perf_counter() - start, 2)
            log(f"   {name}: {record['status']}")
            free_memory()
            self.save()

    @contextlib.contextmanager
    def case(self, record: dict, name: str):
        """One case of a section: an exception fails the case, the section goes on. Saved
        after every case: a run killed by its timeout keeps the cases it finished."""
        case_record = record.setdefault("cases", {}).setdefault(name, {})
        try:
            yield case_record
        except Exception as exc:  # noqa: BLE001 - recorded and reported, the run goes on
            self.fail(record, name, f"{type(exc).__name__}: {exc}")
            case_record["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            free_memory()
        finally:
            self.save()

    def require(self, record: dict, name: str, ok: bool, message: str) -> bool:
        if not ok:
            self.fail(record, name, message)
        return ok

    def fail(self, record: dict, name: str, message: str) -> None:
        record.setdefault("failures", []).append(f"{name}: {message}")
        self.data["failures"].append(f"{self.current}/{name}: {message}")
        log(f"!! {self.current}/{name}: {message}")

    @staticmethod
    def skip(record: dict, reason: str) -> None:
        record.update(status="skipped", reason=reason)
        log(f"   skipped: {reason}")

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)


# --------------------------------------------------------------------------------------------
# Section: Triton kernels vs float64
# --------------------------------------------------------------------------------------------


def section_triton(report: Report, record: dict, device: str) -> None:
    from lookm_vllm import kernels

    if device != "cuda":
        report.skip(record, "CPU run (--cpu-smoke): the kernels are checked on a GPU only")
        return
    if not kernels.cuda_kernels_usable(torch.zeros(1, device=device)):
        report.skip(record, f"Triton kernels unusable here (Triton installed: "
                            f"{kernels.TRITON_AVAILABLE}, capability "
                            f"{torch.cuda.get_device_capability()})")
        return
    for case in TRITON_SCORE_CASES:
        with report.case(record, case["name"]) as stats:
            queries, keys = _case_qk(case, device)
            start = time.perf_counter()
            scores = kernels.triton_accumulated_attention(queries, keys)
            torch.cuda.synchronize()
            stats["first_call_s"] = round(time.perf_counter() - start, 2)  # compile + autotune
            _check_scores(report, record, case["name"], stats, scores,
                          reference_scores(queries, keys), case["hq"] * case["lq"])
    for case in TRITON_CHUNK_CASES:
        with report.case(record, case["name"]) as stats:
            queries, keys = _case_qk(case, device)
            buffer = torch.zeros(case["hkv"], case["length"], device=device)
            for start, end in itertools.pairwise(case["bounds"]):
                # Chunk c sees the keys so far; out is a view of the final-size buffer.
                out = kernels.triton_accumulated_attention(queries[:, start:end], keys[:, :end],
                                                           start, out=buffer[:, :end])
                report.require(record, case["name"], out.data_ptr() == buffer.data_ptr(),
                               "out was not written in place")
            stats["bounds"] = case["bounds"]
            _check_scores(report, record, case["name"], stats, buffer,
                          reference_scores(queries, keys), case["hq"] * case["lq"])
    for case in TRITON_COSINE_CASES:
        with report.case(record, case["name"]) as stats:
            _check_cosine(report, record, case, stats, device)


def _case_qk(case: dict, device: str) -> tuple[Tensor, Tensor]:
    return random_qk(case["hq"], case["hkv"], case["d"], case["length"], case["lq"],
                     getattr(torch, case["dtype"]), device, seed=case["seed"])


def _check_scores(report, record, name, stats, scores, reference, expected_sum) -> None:
    stats.update(error_stats(scores, reference))
    close = bool(torch.allclose(scores.double(), reference, rtol=SCORE_RTOL, atol=SCORE_ATOL))
    sum_error = abs(stats["sum"] - expected_sum) / expected_sum
    stats.update(within_tolerance=close, sum_rel_error=sum_error)
    report.require(record, name, close, f"scores off float64 by up to {stats['max_abs']:.3g} "
                                        f"(rel {stats['max_rel']:.3g})")
    report.require(record, name, sum_error <= SUM_RTOL, f"scores sum off by {sum_error:.3g}")
    log(f"   {name}: max abs {stats['max_abs']:.2e}, max rel {stats['max_rel']:.2e}")


def _check_cosine(report, record, case, stats, device) -> None:
    from lookm_vllm.core import assign_to_kept
    from lookm_vllm.kernels import triton_cosine_argmax

    name, heads, d = case["name"], case["heads"], case["d"]
    gen = torch.Generator(device=device).manual_seed(7)
    kept = torch.randn(heads, case["kept"], d, generator=gen, device=device)
    evicted = torch.randn(heads, case["evicted"], d, generator=gen, device=device)
    dtype = getattr(torch, case["dtype"])
    kept, evicted = kept.to(dtype), evicted.to(dtype)
    kept_group = evicted_group = None
    if case["groups"]:  # modalities; kept group -1 receives nothing; group 7 has no target
        kept_group = torch.randint(-1, 2, kept.shape[:2], generator=gen, device=device)
        evicted_group = torch.randint(0, 2, evicted.shape[:2], generator=gen, device=device)
        evicted_group[1, :4] = 7
    target, similarity, valid = triton_cosine_argmax(kept, evicted, kept_group, evicted_group)
    if case["groups"]:
        kept_group, evicted_group = kept_group.cpu(), evicted_group.cpu()
    # float64 on CPU: the core's torch path (its Triton dispatch never takes float64 anyway).
    expected = assign_to_kept(kept.double().cpu(), evicted.double().cpu(), kept_group,
                              evicted_group)
    target, similarity, valid = target.cpu(), similarity.double().cpu(), valid.cpu()
    # The float64 cosine of the kernel's own choice: a differing target is a near-tie or a bug.
    kept_unit = torch.nn.functional.normalize(kept.double().cpu(), dim=-1)
    evicted_unit = torch.nn.functional.normalize(evicted.double().cpu(), dim=-1)
    chosen = (evicted_unit * kept_unit.gather(1, target[..., None].expand(-1, -1, d))).sum(-1)
    differs = (target != expected.target) & valid
    loss = (expected.similarity - chosen)[differs]
    sim_error = (similarity - chosen)[valid].abs()
    stats.update(
        valid_equal=bool(torch.equal(valid, expected.valid)),
        targets_differing=int(differs.sum()),
        max_cosine_loss_where_differing=float(loss.max()) if loss.numel() else 0.0,
        max_similarity_abs_error=float(sim_error.max()) if sim_error.numel() else 0.0,
    )
    report.require(record, name, stats["valid_equal"], "valid mask differs from float64")
    loss = stats["max_cosine_loss_where_differing"]
    report.require(record, name, loss <= COSINE_TIE,
                   f"a target is worse than float64's by {loss:.3g} cosine")
    sim_ok = bool((sim_error <= COSINE_ATOL + COSINE_RTOL * chosen[valid].abs()).all())
    report.require(record, name, sim_ok,
                   f"similarity off by up to {stats['max_similarity_abs_error']:.3g}")
    log(f"   {name}: {stats}")


# --------------------------------------------------------------------------------------------
# Section: the adapter's torch code, device vs CPU
# --------------------------------------------------------------------------------------------


@dataclass
class RequestInputs:
    """Everything one adapter run reads, on CPU in the cache dtype (bit-identical on both runs).

    ``queries`` are ``[T, Hq, d]`` (``T`` = prompt plus replayed outputs), ``keys`` / ``values``
    ``[Hkv, T, d]``, ``caches`` the PHYSICAL per-layer cache tensors holding stale data,
    ``block_table`` int32 ``[2, max_blocks]`` (our row and a neighbour's).
    """

    shape: AdapterShape
    mode: Mode
    plan: object                      # RequestPlan
    queries: list[Tensor]
    keys: list[Tensor]
    values: list[Tensor]
    neighbour_queries: Tensor
    caches: list[Tensor]
    block_table: Tensor
    scale: float

    @property
    def num_tokens(self) -> int:
        return self.shape.prompt_len + (self.shape.replay if self.mode.replay else 0)

    @property
    def block_row(self) -> Tensor:
        return self.block_table[self.mode.row]

    def steps(self) -> list[tuple[int, int]]:
        if self.mode.two_chunks:
            return [(0, self.shape.chunk), (self.shape.chunk, self.shape.prompt_len)]
        return [(0, self.num_tokens)]


@dataclass
class RunResult:
    """What one adapter run left behind, on CPU; caches are LOGICAL ``[nb, Hkv, bs, 2d]``."""

    caches: list[Tensor]
    holes: list[int] | None
    num_kept: int
    kept: list[Tensor | None]         # per layer [Hkv, K] kept positions (Compaction.kept)
    slots: list[Tensor | None]        # per layer [Hkv, K] logical slots they live in
    outputs: list[Tensor]             # per layer [T, Hq * d]: the output rows of our tokens
    untouched: bool                   # blocks outside our block-table row kept their bytes
    seconds: float


def make_inputs(shape: AdapterShape, mode: Mode, dtype: torch.dtype, config: dict,
                seed: int = 0) -> RequestInputs:
    """Random keys (sharing a direction, so attention is peaked), values, queries and a paged
    cache whose blocks are a random permutation, filled with stale data."""
    from lookm_vllm.core import CompressionConfig
    from lookm_vllm.vllm_adapter.plan import RequestPlan

    gen = torch.Generator().manual_seed(seed)
    d, bs = shape.head_dim, shape.block_size
    total = shape.prompt_len + (shape.replay if mode.replay else 0)
    direction = torch.randn(d, generator=gen)
    queries, keys, values, caches = [], [], [], []
    needed = -(-total // bs)
    num_blocks = needed + 2 + shape.spare_blocks
    for _ in range(shape.num_layers):
        k = torch.randn(shape.hkv, total, d, generator=gen)
        k += torch.randn(shape.hkv, total, 1, generator=gen) * direction
        keys.append(k.to(dtype))
        values.append(torch.randn(shape.hkv, total, d, generator=gen).to(dtype))
        q = torch.randn(total, shape.hq, d, generator=gen) + 0.5 * direction
        queries.append(q.to(dtype))
        physical = ((num_blocks, shape.hkv, bs, 2 * d) if mode.physical == "hnd"
                    else (num_blocks, bs, shape.hkv, 2 * d))
        caches.append(torch.randn(physical, generator=gen).to(dtype))
    permutation = torch.randperm(num_blocks, generator=gen)
    ours, neighbour = permutation[:needed], permutation[needed:needed + 2]
    block_table = torch.zeros(2, needed + 2, dtype=torch.int32)  # vLLM pads rows with 0
    block_table[mode.row, :needed] = ours.to(torch.int32)
    block_table[1 - mode.row, :2] = neighbour.to(torch.int32)
    plan = RequestPlan(config=CompressionConfig(**config), prompt_len=shape.prompt_len,
                       image_spans=shape.image_spans)
    neighbour_queries = torch.randn(mode.batch_offset, shape.hq, d, generator=gen).to(dtype)
    return RequestInputs(shape, mode, plan, queries, keys, values, neighbour_queries, caches,
                         block_table, 1.0 / math.sqrt(d))


def logical_view(physical: Tensor, mode: Mode) -> Tensor:
    """The ``[num_blocks, Hkv, block_size, 2d]`` view FlashAttention's backend hands over."""
    return physical if mode.physical == "hnd" else physical.transpose(1, 2)


def write_kv(cache: Tensor, keys: Tensor, values: Tensor, block_row: Tensor, start: int,
             end: int) -> None:
    """What vLLM's ``reshape_and_cache`` does for positions ``[start, end)`` of one request."""
    block_size = cache.shape[2]
    positions = torch.arange(start, end, device=cache.device)
    blocks = block_row.to(cache.device, torch.long)[positions // block_size]
    entries = torch.cat([keys[:, start:end], values[:, start:end]], dim=-1)  # [Hkv, n, 2d]
    cache[blocks, :, positions % block_size] = entries.transpose(0, 1).to(cache.device)


@contextlib.contextmanager
def recorded_compactions(calls: list):
    """Record every ``Compaction`` the worker computes: it keeps only the holes and the kept
    count, and the check needs each layer's kept positions and slots.

    Wraps the public ``compaction.compact_prompt`` wherever a ``lookm_vllm`` module bound it by
    name, so the check does not depend on which module of the adapter calls it.
    """
    compaction = importlib.import_module("lookm_vllm.vllm_adapter.compaction")
    original = compaction.compact_prompt

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(result)
        return result

    holders = [module for name, module in list(sys.modules.items())
               if name.startswith("lookm_vllm.") and module is not None
               and getattr(module, "compact_prompt", None) is original]
    for module in holders:
        module.compact_prompt = recording
    try:
        yield
    finally:
        for module in holders:
            module.compact_prompt = original


def run_request(inputs: RequestInputs, device: str) -> RunResult:
    """Feed one request through ``WorkerState`` as vLLM's FlashAttention backend would."""
    from lookm_vllm.vllm_adapter.kv_layout import FlashAttnLayout
    from lookm_vllm.vllm_adapter.worker_state import RowWork, WorkerState

    shape, mode = inputs.shape, inputs.mode
    start_time = time.perf_counter()
    state = WorkerState()
    state.apply({REQ_ID: inputs.plan.to_dict()}, [])
    caches = [logical_view(c.to(device), mode) for c in inputs.caches]
    block_table = inputs.block_table.to(device)
    outputs = [[] for _ in caches]
    calls: list = []
    with recorded_compactions(calls):
        for start, end in inputs.steps():
            for layer, cache in enumerate(caches):  # each layer writes its KV, then attends
                write_kv(cache, inputs.keys[layer], inputs.values[layer], inputs.block_row,
                         start, end)
                query = torch.cat([inputs.neighbour_queries, inputs.queries[layer][start:end]])
                query = query.to(device)
                output = torch.zeros(query.shape[0], shape.hq * shape.head_dim,
                                     dtype=query.dtype, device=device)
                work = [RowWork(REQ_ID, row=mode.row, token_start=mode.batch_offset,
                                position_start=start, num_tokens=end - start)]
                state.process_layer(f"model.layers.{layer}.self_attn.attn", work, query, output,
                                    cache, block_table, FlashAttnLayout(), inputs.scale)
                outputs[layer].append(output[mode.batch_offset:].cpu())
        if state.requests[REQ_ID].deferred:
            # The request's next (decode) step: each layer is compressed before its attention.
            work = [RowWork(REQ_ID, row=mode.row, token_start=mode.batch_offset,
                            position_start=inputs.num_tokens, num_tokens=1)]
            for layer, cache in enumerate(caches):
                state.compress_deferred(f"model.layers.{layer}.self_attn.attn", work, cache,
                                        block_table, FlashAttnLayout(), inputs.scale)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start_time
    request = state.requests[REQ_ID]
    cpu_caches = [c.cpu() for c in caches]
    if len(calls) != len(caches) and request.holes:
        raise RuntimeError(f"recorded {len(calls)} compactions for {len(caches)} layers: the "
                           "adapter no longer calls compaction.compact_prompt by name "
                           "(see recorded_compactions)")
    other = torch.ones(cpu_caches[0].shape[0], dtype=torch.bool)
    other[inputs.block_row[:-(-inputs.num_tokens // shape.block_size)].long()] = False
    untouched = all(torch.equal(after[other], logical_view(before, mode)[other])
                    for after, before in zip(cpu_caches, inputs.caches, strict=True))
    return RunResult(
        caches=cpu_caches, holes=request.holes, num_kept=request.num_kept,
        kept=[None if c.kept is None else c.kept.cpu() for c in calls],
        slots=[None if c.slots is None else c.slots.cpu() for c in calls],
        outputs=[torch.cat(parts) for parts in outputs], untouched=untouched, seconds=seconds,
    )  # fmt: skip


def _tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol): two units in the last place relative, one absolute."""
    eps = torch.finfo(dtype).eps
    return 2 * eps, eps


def _slot_index(block_row: Tensor, slots: Tensor, block_size: int, heads: Tensor | None = None):
    """(block, head, offset) index into a logical cache of the logical ``slots`` of one request:
    per head ``[Hkv, K]``, or any shape with the matching ``heads``."""
    if heads is None:
        heads = torch.arange(slots.shape[0])[:, None].expand_as(slots)
    return block_row.long()[slots // block_size], heads, slots % block_size


def _position_slots(kept: Tensor, slots: Tensor, prompt_len: int) -> Tensor:
    """int64 ``[Hkv, P]``: the slot each kept position lives in, -1 where not kept."""
    table = torch.full((kept.shape[0], prompt_len), -1, dtype=torch.long)
    return table.scatter_(1, kept, slots)


def compare_layer(test: Tensor, reference: Tensor, test_kept, test_slots, ref_kept, ref_slots,
                  block_row: Tensor, prompt_len: int, merged: bool) -> dict:
    """Compare one layer's cache after compression, device (``test``) vs CPU (``reference``).

    Kept rows are compared by (head, position): a flipped boundary token shifts the packed
    slots of the later kept tokens of its head, so a slot-wise comparison would blame them too.
    Returns a dict with ``problems`` (empty when the layer passes) and the statistics.
    """
    rtol, atol = _tolerance(reference.dtype)
    block_size = reference.shape[2]
    problems = []
    if (test_kept is None) != (ref_kept is None):
        return {"problems": ["one run compressed the layer, the other did not"]}
    live = torch.zeros(reference.shape[:3], dtype=torch.bool)
    if ref_kept is not None:
        for slots in (test_slots, ref_slots):
            live[_slot_index(block_row, slots, block_size)] = True
    # Outside the live slots (holes, stale tails, other requests) nothing may differ at all.
    outside = (test != reference).any(-1) & ~live
    stats = {"non_live_rows_differing": int(outside.sum())}
    if stats["non_live_rows_differing"]:
        problems.append(f"{stats['non_live_rows_differing']} rows outside the kept slots differ")
    if ref_kept is None:
        return {**stats, "problems": problems}

    test_map = _position_slots(test_kept, test_slots, prompt_len)
    ref_map = _position_slots(ref_kept, ref_slots, prompt_len)
    num_rows = ref_kept.numel()
    allowed = math.floor(MAX_TIE_FRACTION * num_rows)
    kept_differing = int(((test_map >= 0) & (ref_map < 0)).sum())
    heads, positions = ((test_map >= 0) & (ref_map >= 0)).nonzero(as_tuple=True)
    test_rows = test[_slot_index(block_row, test_map[heads, positions], block_size, heads)]
    ref_rows = reference[_slot_index(block_row, ref_map[heads, positions], block_size, heads)]
    test_rows, ref_rows = test_rows.double(), ref_rows.double()
    difference = (test_rows - ref_rows).abs()
    bad_rows = int((difference > atol + rtol * ref_rows.abs()).any(-1).sum())
    stats.update(
        kept_rows=num_rows,
        kept_positions_identical=kept_differing == 0,
        kept_positions_differing=kept_differing,
        max_abs_diff=float(difference.max()) if difference.numel() else 0.0,
        rows_out_of_tolerance=bad_rows,
        rows_not_bit_identical=int((difference > 0).any(-1).sum()),
        allowed_differing=allowed,
    )
    if kept_differing > allowed:
        problems.append(f"{kept_differing} kept positions differ (> {allowed} allowed for ties)")
    # Without a merge the kept rows are copies: only a flipped kept set could change a row.
    rows_allowed = allowed if merged or kept_differing else 0
    if bad_rows > rows_allowed:
        problems.append(f"{bad_rows} kept rows out of tolerance (> {rows_allowed} allowed)")
    return {**stats, "problems": problems}


def copies_exact(result: RunResult, inputs: RequestInputs, layer: int) -> bool:
    """Without a merge every kept row must be the original KV of its position, bit for bit."""
    kept, slots = result.kept[layer], result.slots[layer]
    if kept is None:
        return True
    index = _slot_index(inputs.block_row, slots, inputs.shape.block_size)
    original = torch.cat([inputs.keys[layer], inputs.values[layer]], dim=-1)  # [Hkv, T, 2d]
    expected = original.gather(1, kept[..., None].expand(-1, -1, original.shape[-1]))
    return torch.equal(result.caches[layer][index], expected)


def compare_runs(test: RunResult, reference: RunResult, inputs: RequestInputs) -> dict:
    """Device run vs CPU run of the same inputs (see the module docstring for the criteria).

    Returns a JSON-able dict; ``ok`` says whether the run passes, ``problems`` why not.
    """
    shape = inputs.shape
    merged = inputs.plan.config.merge != "none"
    problems = []
    record = {"holes": len(reference.holes or []), "num_kept": reference.num_kept,
              "prompt_len": shape.prompt_len}
    if test.holes != reference.holes:
        problems.append(f"holes differ: {test.holes} vs CPU {reference.holes}")
    if test.num_kept != reference.num_kept:
        problems.append(f"kept count {test.num_kept} vs CPU {reference.num_kept}")
    if not reference.holes:
        problems.append("nothing was compressed: the inputs test nothing")
    for name, result in (("device", test), ("cpu", reference)):
        if not result.untouched:
            problems.append(f"{name} run wrote to blocks of no prompt position of the request")
        if not merged and not all(copies_exact(result, inputs, i)
                                  for i in range(len(result.caches))):
            problems.append(f"{name} run: a kept row is not its position's original KV")
    layers = []
    for i, (test_cache, ref_cache) in enumerate(zip(test.caches, reference.caches, strict=True)):
        layer = compare_layer(test_cache, ref_cache, *_layer_compaction(test, i),
                              *_layer_compaction(reference, i), inputs.block_row,
                              shape.prompt_len, merged)
        problems += [f"layer {i}: {p}" for p in layer.pop("problems")]
        layers.append(layer)
    record["layers"] = layers
    if inputs.mode.replay:
        record["replay"] = _compare_replay(test, reference, shape, problems)
    record["ok"] = not problems
    record["problems"] = problems
    return record


def _layer_compaction(result: RunResult, layer: int) -> tuple[Tensor | None, Tensor | None]:
    """(kept, slots) of a layer; None when the layer was not compressed."""
    if layer >= len(result.kept):
        return None, None
    return result.kept[layer], result.slots[layer]


def _compare_replay(test: RunResult, reference: RunResult, shape: AdapterShape,
                    problems: list) -> dict:
    """Rows past the prompt are re-attended on the compressed cache; prompt rows untouched."""
    prompt = shape.prompt_len
    rtol, atol = _tolerance(reference.outputs[0].dtype)
    stats = {"max_abs_diff": 0.0, "rows_out_of_tolerance": 0}
    for layer, (out, ref) in enumerate(zip(test.outputs, reference.outputs, strict=True)):
        if out[:prompt].any() or ref[:prompt].any():
            problems.append(f"layer {layer}: output rows of prompt tokens were written")
        if not ref[prompt:].any():
            problems.append(f"layer {layer}: replayed rows were not recomputed")
        difference = (out[prompt:].double() - ref[prompt:].double()).abs()
        bad = (difference > atol + rtol * ref[prompt:].double().abs()).any(-1)
        stats["max_abs_diff"] = max(stats["max_abs_diff"], float(difference.max()))
        stats["rows_out_of_tolerance"] += int(bad.sum())
    if stats["rows_out_of_tolerance"]:
        problems.append(f"{stats['rows_out_of_tolerance']} replayed output rows out of tolerance")
    return stats


def section_adapter(report: Report, record: dict, device: str, dtype_name: str,
                    shape: AdapterShape) -> None:
    dtype = getattr(torch, dtype_name)
    rtol, atol = _tolerance(dtype)
    record.update(device=device, reference="cpu", shape=dataclasses.asdict(shape),
                  tolerance={"rtol": rtol, "atol": atol, "max_tie_fraction": MAX_TIE_FRACTION})
    for (config_name, config), (mode_name, mode) in itertools.product(CONFIGS.items(),
                                                                      MODES.items()):
        name = f"{config_name}/{mode_name}"
        with report.case(record, name) as case:
            inputs = make_inputs(shape, mode, dtype, config)
            test = run_request(inputs, device)
            reference = run_request(inputs, "cpu")
            case.update(compare_runs(test, reference, inputs))
            case.update(device_s=round(test.seconds, 3), cpu_s=round(reference.seconds, 3))
            for problem in case["problems"]:
                report.fail(record, name, problem)
            layer0 = case["layers"][0]
            log(f"   {dtype_name} {name}: {case['holes']} holes, kept {case['num_kept']}/"
                f"{shape.prompt_len}, kept positions differing "
                f"{layer0.get('kept_positions_differing')}, max |diff| "
                f"{layer0.get('max_abs_diff')}, {'ok' if case['ok'] else 'FAILED'} "
                f"({case['device_s']} s {device}, {case['cpu_s']} s cpu)")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke on a CPU machine", file=sys.stderr)
        return 2
    report = Report(args.out, args)
    shapes = SMOKE_SHAPES if args.cpu_smoke else GPU_SHAPES
    log(f"writing {args.out}; device {device} against cpu")
    with report.section("env") as record:
        # First: where pydantic is missing (the bare GPU image) it installs a stand-in config
        # before anything imports lookm_vllm.core.
        record["core_config"] = import_core()
        section_env(record, {"device": device})
        from lookm_vllm.kernels import triton_dispatch

        record["core_dispatches_to_triton"] = {
            name: triton_dispatch(torch.zeros(1, device=device, dtype=getattr(torch, name)))
            for name in shapes
        }
    # The adapter first: it is what only this check covers (gpu_scoring.py measures the
    # kernels' errors too), so a run cut short by its timeout still has it.
    for dtype_name, shape in shapes.items():
        with report.section(f"adapter_{dtype_name}") as record:
            section_adapter(report, record, device, dtype_name, shape)
    with report.section("triton") as record:
        section_triton(report, record, device)
    report.data["ok"] = not report.data["failures"]
    report.data["total_s"] = round(time.perf_counter() - START, 1)
    report.save()
    statuses = ", ".join(f"{k}: {v['status']}" for k, v in report.data["sections"].items())
    log(f"{'PASSED' if report.data['ok'] else 'FAILED'} in {report.data['total_s']} s "
        f"({statuses}); results in {args.out}")
    for failure in report.data["failures"]:
        print(f"  FAILED {failure}")
    return 0 if report.data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
