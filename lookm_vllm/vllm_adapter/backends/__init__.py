"""The attention backends LOOK-M wraps: ONE table drives registration (``plugin.register``), the
refusal of other backends (``connector.check_attention_backend``) and the docs.

Each wrapper class is defined at MODULE level, because vLLM names the selected backend by
``cls.__module__ + "." + cls.__qualname__`` and re-imports it by that name on CUDA
(``vllm/platforms/cuda.py``: ``_backend_cls_path`` -> ``resolve_obj_by_qualname``); a class made
inside a function would not import. The CPU platform imports the registered path instead; both
must name the same class (tests/test_vllm_contract.py runs vLLM's CUDA naming on them).

Adding a backend: one module here (builder/impl/backend subclasses with the two mixins of
``attention``), one ``KVLayout`` in ``kv_layout`` if its cache layout is new, one row below.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WrappedBackend:
    """One vLLM attention backend served by LOOK-M."""

    name: str                 # vLLM's AttentionBackendEnum member
    platform: str             # where vLLM uses it: "cpu" or "cuda"
    class_path: str           # the wrapper (its impl names the cache layout), under ``name``


BACKENDS = (
    WrappedBackend("CPU_ATTN", "cpu",
                   "lookm_vllm.vllm_adapter.backends.cpu_attn.LookMCPUAttentionBackend"),
    WrappedBackend("FLASH_ATTN", "cuda",
                   "lookm_vllm.vllm_adapter.backends.flash_attn.LookMFlashAttentionBackend"),
)


def supported_names() -> list[str]:
    return [backend.name for backend in BACKENDS]
