"""Soak: many concurrent multimodal chat requests against a real server; nothing may fail.

One server (``lookm-serve`` with the demo LLaVA, or with ``--stock`` stock vLLM's own OpenAI
server with the same engine arguments and no LOOK-M) on a KV pool small enough to force
preemption; ``--requests`` chat requests from ``--clients`` concurrent clients (asyncio + httpx),
each with 0-8 images drawn from 16 distinct photos, a compression config drawn from a mix
(LOOK-M pivotal / average / window scoring, H2O, SnapKV, ``{"method": "none"}``, no
``kv_compression`` at all), half of them streamed, a share of them hung up early (a streaming
client closes the stream after a few chunks, a non-streaming one gives up after a random delay).
The load opens with a preemption burst (one long request per client at once, half of them
compressed; ``burst_plans``) that needs twice the pool, so preemption is certain, not left to
timing; ``--no-burst`` skips it.

    python -m benchmarks.soak --requests 200 --clients 32            # results/soak.json
    python -m benchmarks.soak --requests 200 --clients 32 --stock    # stock vLLM, same load
    python -m benchmarks.soak --mix uncompressed                     # lookm-serve, no compression
    python -m benchmarks.soak --turns 3 --prefix-caching            # multi-turn chats, APC on

With ``--turns N`` the requests are conversations of 1-N turns: each later turn re-sends the
history (the images, the model's answers) with a new question, streamed or not; only a
conversation's last turn may be hung up. With ``--prefix-caching`` (vLLM's automatic prefix
caching on, as compressed requests can now read it) the soak ends with canaries: uncompressed
chats answered alone before the load are asked again after it, each right after a compressed
(window-scored) request over the same images and question whose cached blocks it reads; their
answers must not change (a compressed request that wrote into a shared or cached block would
change them).

It reports requests ok / aborted (hung up by the client, as planned) / failed (by status code),
preemptions (``vllm:num_preemptions``), KV blocks freed by compression, KV usage and running
requests after a short settle (must be 0), multimodal cache-miss retries (LOOK-M's counter) and
vLLM's cache-miss events (its warning lines), and the server log's error lines (ERROR, CRITICAL,
Traceback). It writes a JSON report and the server log next to it, and exits 1 on any failed
request (any 5xx among them), any leak (KV usage or running/waiting requests not back to 0 after
the settle) or any error line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lookm_vllm.testing.server_process import ServerProcess, free_port, vllm_api_server_cmd

# (name, kv_compression sent with the request; None: no kv_compression field at all)
CONFIGS: tuple[tuple[str, dict | None], ...] = (
    ("lookm-pivotal", {"method": "lookm", "budget": 0.2, "merge": "pivotal"}),
    ("lookm-average", {"method": "lookm", "budget": 0.3, "merge": "average"}),
    ("lookm-window", {"method": "lookm", "budget": 0.2, "scoring": "window"}),
    ("h2o", {"method": "h2o", "budget": 0.3}),
    ("snapkv", {"method": "snapkv", "budget": 0.3}),
    ("method-none", {"method": "none"}),
    ("absent", None),
)
MIXES = {"mixed": [name for name, _ in CONFIGS], "uncompressed": ["absent"]}
QUESTIONS = ("What is in these images?", "Describe the pictures.",
             "Which of the photos is the brightest, and why?", "Say something.",
             "Compare the images one by one and list what they have in common.")
# The same CPU binding for every server: vLLM-CPU reserves one more core for an engine with a KV
# connector, which would give lookm-serve and stock vLLM unequal cores.
SERVER_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
# A stock server loads no vLLM plugin at all (LOOK-M's is inert without its engine option, but
# "stock" means stock): VLLM_PLUGINS names the plugins to load, here none.
STOCK_ENV = {**SERVER_ENV, "VLLM_PLUGINS": ""}
COUNTERS = ("vllm:num_preemptions", "lookm_kv_blocks_freed", "lookm_compressed_requests",
            "lookm_mm_cache_retries", "lookm_mm_cache_retries_exhausted")
GAUGES = ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting")
ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback")
CACHE_MISS_LINE = "Multi-modal cache miss for request"
# vLLM's second race: the API process's shadow entry dropped while a request is being rendered
P0_ASSERTION_LINE = "AssertionError: Expected a cached item"
CANARY_PRIMER = {"method": "lookm", "budget": 0.2, "scoring": "window"}


@dataclass
class Plan:
    """One request of the soak."""

    index: int
    config: str
    images: list[int]
    stream: bool
    hangup: bool
    max_tokens: int
    question: str
    # streaming hang-up: close after this many content chunks; non-streaming: after this delay
    hangup_chunks: int = 0
    hangup_after_s: float = 0.0
    conversation: int = 0
    turn: int = 0               # 0: the first user turn (with the images)


@dataclass
class Outcome:
    index: int
    config: str
    images: int
    stream: bool
    hangup: bool
    outcome: str = "failed"          # ok | aborted | failed
    status: int | str | None = None  # HTTP status (or the stream's error code); str: exception
    error: str | None = None
    seconds: float = 0.0
    completion_tokens: int | None = None
    kv_compression: dict | None = None
    conversation: int = 0
    turn: int = 0
    text: str = ""
    cached_tokens: int | None = None


@dataclass
class Workload:
    requests: int = 200
    clients: int = 32
    distinct_images: int = 16
    max_images: int = 8
    stream_share: float = 0.5
    hangup_share: float = 0.2
    min_tokens: int = 8
    max_tokens: int = 160
    block_size: int = 32
    # KV pool = this many of the largest possible requests (forces preemption under load)
    pool_requests: float = 1.25
    mix: str = "mixed"
    seed: int = 0
    configs: list[str] = field(default_factory=list)
    turns: int = 1              # most turns per conversation
    prefix_caching: bool = False
    canaries: int = 3
    burst: bool = True          # start with the preemption burst (burst_plans)


def make_plans(work: Workload) -> list[Plan]:
    """The requests, drawn from ``work.seed`` (the same seed gives the same soak): conversations
    of 1..``work.turns`` turns (one config and one set of images each), ``work.requests`` turns
    in all; only a conversation's last turn may be hung up."""
    rng = random.Random(work.seed)
    names = work.configs or MIXES[work.mix]
    plans: list[Plan] = []
    conversation = 0
    while len(plans) < work.requests:
        turns = min(rng.randint(1, work.turns), work.requests - len(plans))
        config = rng.choice(names)
        images = rng.sample(range(work.distinct_images), rng.randint(0, work.max_images))
        for turn in range(turns):
            hangup = turn == turns - 1 and rng.random() < work.hangup_share
            plans.append(Plan(
                index=len(plans), config=config, images=images,
                stream=rng.random() < work.stream_share, hangup=hangup,
                max_tokens=rng.randint(work.min_tokens, work.max_tokens),
                question=rng.choice(QUESTIONS),
                hangup_chunks=rng.randint(1, 4) if hangup else 0,
                hangup_after_s=round(rng.uniform(0.05, 1.5), 3) if hangup else 0.0,
                conversation=conversation, turn=turn))
        conversation += 1
    return plans


