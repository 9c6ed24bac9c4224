"""Contract tests: every vLLM name the server layer (``server/``) relies on, checked against the
installed vLLM, so an upgrade that moves or changes one fails here first."""

from __future__ import annotations

import inspect
import json
from argparse import Namespace

import pytest

vllm = pytest.importorskip("vllm")


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


@pytest.fixture(scope="module")
def parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


def test_cli_entry_points():
    """cli.main mirrors vllm.entrypoints.launchers.api_server.entry.main."""
    from vllm.entrypoints.launchers.api_server import entry
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    assert inspect.iscoroutinefunction(entry.run_server)
    assert params(entry.run_server) == ["args", "uvicorn_kwargs"]
    source = inspect.getsource(entry.main)
    for name in ("cli_env_setup()", "make_arg_parser(", "configure_logging_from_args(args)",
                 "validate_parsed_serve_args(args)", "run_server(args)"):
        assert name in source
    assert params(validate_parsed_serve_args) == ["args"]
    assert params(cli_env_setup) == []
    assert params(configure_logging_from_args) == ["args"]


def test_parser_flags_the_cli_sets(parser):
    """Defaults layered with ``parse_args(argv, namespace=...)``; the flags lookm-serve writes."""
    assert "namespace" in params(type(parser).parse_args)
    ktc = json.dumps({"kv_connector": "X", "kv_role": "kv_both"})
    base = parser.parse_args(["--model", "m", "--block-size", "64", "--middleware", "a.B",
                              "--kv-transfer-config", ktc])
    args = parser.parse_args(["--block-size", "96", "--middleware", "c.D", "--api-key", "k",
                              "--allowed-media-domains", "a.com", "b.org",
                              "--limit-mm-per-prompt", '{"image": 2}'], namespace=base)
    assert args.model == "m" and args.block_size == 96
    assert args.middleware == ["a.B", "c.D"]
    assert args.kv_transfer_config.kv_connector == "X"
    assert args.api_key == ["k"]
    assert args.allowed_media_domains == ["a.com", "b.org"]
    assert args.limit_mm_per_prompt == {"image": 2}
    assert hasattr(args, "model_tag") and hasattr(args, "host") and args.port == 8000
    assert args.allowed_local_media_path == ""


def test_app_applies_middleware_and_keeps_args():
    """build_app stores the parsed args on app.state and adds ``--middleware`` classes after
    vLLM's own (so outermost: LookMMiddleware checks the API key itself)."""
    from vllm.entrypoints.launchers import app as app_module
    from vllm.entrypoints.serve.middleware import register

    assert "app.state.args = args" in inspect.getsource(app_module.build_app)
    source = inspect.getsource(register.init_entrypoints_middleware)
    assert "for middleware in args.middleware" in source
    assert "app.add_middleware(imported)" in source
    assert "args.api_key or [envs.VLLM_API_KEY]" in source
    assert source.index("AuthenticationMiddleware") < source.index("args.middleware")


def test_authentication_middleware():
    from starlette.datastructures import Headers
    from vllm.entrypoints.serve.middleware.authenticate import (
        GUARDED_PREFIX,
        AuthenticationMiddleware,
    )

    assert "/v1" in GUARDED_PREFIX
    auth = AuthenticationMiddleware(None, tokens=["k"])
    assert auth.verify_token(Headers({"authorization": "Bearer k"}))
    assert not auth.verify_token(Headers({"authorization": "Bearer x"}))
    assert not auth.verify_token(Headers({}))


def test_error_response():
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    err = create_error_response("bad", param="kv_compression.budget")
    assert err.model_dump() == {"error": {"message": "bad", "type": "BadRequestError",
                                          "param": "kv_compression.budget", "code": 400}}


def test_chat_route_and_request():
    """Non-streaming answers are JSON dumps of the response (with ``kv_transfer_params``), streamed
    ones an event stream; ``vllm_xargs`` (strings and numbers) become ``extra_args``."""
    from vllm.entrypoints.openai.chat_completion import api_router
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionRequest,
        ChatCompletionResponse,
    )

    source = inspect.getsource(api_router.create_chat_completion)
    assert "JSONResponse(" in source and "generator.model_dump()" in source
    assert 'media_type="text/event-stream"' in source
    assert "kv_transfer_params" in ChatCompletionResponse.model_fields
    assert next(r.path for r in api_router.router.routes if "POST" in r.methods) == \
        "/v1/chat/completions"
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                    vllm_xargs={"kv_compression": '{"budget": 0.2}'})
    assert request.to_sampling_params(4, {}).extra_args == {"kv_compression": '{"budget": 0.2}'}


