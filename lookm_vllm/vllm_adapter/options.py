"""The engine option that switches LOOK-M on, in ONE place (CLI, offline LLM, Docker, k8s).

LOOK-M is enabled for an engine by its KV-connector config::

    --kv-transfer-config '{"kv_connector": "LookMConnector", "kv_role": "kv_both",
                           "kv_connector_extra_config": {"default": {...CompressionConfig...}}}'

plus, on CUDA, ``VLLM_USE_V2_MODEL_RUNNER=0`` (the plugin hooks the V1 model runner, the one vLLM
uses on CPU). ``"default"`` is the engine-wide compression config for requests that do not carry
``SamplingParams.extra_args["kv_compression"]``; without it such requests are not compressed.
This module imports no vLLM.
"""

from __future__ import annotations

import json
import os
from typing import Any

from lookm_vllm.core import CompressionConfig

CONNECTOR_NAME = "LookMConnector"
CONNECTOR_MODULE = "lookm_vllm.vllm_adapter.connector"
EXTRA_ARGS_KEY = "kv_compression"
# What the plugin needs in the environment of every vLLM process it runs in.
ENGINE_ENV = {"VLLM_USE_V2_MODEL_RUNNER": "0"}


def kv_transfer_config(default: CompressionConfig | dict | str | None = None) -> dict[str, Any]:
    """The ``kv_transfer_config`` dict enabling LOOK-M, with an optional engine-wide default."""
    extra: dict[str, Any] = {}
    if default is not None:
        extra["default"] = CompressionConfig.parse(default).model_dump(mode="json")
    return {"kv_connector": CONNECTOR_NAME, "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_both", "kv_connector_extra_config": extra}


def engine_kwargs(default: CompressionConfig | dict | str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM(...)`` / ``EngineArgs`` that enable LOOK-M.

    Also puts ``ENGINE_ENV`` into this process's environment (unless already set), which vLLM
    reads when the engine is created: offline users need nothing else.
    """
    for name, value in ENGINE_ENV.items():
        os.environ.setdefault(name, value)
    return {"kv_transfer_config": kv_transfer_config(default)}


def engine_cli_args(default: CompressionConfig | dict | str | None = None) -> list[str]:
    """The same as command-line flags for ``vllm serve`` / ``lookm-serve``."""
    return ["--kv-transfer-config", json.dumps(kv_transfer_config(default))]


def lookm_enabled(vllm_config: Any) -> bool:
    """Whether an engine's config enables LOOK-M (works on any object shaped like VllmConfig)."""
    ktc = getattr(vllm_config, "kv_transfer_config", None)
    return ktc is not None and getattr(ktc, "kv_connector", None) == CONNECTOR_NAME


def default_config(extra_config: dict[str, Any] | None) -> CompressionConfig | None:
    """The engine-wide default compression config from ``kv_connector_extra_config``."""
    raw = (extra_config or {}).get("default")
    return None if raw is None else CompressionConfig.parse(raw)


def request_config(extra_args: dict[str, Any] | None, default: CompressionConfig | None
                   ) -> CompressionConfig | None:
    """A request's compression config: its own ``extra_args`` entry, else the engine default.

    Raises ``ValueError`` (pydantic's, naming the field) for an invalid entry.
    """
    raw = (extra_args or {}).get(EXTRA_ARGS_KEY)
    if raw is None:
        return default
    return CompressionConfig.parse(raw)
