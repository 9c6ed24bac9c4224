"""Multi-turn image chat with prefix caching: time to first token of turns 1-3, stock vLLM vs
lookm-serve (LOOK-M with window scoring, and with full scoring), side by side in one run.

Each conversation sends ``--images`` distinct photos and a question, then re-sends the whole
history (the images, the model's answer as the assistant turn) with a new question, as a chat
client does; ``--max-tokens`` output tokens per turn, greedy, streamed (TTFT = the first chunk;
the time to the second token is reported too, since LOOK-M compresses in the step after the first
token: its cost shows there).
Both servers run at once with the same CPU binding (``VLLM_CPU_NUM_OF_RESERVED_CPU=1``), one
request at a time, the arms' conversations interleaved, ``--think-s`` seconds before each turn
(without it, one arm's turn-1 TTFTs were 5x those of the same requests sent to its server
alone, probably the other server's threads still busy on the shared cores after its answer).
Every arm gets its own photos (no arm hits another arm's blocks), and a warm-up conversation that
is not measured. Prefix caching is on in both servers; vLLM's
``usage.prompt_tokens_details.cached_tokens`` (``--enable-prompt-tokens-details``) says how many
prompt tokens each turn read from the cache.

    python -m benchmarks.prefix_ttft                     # results/prefix_ttft.json

Target (window scoring): turns 2-3 within 1.2x of stock's TTFT (median over conversations).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmarks.soak import SERVER_ENV, STOCK_ENV
from lookm_vllm.testing.server_process import ServerProcess, free_port, vllm_api_server_cmd

QUESTIONS = ("What is in these pictures?", "Which of them is the brightest, and why?",
             "Now describe the last two pictures in one sentence each.")
WINDOW = {"method": "lookm", "budget": 0.2, "merge": "pivotal", "scoring": "window"}
FULL = {"method": "lookm", "budget": 0.2, "merge": "pivotal", "scoring": "full"}
TARGET = 1.2


def conversation(client, url: str, model: str, images: list[str], turns: int, max_tokens: int,
                 kv_compression: dict | None, think_s: float = 0.0) -> list[dict[str, Any]]:
    """One chat, turn by turn, ``think_s`` seconds before each turn (a user reading); per turn:
    TTFT, total time, cached prompt tokens, prompt tokens, and LOOK-M's compression usage."""
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}}
                                     for u in images]
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": content + [{"type": "text", "text": QUESTIONS[0]}]}]
    results = []
    for turn in range(turns):
        if turn:
            messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens,
                                "temperature": 0.0, "ignore_eos": True, "stream": True,
                                "stream_options": {"include_usage": True}}
        if kv_compression is not None:
            body["kv_compression"] = kv_compression
        time.sleep(think_s)
        text, usage, ttft, token_times = [], {}, None, []
        start = time.perf_counter()
        with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[len("data: "):])
                if data.get("choices"):
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    piece = data["choices"][0]["delta"].get("content") or ""
                    if piece:
                        token_times.append(time.perf_counter() - start)
                    text.append(piece)
                if data.get("usage"):
                    usage = data["usage"]
        total = time.perf_counter() - start
        messages.append({"role": "assistant", "content": "".join(text)})
        details = usage.get("prompt_tokens_details") or {}
        second = round(token_times[1], 4) if len(token_times) > 1 else None
        results.append({"turn": turn + 1, "ttft_s": round(ttft, 4), "second_token_s": second,
                        "total_s": round(total, 4),
                        "prompt_tokens": usage.get("prompt_tokens"),
                        "cached_tokens": details.get("cached_tokens"),
                        "kv_compression": usage.get("kv_compression")})
    return results


def interleaved(servers: dict[str, ServerProcess], arms: list[tuple[str, str, dict | None]],
                urls: list[str], args) -> dict[str, list]:
    """Every arm's conversations, interleaved (conversation c of every arm, then c + 1, ...) so
    that load from elsewhere on a shared machine falls on all arms alike. ``arms``: (name,
    server, kv_compression). Each arm first has one unmeasured warm-up conversation."""
    import httpx

    out: dict[str, list] = {name: [] for name, _, _ in arms}
    with httpx.Client(timeout=httpx.Timeout(600.0)) as client:
        models = {key: client.get(s.url + "/v1/models").json()["data"][0]["id"]
                  for key, s in servers.items()}
        for position, (_, key, config) in enumerate(arms):
            conversation(client, servers[key].url, models[key],
                         urls[args.images * position:args.images * (position + 1)],
                         args.turns, args.max_tokens, config)
        for c in tqdm(range(args.conversations), desc="conversations", unit="conv"):
            for position, (name, key, config) in enumerate(arms):
                # distinct photos per arm and conversation: no arm reads another's blocks
                first = args.images * (len(arms) * (1 + c) + position)
                out[name].append(conversation(
                    client, servers[key].url, models[key], urls[first:first + args.images],
                    args.turns, args.max_tokens, config, args.think_s))
    for name, chats in out.items():
        print(f"  {name}: " + ", ".join(
            f"turn {t + 1} {statistics.median(c[t]['ttft_s'] for c in chats):.3f} s"
            for t in range(args.turns)))
    return out