def conversations(plans: list[Plan]) -> list[list[Plan]]:
    grouped: dict[int, list[Plan]] = {}
    for plan in plans:
        grouped.setdefault(plan.conversation, []).append(plan)
    return list(grouped.values())


def request_body(plan: Plan, model: str, urls: list[str], stock: bool,
                 history: list[dict] | None = None) -> dict:
    """The chat request of one turn; ``history``: the conversation's earlier messages (its
    first user turn holds the images)."""
    if history:
        messages = history + [{"role": "user", "content": plan.question}]
    else:
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": urls[k]}}
                                         for k in plan.images]
        content.append({"type": "text", "text": plan.question})
        messages = [{"role": "user", "content": content}]
    body: dict[str, Any] = {"model": model, "messages": messages,
                            "max_tokens": plan.max_tokens, "temperature": 0.0,
                            "ignore_eos": True, "stream": plan.stream}
    if plan.stream:
        body["stream_options"] = {"include_usage": True}
    config = dict(CONFIGS)[plan.config]
    if config is not None and not stock:
        body["kv_compression"] = config
    return body


def _error_of(data: Any) -> tuple[int | None, str]:
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return None, str(data)[:300]
    return error.get("code"), str(error.get("message"))[:300]


async def _lines(resp) -> Any:
    r"""The event stream's lines, split at "\n" only (httpx's ``aiter_lines`` also splits at
    the Unicode line breaks \x1c-\x1e, \x85, \u2028 and \u2029, which JSON strings in a
    chunk may hold unescaped: the demo model's random text does)."""
    pending = b""
    async for data in resp.aiter_bytes():
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.decode().rstrip("\r")
    if pending:
        yield pending.decode()