def test_stream_generator_hook_point():
    """streaming.install_stream_hook wraps the RequestOutput stream the chat stream generator
    consumes (its 2nd argument) and finds the final usage chunk (``choices=[]``)."""
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.outputs import RequestOutput

    generator = OpenAIServingChat.chat_completion_stream_generator
    generator = getattr(generator, "__wrapped__", generator)
    assert inspect.isasyncgenfunction(generator)
    assert params(generator)[:3] == ["self", "request", "result_generator"]
    source = inspect.getsource(generator)
    assert "async for res in result_generator" in source
    assert "choices=[]" in source and "usage=final_usage" in source
    assert 'yield f"data: {final_usage_data}\\n\\n"' in source
    assert {"finished", "kv_transfer_params"} <= set(params(RequestOutput.__init__))


def test_stream_hook_installs_once():
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat

    from lookm_vllm.server.streaming import install_stream_hook

    install_stream_hook()
    hooked = OpenAIServingChat.chat_completion_stream_generator
    install_stream_hook()
    assert OpenAIServingChat.chat_completion_stream_generator is hooked
    assert hooked.__lookm_hook__ and inspect.isasyncgenfunction(hooked)


def test_usage_info_allows_extra_fields():
    from vllm.entrypoints.serve.engine.protocol import UsageInfo

    usage = UsageInfo(prompt_tokens=1, kv_compression={"method": "lookm"})
    assert usage.model_dump()["kv_compression"] == {"method": "lookm"}


def test_metrics_registry(monkeypatch):
    """vLLM's /metrics serves the default registry (where lookm_vllm.server.metrics registers)
    with one API server, and a multiprocess collector (which reads every process's files)
    otherwise."""
    from prometheus_client import REGISTRY
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    import lookm_vllm.server.metrics  # noqa: F401  (registers the LOOK-M metrics)

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert get_prometheus_registry() is REGISTRY
    assert REGISTRY.get_sample_value("lookm_compressed_requests_total") is not None


def test_policy_reads_vllm_media_args(parser):
    from lookm_vllm.server.validation import RequestPolicy

    args = parser.parse_args(["--allowed-media-domains", "a.com",
                              "--allowed-local-media-path", "/data"])
    policy = RequestPolicy.from_args(args)
    assert policy.allowed_image_domains == {"a.com"}
    assert policy.allowed_local_media_path == "/data"
    assert RequestPolicy.from_args(Namespace()).allow_remote_images is False


# ------------------------------------------------------------------------------ cache-miss retry
def test_engine_answers_a_cache_miss_with_a_retryable_output():
    """P1's receiver cache raises ``MultiModalCacheMissError`` with every missing hash of a
    request; the engine core answers it (instead of adding the request) with a finished ERROR
    output carrying ``mm_cache_miss_hashes``."""
    from vllm.multimodal.cache.base import (
        BaseMultiModalReceiverCache,
        MultiModalCacheMissError,
    )
    from vllm.multimodal.cache.lru import LruKeyReplicatedReceiverCache
    from vllm.v1.engine import EngineCoreOutput, FinishReason
    from vllm.v1.engine.core import EngineCoreProc

    assert "raise MultiModalCacheMissError([mm_hash])" in inspect.getsource(
        LruKeyReplicatedReceiverCache.get_and_update_item)
    assert "raise MultiModalCacheMissError(missing_mm_hashes)" in inspect.getsource(
        BaseMultiModalReceiverCache.get_and_update_features)
    assert MultiModalCacheMissError(["h"]).mm_hashes == ["h"]
    source = inspect.getsource(EngineCoreProc.process_input_sockets)
    assert "except MultiModalCacheMissError as e:" in source
    assert "self._handle_mm_cache_miss(req, e)" in source
    source = inspect.getsource(EngineCoreProc._handle_mm_cache_miss)
    for text in ("Multi-modal cache miss for request", "finish_reason=FinishReason.ERROR",
                 "new_token_ids=[]", "mm_cache_miss_hashes=err.mm_hashes"):
        assert text in source
    assert "mm_cache_miss_hashes" in EngineCoreOutput.__struct_fields__
    assert str(FinishReason.ERROR) == "error"