def summarize(chats: list[list[dict]], turns: int) -> list[dict[str, Any]]:
    rows = []
    for t in range(turns):
        ttfts = [c[t]["ttft_s"] for c in chats]
        cached = [c[t]["cached_tokens"] for c in chats]
        usage = [c[t]["kv_compression"] or {} for c in chats]
        seconds = [c[t]["second_token_s"] for c in chats]
        rows.append({"turn": t + 1, "ttft_median_s": round(statistics.median(ttfts), 4),
                     "ttft_min_s": min(ttfts), "ttft_max_s": max(ttfts),
                     "second_token_median_s": (round(statistics.median(seconds), 4)
                                               if None not in seconds else None),
                     "total_median_s": round(statistics.median(c[t]["total_s"]
                                                               for c in chats), 4),
                     "prompt_tokens": statistics.median(c[t]["prompt_tokens"] for c in chats),
                     "cached_tokens_median": (statistics.median(cached)
                                              if None not in cached else None),
                     "kv_blocks_freed_median": statistics.median(
                         u.get("kv_blocks_freed", 0) for u in usage),
                     "prefix_reused_tokens_median": statistics.median(
                         u.get("prefix_reused_tokens", 0) for u in usage)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--think-s", type=float, default=0.5,
                        help="pause before each turn: a user reading, and time for the other "
                             "server's CPU threads to go idle (both share the cores)")
    parser.add_argument("--out", default="results/prefix_ttft.json")
    args = parser.parse_args(argv)

    from lookm_vllm.demo.images import image_to_data_url, test_images
    from lookm_vllm.demo.tiny_models import build_tiny_llava, vllm_server_args

    path = build_tiny_llava()
    # lookm_off: lookm-serve without compression, the plugin's own cost (connector, server)
    arms = [("stock", "stock", None), ("lookm_off", "lookm", None),
            ("lookm_window", "lookm", WINDOW), ("lookm_full", "lookm", FULL)]
    needed = args.images * len(arms) * (1 + args.conversations)
    urls = [image_to_data_url(img, "JPEG") for img in test_images(needed)]
    server_args = vllm_server_args(path, max_images=args.images, prefix_caching=True)
    server_args += ["--host", "127.0.0.1", "--disable-uvicorn-access-log",
                    "--enable-prompt-tokens-details"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"prefix_ttft: {args.conversations} conversations x {args.turns} turns, "
          f"{args.images} images, {args.max_tokens} output tokens, prefix caching on; "
          "stock vLLM and lookm-serve side by side, conversations interleaved")
    commands = {"stock": (vllm_api_server_cmd(server_args), STOCK_ENV),
                "lookm": ([sys.executable, "-m", "lookm_vllm.server", *server_args], SERVER_ENV)}
    servers = {}
    for key, (cmd, env) in commands.items():
        port = free_port()
        servers[key] = ServerProcess(cmd + ["--port", str(port)], port, env=env,
                                     log_path=out.with_suffix(f".{key}.log")).launch()
    try:
        for server in servers.values():
            server.wait_ready()
        chats = interleaved(servers, arms, urls, args)
    finally:
        for server in servers.values():
            server.stop()
    table = {name: summarize(c, args.turns) for name, c in chats.items()}
    ratios = {name: [round(row["ttft_median_s"] / base["ttft_median_s"], 3)
                     for row, base in zip(rows, table["stock"], strict=True)]
              for name, rows in table.items() if name != "stock"}
    later = ratios["lookm_window"][1:]
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "settings": vars(args), "model": str(path),
              "thread_binding": {"stock_env": STOCK_ENV, "lookm_env": SERVER_ENV},
              "configs": {"lookm_window": WINDOW, "lookm_full": FULL},
              "server_args": server_args, "summary": table, "ttft_ratio_to_stock": ratios,
              "target": f"window scoring, turns 2-{args.turns}: TTFT <= {TARGET}x stock",
              "target_met": all(r <= TARGET for r in later), "conversations": chats}
    out.write_text(json.dumps(report, indent=1))

    print(f"\nmedian TTFT (s) over {args.conversations} conversations; cached = prompt tokens "
          "read from the prefix cache (median)")
    header = f"{'turn':>4} | " + " | ".join(f"{name:>22}" for name in table)
    print(header + "\n" + "-" * len(header))
    for t in range(args.turns):
        cells = []
        for name, rows in table.items():
            row = rows[t]
            ratio = "" if name == "stock" else f" {ratios[name][t]:.2f}x"
            cells.append(f"{row['ttft_median_s']:.3f}{ratio} c{row['cached_tokens_median']}"
                         .rjust(22))
        print(f"{t + 1:>4} | " + " | ".join(cells))
    print("\nmedian time to the SECOND output token (s): LOOK-M compresses in the step after "
          "the first token, so its cost shows here, not in the TTFT")
    for t in range(args.turns):
        print(f"{t + 1:>4} | " + " | ".join(
            f"{rows[t]['second_token_median_s']}".rjust(22) for rows in table.values()))
    verdict = "MET" if report["target_met"] else "MISSED"
    print(f"\ntarget {report['target']}: {verdict} ({later})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