async def _stream(client, url: str, body: dict, plan: Plan, out: Outcome) -> None:
    chunks = 0
    async with client.stream("POST", url, json=body) as resp:
        out.status = resp.status_code
        if resp.status_code != 200:
            out.error = _error_of(json.loads(await resp.aread() or b"{}"))[1]
            return
        async for line in _lines(resp):
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out.outcome = "ok" if out.error is None else "failed"
                return
            data = json.loads(line[len("data: "):])
            if "error" in data:  # vLLM's in-stream error event (after a 200)
                out.status, out.error = _error_of(data)
                continue
            if data.get("usage"):
                _read_usage(data["usage"], out)
            if data.get("choices") and data["choices"][0]["delta"].get("content"):
                out.text += data["choices"][0]["delta"]["content"]
                chunks += 1
                if plan.hangup and chunks >= plan.hangup_chunks:
                    out.outcome = "aborted"
                    return  # leaving the block closes the connection mid-stream
    out.error = out.error or "stream ended without [DONE]"


async def _post(client, url: str, body: dict, out: Outcome) -> None:
    resp = await client.post(url, json=body)
    out.status = resp.status_code
    data = resp.json() if resp.content else {}
    if resp.status_code == 200:
        out.outcome = "ok"
        _read_usage(data.get("usage") or {}, out)
        out.text = data["choices"][0]["message"].get("content") or ""
    else:
        out.error = _error_of(data)[1]


def _read_usage(usage: dict, out: Outcome) -> None:
    out.completion_tokens = usage.get("completion_tokens")
    out.kv_compression = usage.get("kv_compression")
    out.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")


async def run_one(client, url: str, model: str, plan: Plan, urls: list[str],
                  stock: bool, history: list[dict] | None = None) -> Outcome:
    out = Outcome(plan.index, plan.config, len(plan.images), plan.stream, plan.hangup,
                  conversation=plan.conversation, turn=plan.turn)
    body = request_body(plan, model, urls, stock, history)
    start = time.monotonic()
    try:
        if plan.stream:
            await _stream(client, url, body, plan, out)
        elif plan.hangup:
            try:
                await asyncio.wait_for(_post(client, url, body, out), plan.hangup_after_s)
            except TimeoutError:
                out.outcome, out.status = "aborted", None
        else:
            await _post(client, url, body, out)
    except Exception as exc:  # a dropped connection, a body that is not JSON, ...
        out.outcome, out.status = "failed", f"exception:{type(exc).__name__}"
        out.error = str(exc)[:300]
    out.seconds = round(time.monotonic() - start, 3)
    return out