def test_front_end_turns_a_cache_miss_into_an_error_finish_and_invalidates():
    """The output processor marks only pooling requests ``retryable``: a chat request's cache
    miss reaches the chat layer as a plain ``finish_reason "error"``; the request's engine id
    maps to its external id in ``request_states`` (which retry.note_misses reads before vLLM
    drops finished states); the output handler then drops the hashes from the P0 shadow."""
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.output_processor import OutputProcessor, RequestState

    assert params(OutputProcessor.process_outputs)[:2] == ["self", "engine_core_outputs"]
    source = inspect.getsource(OutputProcessor.process_outputs)
    assert "req_state.detokenizer is None" in source
    assert "engine_core_output.mm_cache_miss_hashes" in source
    assert "self.request_states.get(req_id)" in source
    assert "self.request_states: dict[str, RequestState] = {}" in inspect.getsource(
        OutputProcessor.__init__)
    assert "self.external_req_id = external_req_id" in inspect.getsource(RequestState.__init__)
    handler = inspect.getsource(AsyncLLM._run_output_handler)
    assert handler.index("output_processor.process_outputs(") < handler.index(
        "mm_processor_cache.invalidate(mm_hash)")
    # RequestOutput.request_id is the external id (what retry.is_cache_miss looks up)
    assert "request_id=external_req_id" in inspect.getsource(RequestState._new_request_output)


def test_chat_layer_answers_an_error_finish_with_500():
    """What the retry spares the client: ``_raise_if_error`` logs an ERROR and raises vLLM's
    500 (the stream generator only after the role chunk)."""
    from vllm.entrypoints.generate.base.serving import GenerateBaseServing
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat

    source = inspect.getsource(GenerateBaseServing._raise_if_error)
    assert 'if finish_reason == "error":' in source and "logger.error(" in source
    assert 'raise GenerationError("Internal server error")' in source
    for generator in (OpenAIServingChat.chat_completion_full_generator,
                      OpenAIServingChat.chat_completion_stream_generator):
        generator = getattr(generator, "__wrapped__", generator)
        source = inspect.getsource(generator)
        assert "async for res in result_generator" in source
        assert "self._raise_if_error(output.finish_reason, request_id)" in source
    stream = inspect.getsource(getattr(OpenAIServingChat.chat_completion_stream_generator,
                                       "__wrapped__",
                                       OpenAIServingChat.chat_completion_stream_generator))
    assert stream.index("if first_iteration:") < stream.index("self._raise_if_error(")


def test_chat_handler_calls_generate_once_and_returns_an_unstarted_stream():
    """retry._create_hook wraps ``create_chat_completion``; the first ``generate`` call in it is
    the request's; a stream generator comes back un-started (so it can be primed); a retry
    renders again with ``render_chat_request`` -> (conversation, engine_inputs)."""
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.v1.engine.async_llm import AsyncLLM

    create = getattr(OpenAIServingChat.create_chat_completion, "__wrapped__",
                     OpenAIServingChat.create_chat_completion)
    assert params(create) == ["self", "request", "raw_request"]
    assert "self._create_chat_completion(request, raw_request)" in inspect.getsource(create)
    source = inspect.getsource(OpenAIServingChat._create_chat_completion)
    assert source.count("self.engine_client.generate(") == 1
    assert source.index("await self.render_chat_request(request)") < source.index(
        "self.engine_client.generate(")
    assert "if request.use_beam_search:" in source
    assert "return self.chat_completion_stream_generator(" in source
    assert "return await self.chat_completion_full_generator(" in source
    assert "(result_generator,) = generators" in source
    render = inspect.getsource(OpenAIServingChat.render_chat_request)
    assert "tuple[list[ConversationMessage], list[EngineInput]] | ErrorResponse" in render
    generate = getattr(AsyncLLM.generate, "__wrapped__", AsyncLLM.generate)
    assert inspect.isasyncgenfunction(generate)
    assert params(generate)[:4] == ["self", "prompt", "sampling_params", "request_id"]
    assert "except (asyncio.CancelledError, GeneratorExit):" in inspect.getsource(generate)
    # the OpenAI server's engine client is an AsyncLLM
    from vllm.entrypoints.launchers.api_server import entry

    assert "AsyncLLM.from_vllm_config(" in inspect.getsource(entry)


