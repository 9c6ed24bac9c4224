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
