"""The offline vLLM engine behind the harness: one ``vllm.LLM`` with LOOK-M enabled.

The engine is started with LOOK-M's connector and no engine-wide default, so each request's
``SamplingParams.extra_args["kv_compression"]`` alone decides its compression (the full-cache
cell sends ``{"method": "none"}``). Prefix caching is off by default: every request prefills its
own prompt, so no request reads another's (compressed or not) cached blocks.

vLLM keeps process-global state: build at most one :class:`VllmBackend` per process (the CLI
runs one per invocation).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lookm_vllm.vllm_adapter.options import ENGINE_ENV, EXTRA_ARGS_KEY, engine_kwargs

from .runner import Generation, Request

# ``tiny-llava``, ``tiny-llava:64`` (tokens per image), ``tiny-qwen2vl``: the repository's tiny
# random-weight models, built on the spot (for tests; their answers mean nothing). ``demo``: the
# trained demo model shipped in lookm_vllm/demo/shapes_llava (answers lookm_vllm.demo.shapes).
TINY_MODELS = ("tiny-llava", "tiny-qwen2vl", "demo")


def resolve_model(model: str) -> tuple[str, dict[str, Any]]:
    """A model path (tiny aliases built here) and the engine kwargs that suit it.

    Real models get ``{"model": path, "enable_prefix_caching": False}``; tiny ones the tested
    vLLM-CPU settings of :func:`lookm_vllm.demo.tiny_models.vllm_engine_kwargs`.
    """
    name, _, arg = model.partition(":")
    if name not in TINY_MODELS:
        return model, {"model": model, "enable_prefix_caching": False}
    from lookm_vllm.demo import tiny_models

    if name == "demo":
        from lookm_vllm.demo.trained import demo_model_path

        path = demo_model_path()
    elif name == "tiny-llava":
        path = tiny_models.build_tiny_llava(int(arg) if arg else 144)
    else:
        path = tiny_models.build_tiny_qwen2vl()
    return str(path), tiny_models.vllm_engine_kwargs(path)


class VllmBackend:
    """Greedy generation with ``vllm.LLM.generate``; compression per request.

    Parameters
    ----------
    kwargs : dict
        ``vllm.LLM`` keyword arguments (LOOK-M's connector is added here). Must not carry its
        own ``kv_transfer_config``.
    """

    def __init__(self, kwargs: dict[str, Any]) -> None:
        if "kv_transfer_config" in kwargs:
            raise ValueError("the harness sets kv_transfer_config itself (LOOK-M's connector)")
        for key, value in ENGINE_ENV.items():
            os.environ.setdefault(key, value)
        from vllm import LLM

        self.llm = LLM(**kwargs, **engine_kwargs())

    def generate(self, requests: Sequence[Request], compression: dict[str, Any],
                 max_tokens: int) -> list[Generation]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                extra_args={EXTRA_ARGS_KEY: compression})
        prompts = [{"prompt": r.prompt, "multi_modal_data": {"image": [_load(p)
                                                                        for p in r.images]}}
                   if r.images else {"prompt": r.prompt} for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [Generation(text=o.outputs[0].text, token_ids=list(o.outputs[0].token_ids),
                           prompt_tokens=len(o.prompt_token_ids or ()),
                           kv_compression=(o.kv_transfer_params or {}).get(EXTRA_ARGS_KEY))
                for o in outputs]

    def close(self) -> None:
        from lookm_vllm.demo.tiny_models import close_vllm

        close_vllm(self.llm)


def _load(path: Path):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")