def test_chat_route_cancels_on_disconnect_and_maps_retryable_errors_to_503():
    """A client hanging up while a stream is primed cancels the handler (``with_cancellation``);
    ``RetryableRequestError`` raised from the handler becomes vLLM's 503 OpenAI error body."""
    from vllm.entrypoints.openai.chat_completion import api_router
    from vllm.entrypoints.serve.exception_handling import register
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.exceptions import GenerationError, RetryableRequestError

    source = inspect.getsource(api_router)
    assert "@with_cancellation\n@load_aware_call\nasync def create_chat_completion(" in source
    assert "await handler.create_chat_completion(request, raw_request)" in source
    assert "app.exception_handler(VLLMError)(vllm_error_handler)" in inspect.getsource(
        register.init_exception_handler)
    assert issubclass(RetryableRequestError, GenerationError)
    err = create_error_response(RetryableRequestError("again"))
    assert err.model_dump() == {"error": {"message": "again", "type": "ServiceUnavailableError",
                                          "param": None, "code": 503}}


def test_p0_cache_is_touched_on_one_executor_but_invalidated_on_the_event_loop():
    """retry.defer_invalidation: renders (and clear_mm_cache) run on the renderer's one-worker
    ``_mm_executor``; the output handler calls ``invalidate`` on the cache object it holds
    (looked up per call, so an instance attribute wins); the app state holds the AsyncLLM."""
    from vllm.entrypoints.launchers.api_server import app_state, entry
    from vllm.multimodal.cache.lru import LruKeyReplicatedSenderCache
    from vllm.renderers.base import BaseRenderer
    from vllm.v1.engine.async_llm import AsyncLLM

    init = inspect.getsource(BaseRenderer.__init__)
    assert "self._mm_executor = ThreadPoolExecutor(max_workers=1)" in init
    for name in ("self._process_multimodal", "self.clear_mm_cache"):
        assert f"{name}, executor=self._mm_executor" in init
    assert "def mm_processor_cache(self)" in inspect.getsource(BaseRenderer)
    handler = inspect.getsource(AsyncLLM._run_output_handler)
    assert "mm_processor_cache = renderer.mm_processor_cache" in handler
    assert "renderer = self.renderer" in handler
    assert "assert mm_item is not None" in inspect.getsource(
        LruKeyReplicatedSenderCache.get_and_update_item)
    assert "self._cache.pop(mm_hash, None)" in inspect.getsource(
        LruKeyReplicatedSenderCache.invalidate)
    cache = object.__new__(LruKeyReplicatedSenderCache)
    cache.invalidate = len  # instances take attributes (no __slots__ all the way down)
    assert cache.invalidate("ab") == 2
    assert "state.engine_client = engine_client" in inspect.getsource(
        app_state.init_app_state)
    source = inspect.getsource(entry)  # the app state is complete before uvicorn serves
    assert source.index("await init_app_state(engine_client, app.state, args") < source.index(
        "return await serve_http(")


def test_retry_hooks_install_once():
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.output_processor import OutputProcessor

    from lookm_vllm.server.retry import install_retry_hook

    install_retry_hook()
    hooked = (OutputProcessor.process_outputs, AsyncLLM.generate,
              OpenAIServingChat.create_chat_completion)
    install_retry_hook()
    assert (OutputProcessor.process_outputs, AsyncLLM.generate,
            OpenAIServingChat.create_chat_completion) == hooked
    assert all(fn.__lookm_hook__ for fn in hooked)


def test_names_the_test_hook_uses():
    """tests/mm_cache_miss_hook.py: the API process's last step before the engine core, and the
    feature it copies."""
    import dataclasses

    from vllm.multimodal.inputs import MultiModalFeatureSpec
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.engine.core_client import AsyncMPClient

    add = getattr(AsyncMPClient.add_request_async, "__wrapped__",
                  AsyncMPClient.add_request_async)
    assert params(add) == ["self", "request"]
    assert {"data", "mm_hash", "identifier"} <= {
        f.name for f in dataclasses.fields(MultiModalFeatureSpec)}
    assert {"mm_features", "sampling_params", "external_req_id"} <= set(
        EngineCoreRequest.__struct_fields__)