async def scrape(client, url: str) -> dict[str, float]:
    """The soak's counters (``_total`` dropped) and gauges from ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (await client.get(url + "/metrics")).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            if name in COUNTERS or name in GAUGES:
                values[name] = values.get(name, 0.0) + sample.value
    return values


async def settle(client, url: str, timeout_s: float) -> tuple[dict[str, float], float]:
    """Wait until no request runs or waits and the KV pool is empty (or the timeout)."""
    start = time.monotonic()
    while True:
        values = await scrape(client, url)
        if all(values.get(g, 0.0) == 0.0 for g in GAUGES):
            break
        if time.monotonic() - start > timeout_s:
            break
        await asyncio.sleep(0.5)
    return values, round(time.monotonic() - start, 2)


async def soak(url: str, plans: list[Plan], work: Workload, urls: list[str], stock: bool,
               settle_s: float, numbers: dict[str, int]) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=work.clients + 4,
                          max_keepalive_connections=work.clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]
        canaries = (await ask_canaries(client, url, model, plans, urls, work, stock)
                    if work.prefix_caching else [])
        before = await scrape(client, url)
        # the burst first: every client at once, so the pool runs out during decode (below)
        burst_plan = burst_plans(work, numbers)
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(
                max_connections=len(burst_plan) + 1)) as burst_client:
            burst = list(await asyncio.gather(*(
                run_one(burst_client, url + "/v1/chat/completions", model, plan, urls, stock)
                for plan in burst_plan)))
        burst_preemptions = ((await scrape(client, url)).get("vllm:num_preemptions", 0.0)
                             - before.get("vllm:num_preemptions", 0.0))
        queue: asyncio.Queue[list[Plan]] = asyncio.Queue()
        for chat in conversations(plans):
            queue.put_nowait(chat)
        outcomes: list[Outcome] = []
        counts = {"ok": 0, "aborted": 0, "failed": 0, "skipped": 0}
        bar = tqdm(total=len(plans), desc="soak", unit="req")

        async def worker() -> None:
            while not queue.empty():
                history: list[dict] = []
                for plan in queue.get_nowait():
                    if history is None:   # an earlier turn failed: the chat ends there
                        out = Outcome(plan.index, plan.config, len(plan.images), plan.stream,
                                      plan.hangup, outcome="skipped",
                                      conversation=plan.conversation, turn=plan.turn)
                    else:
                        out = await run_one(client, url + "/v1/chat/completions", model, plan,
                                            urls, stock, history)
                        if out.outcome == "ok":
                            history = request_body(plan, model, urls, stock, history)[
                                "messages"] + [{"role": "assistant", "content": out.text}]
                        else:
                            history = None
                    outcomes.append(out)
                    counts[out.outcome] += 1
                    bar.set_postfix(counts, refresh=False)
                    bar.update()

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(work.clients)))
        duration = time.monotonic() - start
        bar.close()
        after, settle_seconds = await settle(client, url, settle_s)
        if canaries:
            await recheck_canaries(client, url, model, canaries, urls, stock)
            after, extra = await settle(client, url, settle_s)
            settle_seconds += extra
    counters = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in COUNTERS
                if name in after}
    return {"outcomes": sorted(outcomes, key=lambda o: o.index), "duration_s": duration,
            "counters": counters, "after": {g: after.get(g) for g in GAUGES},
            "settle_s": settle_seconds, "canaries": canaries,
            "burst": {"requests": len(burst), "ok": sum(o.outcome == "ok" for o in burst),
                      "failed": [asdict(o) for o in burst if o.outcome != "ok"],
                      "preemptions": burst_preemptions}}


def burst_plans(work: Workload, numbers: dict[str, int]) -> list[Plan]:
    """The preemption burst: requests sent at once (one per client, more if a request may not
    decode enough), every other one compressed over one image (LOOK-M pivotal), the others
    text only and uncompressed, each decoding enough tokens (``ignore_eos``) that together
    they need twice the pool. Their prompts fit
    the pool together (a text prompt takes one block, a compressed image prompt a few after
    its prefill) but their outputs do not, so vLLM must preempt running requests (compressed
    ones among them: re-prefilled and re-scored) whatever the timing; the random load alone
    may not (one CI run of it saw no preemption)."""
    if not work.burst:
        return []
    names = work.configs or MIXES[work.mix]
    compressed = "lookm-pivotal" if "lookm-pivotal" in names else names[0]
    # (at most half the context: a one-image prompt takes far less than the other half)
    need = 2 * numbers["pool_blocks"] * work.block_size
    tokens = min(math.ceil(need / work.clients), numbers["max_model_len"] // 2)
    plans = []
    for i in range(max(work.clients, math.ceil(need / tokens))):
        image = i % 2 == 1
        plans.append(Plan(index=-1000 - i, config=compressed if image else "absent",
                          images=[i % work.distinct_images] if image else [], stream=False,
                          hangup=False, max_tokens=tokens, question=QUESTIONS[0]))
    return plans


def canary_plans(plans: list[Plan], work: Workload) -> list[Plan]:
    """Uncompressed, non-streamed first turns over the images and questions of the load's
    compressed conversations (so compressed requests read and publish the same blocks)."""
    chosen, seen = [], set()
    for plan in plans:
        key = (tuple(plan.images), plan.question)
        if plan.turn == 0 and plan.images and plan.config != "absent" and key not in seen:
            seen.add(key)
            chosen.append(Plan(index=-1 - len(chosen), config="absent", images=plan.images,
                               stream=False, hangup=False, max_tokens=work.min_tokens + 8,
                               question=plan.question))
        if len(chosen) == work.canaries:
            break
    return chosen


async def ask_canaries(client, url, model, plans, urls, work, stock) -> list[dict[str, Any]]:
    results = []
    for plan in canary_plans(plans, work):
        out = await run_one(client, url + "/v1/chat/completions", model, plan, urls, stock)
        results.append({"plan": asdict(plan), "before": out.text, "before_ok": out.outcome})
    return results


async def recheck_canaries(client, url, model, canaries, urls, stock) -> None:
    """After the load: a compressed (window-scored) primer over the canary's images and
    question, then the canary again; it reads the blocks the primer published and read."""
    chat = url + "/v1/chat/completions"
    for canary in canaries:
        plan = Plan(**canary["plan"])
        body = request_body(plan, model, urls, stock)
        if not stock:
            body["kv_compression"] = CANARY_PRIMER
        primer = Outcome(plan.index, "primer", len(plan.images), False, False)
        await _post(client, chat, body, primer)
        again = await run_one(client, chat, model, plan, urls, stock)
        canary.update(primer_ok=primer.outcome, primer_kv_compression=primer.kv_compression,
                      after=again.text, after_ok=again.outcome,
                      after_cached_tokens=again.cached_tokens,
                      unchanged=again.text == canary["before"])


def scan_log(path: Path) -> dict[str, Any]:
    text = path.read_text(errors="replace") if path.exists() else ""
    lines = text.splitlines()
    return {"error_lines": [line[:500] for line in lines if ERROR_LINE.search(line)],
            "cache_miss_events": sum(CACHE_MISS_LINE in line for line in lines),
            "p0_cache_assertions": sum(P0_ASSERTION_LINE in line for line in lines)}


def model_numbers(work: Workload, path: Path) -> dict[str, int]:
    """The tiny model's KV numbers and the pool that forces preemption under this load."""
    from lookm_vllm.demo.images import test_images
    from lookm_vllm.demo.tiny_models import chat_prompt, load_processor

    config = json.loads((path / "config.json").read_text())
    text = config["text_config"]
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    bytes_per_token = text["num_hidden_layers"] * 2 * text["num_key_value_heads"] * head_dim * 4
    processor = load_processor(path)
    longest = max(QUESTIONS, key=len)
    prompt = chat_prompt(processor, longest, work.max_images)
    max_prompt = processor(text=prompt, images=test_images(work.max_images),
                           return_tensors="pt")["input_ids"].shape[1]
    # later turns re-send earlier answers (re-tokenized random text may take more tokens) and
    # questions
    max_prompt += (work.turns - 1) * (2 * work.max_tokens + 64)
    max_model_len = math.ceil((max_prompt + work.max_tokens) / work.block_size) * work.block_size
    pool_blocks = math.ceil(work.pool_requests * max_model_len / work.block_size)
    return {"image_tokens": config.get("image_seq_length", 0), "kv_bytes_per_token":
            bytes_per_token, "max_prompt_tokens": max_prompt, "max_model_len": max_model_len,
            "pool_blocks": pool_blocks,
            "pool_bytes": pool_blocks * work.block_size * bytes_per_token}


