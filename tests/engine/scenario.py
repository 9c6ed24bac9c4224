"""Run one vLLM-CPU engine scenario in a fresh process and write its outputs as JSON.

vLLM keeps process-global state (distributed groups, plugins), so each engine configuration runs
in its own process: ``python -m tests.engine.scenario SPEC.json OUT.json``. The spec::

    {"model": "llava" | "qwen2vl" | ..., "image_tokens": 144, "lookm": true,
     "default": {...} | null,
     "flash_on_cpu": false (serve attention through the FLASH_ATTN wrappers, engine/flash_on_cpu),
     "engine": {...vllm_engine_kwargs overrides...}, "env": {...},
     "batches": [[{"images": [first, count], "videos": [[photo, frames], ...] (after the images),
                   "question": str, "suffix": str (appended to the prompt),
                   "max_tokens": 16,
                   "kv_compression": {...} | null, "n": 1, "temperature": 0.0,
                   "seed": null}, ...], ...]}

Each batch is one ``LLM.generate`` call (requests in a batch run concurrently). Outputs: token ids,
prompt length and ``kv_transfer_params`` per request, and engine metrics after each batch.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Engine metrics recorded after each batch (cumulative counters / current gauges).
METRICS = ("vllm:kv_cache_usage_perc", "vllm:num_preemptions", "vllm:prefix_cache_hits",
           "vllm:prefix_cache_queries")


def build_model(spec: dict) -> str:
    from lookm_vllm.demo import tiny_models

    if spec["model"] == "llava":
        return str(tiny_models.build_tiny_llava(spec.get("image_tokens", 144)))
    if spec["model"] == "demo":   # the trained demo model shipped in the package
        from lookm_vllm.demo.trained import demo_model_path

        return str(demo_model_path())
    return str(getattr(tiny_models, f"build_tiny_{spec['model']}")())


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    os.environ.update(spec.get("env", {}))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from lookm_vllm.demo.images import test_images
    from lookm_vllm.demo.tiny_models import chat_prompt, vllm_engine_kwargs
    from lookm_vllm.demo.videos import test_video, video_metadata
    from lookm_vllm.vllm_adapter.options import engine_kwargs

    path = build_model(spec)
    if spec.get("flash_on_cpu"):
        from tests.engine import flash_on_cpu

        flash_on_cpu.install()
    engine = dict(spec.get("engine", {}))
    if any(req.get("videos") for batch in spec["batches"] for req in batch):
        engine.setdefault("limit_mm_per_prompt", {"image": 8, "video": 2})
    kwargs = vllm_engine_kwargs(path, disable_log_stats=False, **engine)
    if spec.get("lookm", True):
        kwargs.update(engine_kwargs(spec.get("default")))
    llm = LLM(**kwargs)
    photos = test_images(64)
    results, metrics = [], []
    for batch in spec["batches"]:
        prompts, params = [], []
        for req in batch:
            first, count = req.get("images", [0, 2])
            videos = [test_video(index, frames) for index, frames in req.get("videos", ())]
            prompt = chat_prompt(path, req.get("question", "What is in these pictures?"), count,
                                 num_videos=len(videos))
            prompt += req.get("suffix", "")   # e.g. an answer and a next user turn
            media = {"image": photos[first:first + count]} if count else {}
            if videos:
                media["video"] = [(frames, video_metadata(frames)) for frames in videos]
            prompts.append({"prompt": prompt, "multi_modal_data": media})
            extra = ({"kv_compression": req["kv_compression"]}
                     if req.get("kv_compression") is not None else None)
            params.append(SamplingParams(temperature=req.get("temperature", 0.0),
                                         seed=req.get("seed"), n=req.get("n", 1),
                                         max_tokens=req.get("max_tokens", 16),
                                         ignore_eos=True, extra_args=extra))
        outputs = llm.generate(prompts, params, use_tqdm=False)
        results.append([{"request_id": o.request_id,
                         "token_ids": list(o.outputs[0].token_ids),
                         "all_token_ids": [list(c.token_ids) for c in o.outputs],
                         "prompt_token_ids": list(o.prompt_token_ids),
                         "kv_transfer_params": o.kv_transfer_params} for o in outputs])
        metrics.append({m.name: m.value for m in llm.get_metrics() if m.name in METRICS})
    report = {"batches": results, "metrics": metrics}
    if spec.get("flash_on_cpu"):
        report["flash_calls"] = dict(flash_on_cpu.CALLS)
    with open(out_path, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
