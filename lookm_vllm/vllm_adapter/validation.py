"""Admission-time validation of ``SamplingParams.extra_args["kv_compression"]``.

Hooked onto ``InputProcessor._validate_params`` (vLLM's own per-request check, run in the
front-end process before a request reaches the engine core), so a bad config fails that one
request with an error that is both a ``VLLMValidationError`` (HTTP 400 in the OpenAI server)
and a ``ValueError`` (offline ``LLM``), and never reaches the engine loop.
"""

from __future__ import annotations

import functools

from .options import EXTRA_ARGS_KEY, lookm_enabled, request_config


@functools.cache
def _error_class():
    from vllm.exceptions import VLLMValidationError

    class KVCompressionConfigError(VLLMValidationError, ValueError):
        """An invalid ``kv_compression`` request entry: a ``ValueError`` for offline callers,
        a ``VLLMValidationError`` (HTTP 400) for vLLM's OpenAI server."""

    return KVCompressionConfigError


def validate_extra_args(extra_args: dict | None, enabled: bool) -> None:
    """Raise ``KVCompressionConfigError`` (a ``ValueError`` and a ``VLLMValidationError``) for an
    invalid or unservable ``kv_compression`` entry."""
    error = _error_class()
    if not extra_args or extra_args.get(EXTRA_ARGS_KEY) is None:
        return
    value = extra_args[EXTRA_ARGS_KEY]
    try:
        config = request_config(extra_args, None)
    except (ValueError, TypeError) as exc:
        raise error(f"invalid {EXTRA_ARGS_KEY}: {exc}", parameter=EXTRA_ARGS_KEY,
                    value=value) from None
    if config is not None and config.is_active and not enabled:
        raise error(
            f"{EXTRA_ARGS_KEY} was requested but this engine was not started with LOOK-M "
            "(kv_transfer_config with kv_connector 'LookMConnector')",
            parameter=EXTRA_ARGS_KEY, value=value)


def install_validation_hook() -> None:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor._validate_params
    if getattr(original, "__lookm_hook__", False):
        return

    @functools.wraps(original)
    def validate_params(self, params, supported_tasks):
        result = original(self, params, supported_tasks)
        if isinstance(params, SamplingParams):
            validate_extra_args(params.extra_args, lookm_enabled(self.vllm_config))
        return result

    validate_params.__lookm_hook__ = True
    InputProcessor._validate_params = validate_params