def server_cmd(path: Path, work: Workload, numbers: dict[str, int], port: int,
               stock: bool) -> list[str]:
    from lookm_vllm.demo.tiny_models import vllm_server_args

    args = vllm_server_args(path, max_images=work.max_images,
                            max_model_len=numbers["max_model_len"], block_size=work.block_size,
                            kv_cache_gib=numbers["pool_bytes"] / (1 << 30),
                            prefix_caching=work.prefix_caching)
    args += ["--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log"]
    if work.prefix_caching:   # usage.prompt_tokens_details.cached_tokens
        args.append("--enable-prompt-tokens-details")
    if stock:
        return vllm_api_server_cmd(args)
    return [sys.executable, "-m", "lookm_vllm.server", *args]


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    failed: dict[str, int] = {}
    for out in outcomes:
        if out.outcome == "failed":
            failed[str(out.status)] = failed.get(str(out.status), 0) + 1
    compressed = [o for o in outcomes if o.kv_compression]
    return {"requests": len(outcomes),
            "ok": sum(o.outcome == "ok" for o in outcomes),
            "aborted": sum(o.outcome == "aborted" for o in outcomes),
            "failed": sum(o.outcome == "failed" for o in outcomes),
            "failed_by_status": failed,
            "streamed": sum(o.stream for o in outcomes),
            "hangups_planned": sum(o.hangup for o in outcomes),
            "images_sent": sum(o.images for o in outcomes),
            "compressed_ok": len(compressed),
            "skipped": sum(o.outcome == "skipped" for o in outcomes),
            "conversations": len({o.conversation for o in outcomes}),
            "later_turns": sum(o.turn > 0 for o in outcomes),
            "later_turns_cached_tokens": sum(o.cached_tokens or 0 for o in outcomes
                                             if o.turn > 0),
            "prefix_reused_tokens": sum((o.kv_compression or {}).get("prefix_reused_tokens", 0)
                                        for o in outcomes)}


