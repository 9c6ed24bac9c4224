"""Decode-step time of one long multimodal request with and without LOOK-M (vLLM-CPU).

The same request (8 images x 576 tokens, ~4.7k prompt tokens) is decoded by one in-process
engine with each config; the per-step decode time is the engine's own first-to-last token time
divided by the decode steps (``RequestOutput.metrics``), measured side by side (arms interleaved,
median of repeats). Two model shapes: the 4-layer tiny fixture
and a wider 8-layer one whose KV reads weigh more per step.

    python -m benchmarks.decode [--quick] [--out results/decode.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from tqdm import tqdm

ARMS = (("none", None), ("lookm-0.2", {"method": "lookm", "budget": 0.2}),
        ("lookm-0.1", {"method": "lookm", "budget": 0.1}))
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

    def run(config):
        params = SamplingParams(temperature=0.0, max_tokens=1 + steps, ignore_eos=True,
                                extra_args={"kv_compression": config} if config else None)
        return llm.generate([request], params, use_tqdm=False)[0]

    run(None)  # warm-up
    per_step = {name: [] for name, _ in ARMS}
    stats = {}
    for _ in tqdm(range(repeats), desc=f"decode {shape}"):
        for name, config in ARMS:
            out = run(config)
            timing = out.metrics  # engine-core timestamps of the first and last token
            per_step[name].append((timing.last_token_ts - timing.first_token_ts) / steps)
            stats[name] = (out.kv_transfer_params or {}).get("kv_compression")
            stats[name + ":prompt_tokens"] = len(out.prompt_token_ids)
    close_vllm(llm)
    base = statistics.median(per_step["none"])
    return {"shape": shape, "model": SHAPES[shape], "steps": steps, "repeats": repeats,
            "arms": {name: {"decode_step_ms": statistics.median(v) * 1e3,
                            "all_ms": [x * 1e3 for x in v],
                            "ratio_to_none": statistics.median(v) / base,
                            "stats": stats[name]} for name, v in per_step.items()},
            "prompt_tokens": stats["none:prompt_tokens"]}


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
                  f"  KV kept {kept}/{run['prompt_tokens']}  blocks freed {freed}")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
