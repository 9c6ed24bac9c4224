"""Entry point of the ``vllm.general_plugins`` group, run in every vLLM process.

Registration is unconditional and inert: the connector name, attention-backend wrappers that are
exact pass-throughs unless the engine's ``kv_transfer_config`` names ``LookMConnector``, a runner
hook that records each step's request order, and admission-time validation of
``extra_args["kv_compression"]``. Nothing changes stock behaviour until the
engine option of ``options.py`` is set.
"""

from __future__ import annotations

import functools

from .backends import BACKENDS
from .options import CONNECTOR_MODULE, CONNECTOR_NAME
from .validation import install_validation_hook
from .worker_state import STATE

_registered = False


def _install_runner_hook() -> None:
    """Record the batch's request order before vLLM builds attention metadata.

    Attention metadata rows follow ``input_batch.req_ids``; ``GPUModelRunner`` (the V1 runner,
    also the base of ``CPUModelRunner``) builds them in ``_build_attention_metadata``.
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._build_attention_metadata
    if getattr(original, "__lookm_hook__", False):
        return

    @functools.wraps(original)
    def build_attention_metadata(self, *args, **kwargs):
        if STATE.active:
            STATE.step_req_ids = list(self.input_batch.req_ids)
        return original(self, *args, **kwargs)

    build_attention_metadata.__lookm_hook__ = True
    GPUModelRunner._build_attention_metadata = build_attention_metadata


def register() -> None:
    """Register LOOK-M with vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, "LookMConnector")
    platform = ("cpu" if current_platform.is_cpu()
                else "cuda" if current_platform.is_cuda() else None)
    for backend in BACKENDS:
        if backend.platform == platform:
            register_backend(AttentionBackendEnum[backend.name], backend.class_path)
    _install_runner_hook()
    install_validation_hook()
