"""Decode-step time of one long multimodal request with and without LOOK-M (vLLM-CPU).

The same request (8 images x 576 tokens, ~4.7k prompt tokens) is decoded alone by one
in-process engine with each config, stepped by hand (``LLMEngine.step``) and every step timed:
the decode step is the median of the steps after the second token (LOOK-M compresses in the
step that makes the second token, reported apart as ``second_step_ms``), measured side by side
(arms interleaved, median of repeats). Each arm also reports its prefill step and LOOK-M's
scoring + compression time (its own timers) as a share of the uncompressed arm's prefill, and
what a preemption costs: the request is run again, preempted after its 6th token, and the
engine time of its replay (prompt and outputs recomputed; a compressed request is scored and
compressed again) is measured, with whether the greedy tokens match the unpreempted run. Two
model shapes: the 4-layer tiny fixture and a wider 8-layer one whose KV reads weigh more per
step.

    python -m benchmarks.decode [--quick] [--out results/decode.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from tqdm import tqdm

ARMS = (("none", None), ("lookm-0.2", {"method": "lookm", "budget": 0.2}),
        ("lookm-0.1", {"method": "lookm", "budget": 0.1}))
# The preemption measurement preempts the request once it has made this many tokens (compressed
# by then), so its replay recomputes prompt + outputs in one go.
PREEMPT_AT = 6
SHAPES = {
    "tiny": {},
    "wide": {"hidden_size": 512, "num_heads": 8, "num_kv_heads": 8, "num_layers": 8,
             "intermediate_size": 1024},
}


def measure(shape: str, images: int, image_tokens: int, steps: int, repeats: int) -> dict:
    from vllm import LLM, SamplingParams

    from lookm_vllm.demo.images import test_images
    from lookm_vllm.demo.tiny_models import (
        build_tiny_llava,
        chat_prompt,
        close_vllm,
        vllm_engine_kwargs,
    )
    from lookm_vllm.vllm_adapter.options import engine_kwargs

    path = build_tiny_llava(image_tokens, **SHAPES[shape])
    llm = LLM(**vllm_engine_kwargs(path, max_model_len=8192, max_images=images,
                                   kv_cache_gib=2.0, disable_log_stats=False, **engine_kwargs()))
    request = {"prompt": chat_prompt(path, "Describe the pictures.", images),
               "multi_modal_data": {"image": test_images(images)}}

    engine = llm.llm_engine
    runs = iter(range(1 << 30))

    def run(config, max_tokens: int, preempt_at: int | None = None):
        """One request alone, stepped by hand: the engine time spent on each output token
        (token 1: the whole prefill, every chunk of it; token 2: that step, with LOOK-M's
        deferred compression; then one decode step per token), ``times[n]`` for token n+1.
        ``preempt_at``: preempt the request once it made that many tokens
        (``LLM.reset_prefix_cache(reset_running_requests=True)``, vLLM's public way to preempt
        every running request), so ``times[preempt_at]`` is its replay (prompt + outputs
        recomputed; for LOOK-M scored and compressed again) up to the next token."""
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                extra_args={"kv_compression": config} if config else None)
        engine.add_request(f"decode-{next(runs)}", request, params)
        preemptions = preemption_count()
        times, final, pending, preempted = [], None, 0.0, False
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            outputs = engine.step()
            pending += time.perf_counter() - start
            for out in outputs:  # a step that made a token (prefill chunks make none)
                assert len(out.outputs[0].token_ids) == len(times) + 1
                times.append(pending)
                pending = 0.0
                final = out if out.finished else final
            if len(times) == preempt_at and not preempted:
                preempted = llm.reset_prefix_cache(reset_running_requests=True)
                if not preempted:
                    raise RuntimeError("vLLM did not preempt the running request")
        if preemption_count() != preemptions + (preempt_at is not None):
            raise RuntimeError("the request was not preempted as asked")
        return final, times

    def preemption_count() -> float:
        return sum(metric.value for metric in llm.get_metrics()
                   if metric.name == "vllm:num_preemptions")

    run(None, 2 + steps)  # warm-up
    samples = {name: [] for name, _ in ARMS}
    stats = {}
    for _ in tqdm(range(repeats), desc=f"decode {shape}"):
        for name, config in ARMS:
            out, times = run(config, 2 + steps)
            decode = statistics.median(times[2:])
            stats[name] = (out.kv_transfer_params or {}).get("kv_compression")
            stats[name + ":prompt_tokens"] = len(out.prompt_token_ids)
            replayed, replay_times = run(config, PREEMPT_AT + 4, preempt_at=PREEMPT_AT)
            tokens = list(replayed.outputs[0].token_ids)
            samples[name].append({
                "prefill": times[0], "second": times[1], "decode": decode,
                "replay": replay_times[PREEMPT_AT],
                "replay_tokens_match": tokens == list(out.outputs[0].token_ids[:len(tokens)])})
    close_vllm(llm)

    def median(name, key):
        return statistics.median(s[key] for s in samples[name]) * 1e3

    base, base_prefill = median("none", "decode"), median("none", "prefill")
    arms = {}
    for name in samples:
        arm_stats = stats[name] or {}
        overhead = (arm_stats.get("scoring_ms") or 0.0) + (arm_stats.get("compression_ms") or 0.0)
        decode = median(name, "decode")
        arms[name] = {"decode_step_ms": decode,
                      "all_ms": [s["decode"] * 1e3 for s in samples[name]],
                      "ratio_to_none": decode / base,
                      # steps 1 and 2: the prefill (with full scoring) and the step that
                      # compresses, each next to the uncompressed arm's
                      "prefill_ms": median(name, "prefill"),
                      "second_step_ms": median(name, "second"),
                      # LOOK-M's scoring + compression (its timers, last repeat) as a share of
                      # the uncompressed arm's prefill of the same request
                      "overhead_ms": overhead,
                      "overhead_of_prefill": overhead / base_prefill,
                      # preempted after PREEMPT_AT tokens: the replay up to the next token,
                      # next to the uncompressed arm's replay; greedy tokens as without it?
                      "preemption_replay_ms": median(name, "replay"),
                      "replay_vs_none": median(name, "replay") / median("none", "replay"),
                      "replay_tokens_match": all(s["replay_tokens_match"]
                                                 for s in samples[name]),
                      "stats": stats[name]}
    return {"shape": shape, "model": SHAPES[shape], "steps": steps, "repeats": repeats,
            "arms": arms, "prompt_tokens": stats["none:prompt_tokens"],
            "prefill_ms_none": base_prefill}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="results/decode.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if args.quick:
        runs = [measure("tiny", 2, 144, steps=8, repeats=1)]
    else:
        runs = [measure(shape, 8, 576, steps=128, repeats=3) for shape in SHAPES]
    report = {"runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    for run in runs:
        print(f"\n{run['shape']} model {run['model']}, prompt {run['prompt_tokens']} tokens, "
              f"{run['steps']} decode steps, median of {run['repeats']}")
        for name, arm in run["arms"].items():
            kept = (arm["stats"] or {}).get("kv_tokens_kept", run["prompt_tokens"])
            freed = (arm["stats"] or {}).get("kv_blocks_freed", 0)
            print(f"  {name:>10}: {arm['decode_step_ms']:7.2f} ms/step  x{arm['ratio_to_none']:.2f}"
                  f"  KV kept {kept}/{run['prompt_tokens']}  blocks freed {freed}  prefill "
                  f"{arm['prefill_ms']:.0f} ms, 2nd step {arm['second_step_ms']:.0f} ms, "
                  f"scoring + compression {arm['overhead_ms']:.1f} ms"
                  f" = {arm['overhead_of_prefill']:.1%} of the uncompressed prefill; "
                  f"replay after a preemption {arm['preemption_replay_ms']:.0f} ms "
                  f"(x{arm['replay_vs_none']:.2f}), tokens as unpreempted: "
                  f"{arm['replay_tokens_match']}")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