def verdict(report: dict[str, Any]) -> list[str]:
    """Why the soak failed (empty: it passed)."""
    problems = []
    summary = report["summary"]
    if summary["failed"]:
        problems.append(f"{summary['failed']} failed requests: {summary['failed_by_status']}")
    if report["burst"]["failed"]:
        problems.append(f"{len(report['burst']['failed'])} burst requests failed")
    after = report["after_settle"]
    if any(after.get(g) != 0.0 for g in GAUGES):
        problems.append(f"leak: after a {report['settle_s']} s settle {after}")
    if report["log"]["error_lines"]:
        problems.append(f"{len(report['log']['error_lines'])} error lines in the server log")
    for canary in report.get("canaries", []):
        if not canary.get("unchanged") or canary.get("after_ok") != "ok" \
                or canary.get("before_ok") != "ok" or canary.get("primer_ok") != "ok":
            problems.append(f"canary {canary['plan']['index']} changed or failed: {canary}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--stock", action="store_true",
                        help="stock vLLM's server (no LOOK-M), requests without kv_compression")
    parser.add_argument("--mix", choices=sorted(MIXES), default="mixed",
                        help="compression configs drawn from (uncompressed: no kv_compression)")
    parser.add_argument("--hangup-share", type=float, default=0.2)
    parser.add_argument("--stream-share", type=float, default=0.5)
    parser.add_argument("--pool-requests", type=float, default=Workload.pool_requests,
                        help="KV pool size in largest requests (small: forces preemption)")
    parser.add_argument("--max-tokens", type=int, default=Workload.max_tokens,
                        help="most output tokens per request (drawn from 8..this)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--turns", type=int, default=1,
                        help="most turns per conversation (later turns re-send the history)")
    parser.add_argument("--prefix-caching", action="store_true",
                        help="vLLM's automatic prefix caching on; canaries check cached blocks")
    parser.add_argument("--no-burst", action="store_true",
                        help="skip the opening preemption burst (one request per client)")
    parser.add_argument("--settle", type=float, default=30.0,
                        help="seconds to wait for KV usage and running requests to reach 0")
    parser.add_argument("--out", default="results/soak.json")
    args = parser.parse_args(argv)
    work = Workload(requests=args.requests, clients=args.clients, mix=args.mix, seed=args.seed,
                    hangup_share=args.hangup_share, stream_share=args.stream_share,
                    pool_requests=args.pool_requests, max_tokens=args.max_tokens,
                    turns=args.turns, prefix_caching=args.prefix_caching,
                    burst=not args.no_burst)
    from lookm_vllm.demo.images import image_to_data_url, test_images
    from lookm_vllm.demo.tiny_models import build_tiny_llava

    path = build_tiny_llava()
    numbers = model_numbers(work, path)
    urls = [image_to_data_url(img, "JPEG") for img in test_images(work.distinct_images)]
    plans = make_plans(work)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".log")
    server_name = "stock vLLM" if args.stock else "lookm-serve"
    print(f"soak: {server_name}, {work.requests} requests from {work.clients} clients, mix "
          f"{'uncompressed (stock)' if args.stock else work.mix}, seed {work.seed}; KV pool "
          f"{numbers['pool_blocks']} blocks of {work.block_size} ({work.pool_requests:g} x the "
          f"largest request, {numbers['max_prompt_tokens']} prompt tokens); log {log_path}")
    port = free_port()
    server = ServerProcess(server_cmd(path, work, numbers, port, args.stock), port,
                           env=STOCK_ENV if args.stock else SERVER_ENV, log_path=log_path)
    server.start()
    try:
        result = asyncio.run(soak(server.url, plans, work, urls, args.stock, args.settle,
                                 numbers))
        log = scan_log(log_path)
    finally:
        server.stop()
    outcomes = result["outcomes"]
    report = {"server": server_name, "command": server.cmd[1:],
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "workload": asdict(work), "model": numbers, "duration_s": result["duration_s"],
              "summary": summarize(outcomes), "counters": result["counters"],
              "after_settle": result["after"], "settle_s": result["settle_s"], "log": log,
              "canaries": result["canaries"], "burst": result["burst"],
              "requests": [asdict(o) for o in outcomes]}
    report["problems"] = verdict(report)
    report["passed"] = not report["problems"]
    out.write_text(json.dumps(report, indent=1))
    print_report(report)
    print(f"wrote {out} and {log_path}")
    return 0 if report["passed"] else 1


def print_report(report: dict[str, Any]) -> None:
    s, c = report["summary"], report["counters"]
    print(f"\n{report['server']}: {s['requests']} requests in {report['duration_s']:.1f} s: "
          f"{s['ok']} ok, {s['aborted']} aborted (hung up), {s['failed']} failed "
          f"{s['failed_by_status'] or ''}")
    b = report["burst"]
    print(f"  preemption burst: {b['ok']}/{b['requests']} ok, {b['preemptions']:.0f} preemptions")
    print(f"  preemptions {c.get('vllm:num_preemptions', 0):.0f}, KV blocks freed by "
          f"compression {c.get('lookm_kv_blocks_freed', 0):.0f} "
          f"({c.get('lookm_compressed_requests', 0):.0f} compressed requests)")
    print(f"  {s['conversations']} conversations, {s['later_turns']} later turns (cached prompt "
          f"tokens {s['later_turns_cached_tokens']}, LOOK-M prefix_reused_tokens "
          f"{s['prefix_reused_tokens']}), {s['skipped']} turns skipped after a failed one")
    for canary in report.get("canaries", []):
        print(f"  canary {canary['plan']['index']}: "
              f"{'unchanged' if canary.get('unchanged') else 'CHANGED'} after the load "
              f"(read {canary.get('after_cached_tokens')} cached prompt tokens)")
    retries = c.get("lookm_mm_cache_retries")
    print(f"  multimodal cache misses (vLLM warnings) {report['log']['cache_miss_events']}, "
          f"render assertions {report['log']['p0_cache_assertions']}, "
          f"retries {'n/a' if retries is None else f'{retries:.0f}'}, exhausted "
          f"{c.get('lookm_mm_cache_retries_exhausted', 'n/a')}")
    print(f"  after a {report['settle_s']} s settle: {report['after_settle']}")
    print(f"  error lines in the server log: {len(report['log']['error_lines'])}")
    for line in report["log"]["error_lines"][:10]:
        print(f"    {line}")
    print("PASSED" if report["passed"] else "FAILED: " + "; ".join(report["problems"]))


if __name__ == "__main__":
    sys.exit(main())
