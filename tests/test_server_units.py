"""Unit tests of the server layer without an engine: request validation and rewriting, the
middleware on a stand-in app (starlette's TestClient), response shaping, metrics, the CLI."""

from __future__ import annotations

import base64
import json
from argparse import Namespace

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from lookm_vllm.core import CompressionConfig
from lookm_vllm.demo.images import image_to_bytes, image_to_data_url, test_images
from lookm_vllm.server.validation import (
    RequestError,
    RequestPolicy,
    check_media,
    param_path,
    prepare_chat_request,
)

pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def photo_url() -> str:
    return image_to_data_url(test_images(1)[0].resize((64, 48)), "JPEG")


def chat(*parts, **extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": list(parts)}], **extra}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def refused(body, policy: RequestPolicy | None = None) -> RequestError:
    with pytest.raises(RequestError) as info:
        prepare_chat_request(body, policy or RequestPolicy())
    return info.value


# ------------------------------------------------------------------------------ validation
def test_param_path():
    assert param_path("messages", (0, "content", 1, "image_url")) == \
        "messages[0].content[1].image_url"
    assert param_path("kv_compression", ("budget",)) == "kv_compression.budget"
    assert param_path("", ("a", 2)) == "a[2]"


def test_top_level_config_becomes_vllm_xargs_json(photo_url):
    body = chat(image(photo_url), {"type": "text", "text": "hi"},
                kv_compression={"method": "lookm", "budget": 0.2},
                vllm_xargs={"other": 3})
    out = prepare_chat_request(body, RequestPolicy())
    assert "kv_compression" not in out
    assert out["vllm_xargs"]["other"] == 3
    sent = out["vllm_xargs"]["kv_compression"]
    assert isinstance(sent, str)
    assert CompressionConfig.model_validate_json(sent) == \
        CompressionConfig(method="lookm", budget=0.2)
    assert "kv_compression" in body  # the caller's body is not modified


def test_valid_vllm_xargs_config_passes_unchanged():
    body = chat({"type": "text", "text": "hi"},
                vllm_xargs={"kv_compression": '{"method": "h2o", "budget": 0.5}'})
    assert prepare_chat_request(body, RequestPolicy()) is body


def test_no_config_leaves_the_body_alone():
    body = chat({"type": "text", "text": "hi"}, kv_compression=None)
    assert prepare_chat_request(body, RequestPolicy()) == chat({"type": "text", "text": "hi"})
    body = chat({"type": "text", "text": "hi"})
    assert prepare_chat_request(body, RequestPolicy()) is body
    assert prepare_chat_request([1, 2], RequestPolicy()) == [1, 2]


@pytest.mark.parametrize("config, param, words", [
    ({"method": "magic"}, "kv_compression.method", "lookm"),
    ({"budget": 1.5}, "kv_compression.budget", "less than or equal to 1"),
    ({"budget": 0}, "kv_compression.budget", "greater than 0"),
    ({"budget": "0.2"}, "kv_compression.budget", "valid number"),
    ({"budget": 0.1, "recent_ratio": 0.3}, "kv_compression", "recent_ratio"),
    ({"bogus": 1}, "kv_compression.bogus", "Extra inputs"),
    ({"budget": 0.2, "max_kv_tokens": 256}, "kv_compression", "budget"),
    ({"budget": 0.2, "max_kv_tokens": 256}, "kv_compression", "max_kv_tokens"),
    ({"max_kv_tokens": 0}, "kv_compression.max_kv_tokens", "greater than or equal to 1"),
    ({"max_kv_tokens": "256"}, "kv_compression.max_kv_tokens", "valid integer"),
    ("lookm", "kv_compression", "JSON object"),
    ([0.2], "kv_compression", "JSON object"),
])
def test_invalid_config(config, param, words):
    err = refused(chat({"type": "text", "text": "x"}, kv_compression=config))
    assert err.param == param
    assert words in err.message


@pytest.mark.parametrize("value, param", [
    ('{"budget": 7}', "vllm_xargs.kv_compression.budget"),
    ("not json", "vllm_xargs.kv_compression"),
    (0.2, "vllm_xargs.kv_compression"),
])
def test_invalid_vllm_xargs_config(value, param):
    err = refused(chat({"type": "text", "text": "x"}, vllm_xargs={"kv_compression": value}))
    assert err.param == param


def test_config_twice_is_refused():
    err = refused(chat({"type": "text", "text": "x"}, kv_compression={"budget": 0.2},
                       vllm_xargs={"kv_compression": '{"budget": 0.2}'}))
    assert err.param == "kv_compression" and "not both" in err.message


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("url, words", [
    ("data:image/png;base64,@@@", "not valid base64"),
    ("data:image/png;base64," + _b64(b"hello, not an image"), "does not decode"),
    ("data:image/svg+xml;base64," + _b64(b"<svg/>"), "unsupported image type"),
    ("data:text/plain;base64," + _b64(b"hi"), "unsupported image type"),
    ("data:image/png,rawbytes", "base64"),
    ("data:image/png;base64", "malformed"),
    ("http://example.com/cat.png", "remote media URLs are not allowed"),
    ("https://example.com/cat.png", "remote media URLs are not allowed"),
    ("file:///etc/passwd", "local file URLs are not allowed"),
    ("ftp://example.com/cat.png", "unsupported media URL scheme"),
])
def test_refused_image_urls(photo_url, url, words):
    err = refused(chat({"type": "text", "text": "x"}, image(photo_url), image(url)))
    assert err.param == "messages[0].content[2].image_url"
    assert words in err.message


def test_truncated_image_is_refused():
    png = image_to_bytes(test_images(1)[0].resize((64, 64)), "PNG")
    err = refused(chat(image("data:image/png;base64," + _b64(png[: len(png) // 2]))))
    assert "does not decode" in err.message


def test_other_part_kinds_follow_the_url_policy(photo_url):
    err = refused(chat({"type": "input_image", "image_url": "http://a.com/x.png"}))
    assert err.param == "messages[0].content[0].image_url"
    err = refused(chat({"type": "video_url", "video_url": {"url": "file:///tmp/v.mp4"}}))
    assert err.param == "messages[0].content[0].video_url"
    # untyped parts are images too, as vLLM reads them
    err = refused(chat({"image_url": "data:image/png;base64,@@"}))
    assert err.param == "messages[0].content[0].image_url"


def test_media_policy_covers_any_body_shape(photo_url):
    """Batch chat (a list of conversations), responses-style input: the whole body is walked."""
    batch = {"messages": [[{"role": "user", "content": [image(photo_url)]}],
                          [{"role": "user", "content": [image("file:///etc/passwd")]}]]}
    with pytest.raises(RequestError) as info:
        check_media(batch, RequestPolicy())
    assert info.value.param == "messages[1][0].content[0].image_url"
    responses = {"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "x"},
        {"type": "input_image", "image_url": "http://a.com/x.png"}]}]}
    with pytest.raises(RequestError) as info:
        check_media(responses, RequestPolicy())
    assert info.value.param == "input[0].content[1].image_url"
    anthropic = {"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://a.com/x.png"}}]}]}
    with pytest.raises(RequestError) as info:
        check_media(anthropic, RequestPolicy())
    assert info.value.param == "messages[0].content[0].source.url"
    nested: list = []
    for _ in range(100_000):  # deeper than any recursion limit
        nested = [nested]
    check_media({"messages": nested}, RequestPolicy())


def test_remote_policy():
    body = chat(image("https://a.com/x.png"), image("https://B.org/y.png"))
    prepare_chat_request(body, RequestPolicy(allow_remote_images=True))
    domains = RequestPolicy(allow_remote_images=True,
                            allowed_image_domains=frozenset({"a.com", "b.org"}))
    prepare_chat_request(body, domains)
    err = refused(chat(image("https://a.com/x.png"), image("https://evil.com/y.png")), domains)
    assert err.param == "messages[0].content[1].image_url" and "evil.com" in err.message


def test_local_files_only_inside_the_allowed_directory(tmp_path):
    policy = RequestPolicy(allowed_local_media_path=str(tmp_path))
    prepare_chat_request(chat(image(f"file://{tmp_path}/a.png")), policy)
    refused(chat(image(f"file://{tmp_path}/../a.png")), policy)
    refused(chat(image("file:///etc/passwd")), policy)


def test_max_images(photo_url):
    policy = RequestPolicy(max_images=2)
    prepare_chat_request(chat(image(photo_url), image(photo_url)), policy)
    body = {"messages": [{"role": "user", "content": [image(photo_url), image(photo_url)]},
                         {"role": "user", "content": [image(photo_url)]}]}
    err = refused(body, policy)
    assert err.param == "messages" and "at most 2" in err.message


def test_policy_from_args():
    assert RequestPolicy.from_args(None) == RequestPolicy()
    args = Namespace(allow_remote_images=False, allowed_media_domains=["A.com"],
                     allowed_local_media_path="", max_images=3, max_request_mb=1.5)
    policy = RequestPolicy.from_args(args)
    assert policy.allow_remote_images and policy.allowed_image_domains == {"a.com"}
    assert policy.max_images == 3 and policy.max_request_bytes == int(1.5 * (1 << 20))


# ------------------------------------------------------------------------------ responses
STATS = {"compressed": True, "method": "lookm", "budget": 0.2, "prompt_tokens": 460,
         "kv_tokens_kept": 204, "kv_blocks_freed": 8, "pool_free_blocks_before": 1,
         "pool_free_blocks_after": 9, "scoring_ms": 50.0, "compression_ms": 120.0,
         "max_kv_tokens": None, "image_tokens": 288, "video_tokens": 96,
         "prefix_reused_tokens": 128}
USAGE = {"method": "lookm", "budget": 0.2, "max_kv_tokens": None, "prompt_tokens": 460,
         "image_tokens": 288, "video_tokens": 96, "kv_tokens_kept": 204, "kv_blocks_freed": 8,
         "prefix_reused_tokens": 128}


def metric(name: str, labels: dict | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_shape_response_moves_stats_into_usage_and_counts_them():
    from lookm_vllm.server.usage import shape_response

    before = {n: metric(n) for n in ("lookm_compressed_requests_total",
                                     "lookm_kv_tokens_evicted_total",
                                     "lookm_kv_blocks_freed_total",
                                     "lookm_compression_seconds_count",
                                     "lookm_compression_seconds_sum",
                                     "lookm_scoring_seconds_count",
                                     "lookm_scoring_seconds_sum")}
    before |= {f"modality:{m}": metric("lookm_compressed_prompt_tokens_total", {"modality": m})
               for m in ("text", "image", "video")}
    body = shape_response({"usage": {"prompt_tokens": 460},
                           "kv_transfer_params": {"kv_compression": dict(STATS)}})
    assert body == {"usage": {"prompt_tokens": 460, "kv_compression": USAGE}}
    assert metric("lookm_compressed_requests_total") - before[
        "lookm_compressed_requests_total"] == 1
    assert metric("lookm_kv_tokens_evicted_total") - before[
        "lookm_kv_tokens_evicted_total"] == 256
    assert metric("lookm_kv_blocks_freed_total") - before["lookm_kv_blocks_freed_total"] == 8
    for modality, count in (("text", 76), ("image", 288), ("video", 96)):
        assert metric("lookm_compressed_prompt_tokens_total", {"modality": modality}) \
            - before[f"modality:{modality}"] == count
    assert metric("lookm_compression_seconds_count") - before[
        "lookm_compression_seconds_count"] == 1
    assert metric("lookm_compression_seconds_sum") - before[
        "lookm_compression_seconds_sum"] == pytest.approx(0.12)
    assert metric("lookm_scoring_seconds_count") - before["lookm_scoring_seconds_count"] == 1
    assert metric("lookm_scoring_seconds_sum") - before[
        "lookm_scoring_seconds_sum"] == pytest.approx(0.05)
    # other connectors' entries stay; nothing to move leaves the body as it was
    assert shape_response({"kv_transfer_params": {"x": 1}}) == {"kv_transfer_params": {"x": 1}}
    assert shape_response({"usage": {}, "kv_transfer_params": None}) == {"usage": {}}


def test_uncompressed_summary_is_reported_not_counted():
    from lookm_vllm.server.usage import report

    before = metric("lookm_compressed_requests_total")
    from lookm_vllm.stats import CompressionStats

    summary = CompressionStats.from_dict({k: STATS[k] for k in USAGE} | {
        "compressed": False, "kv_tokens_kept": 460, "kv_blocks_freed": 0})
    assert report(summary)["kv_tokens_kept"] == 460
    assert metric("lookm_compressed_requests_total") == before


def test_usage_chunk_injection():
    from lookm_vllm.server.streaming import add_to_usage_chunk

    final = 'data: {"id":"c","choices":[],"usage":{"prompt_tokens":4,"total_tokens":5}}\n\n'
    shaped = add_to_usage_chunk(final, USAGE)
    assert shaped.startswith("data: ") and shaped.endswith("\n\n")
    assert json.loads(shaped[6:])["usage"]["kv_compression"] == USAGE
    token = 'data: {"id":"c","choices":[{"index":0,"delta":{"content":"a"}}],"usage":null}\n\n'
    assert add_to_usage_chunk(token, USAGE) is None
    assert add_to_usage_chunk("data: [DONE]\n\n", USAGE) is None
    assert add_to_usage_chunk(": keep-alive\n\n", USAGE) is None


# ------------------------------------------------------------------------------ middleware
@pytest.fixture(scope="module")
def app_client(photo_url):
    """LookMMiddleware in front of a stand-in for vLLM's chat route, which echoes the body it got
    and answers with engine stats in ``kv_transfer_params``, as vLLM does."""
    from lookm_vllm.server.middleware import LookMMiddleware

    app = FastAPI()
    app.state.args = Namespace(api_key=["secret"], max_request_mb=0.5, max_images=2,
                               allowed_media_domains=None, allow_remote_images=False,
                               allowed_local_media_path="")

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        got = await request.json()
        return {"got": got, "usage": {"prompt_tokens": 460},
                "kv_transfer_params": {"kv_compression": dict(STATS)}}

    @app.post("/v1/other")
    async def other(request: Request):
        return {"size": len(await request.body())}

    app.add_middleware(LookMMiddleware)
    return TestClient(app, headers={"Authorization": "Bearer secret"})


def test_middleware_rewrites_request_and_shapes_response(app_client, photo_url):
    r = app_client.post("/v1/chat/completions",
                        json=chat(image(photo_url), kv_compression={"budget": 0.3}))
    assert r.status_code == 200
    data = r.json()
    assert "kv_transfer_params" not in data
    assert data["usage"]["kv_compression"] == USAGE
    assert "kv_compression" not in data["got"]
    assert json.loads(data["got"]["vllm_xargs"]["kv_compression"])["budget"] == 0.3
    assert int(r.headers["content-length"]) == len(r.content)


def test_middleware_refusals_are_openai_errors(app_client):
    r = app_client.post("/v1/chat/completions",
                        json=chat({"type": "text", "text": "x"}, kv_compression={"budget": 9}))
    assert r.status_code == 400
    assert r.json() == {"error": {
        "message": "invalid kv_compression: kv_compression.budget: Input should be less than or "
                   "equal to 1", "type": "BadRequestError", "param": "kv_compression.budget",
        "code": 400}}


def test_middleware_size_limit_applies_to_every_body(app_client):
    big = b"x" * (600 << 10)
    for path in ("/v1/chat/completions", "/v1/other"):
        r = app_client.post(path, content=big, headers={"content-type": "application/json"})
        assert r.status_code == 400
        assert "--max-request-mb" in r.json()["error"]["message"]
    assert app_client.post("/v1/other", content=b"y" * 100).json() == {"size": 100}


def test_middleware_checks_media_on_every_json_body(app_client):
    r = app_client.post("/v1/other", json={"input": [{"image_url": "file:///etc/passwd"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[0].image_url"
    ok = b'{"input": "text"}'  # handed on byte for byte
    assert app_client.post("/v1/other", content=ok,
                           headers={"content-type": "application/json"}).json() == {"size": 17}
    # not JSON: handed on untouched
    assert app_client.post("/v1/other", content=b"{oops").json() == {"size": 5}


def test_middleware_leaves_unauthenticated_requests_to_vllm(app_client):
    """Bad input from a client without the API key is not validated: vLLM's own check (absent
    from this stand-in app) answers it."""
    r = app_client.post("/v1/chat/completions", headers={"Authorization": "Bearer wrong"},
                        json=chat({"type": "text", "text": "x"}, kv_compression={"budget": 9}))
    assert r.status_code == 200 and r.json()["got"]["kv_compression"] == {"budget": 9}


# ------------------------------------------------------------------------------ CLI
def test_cli_builds_vllm_args(monkeypatch):
    from lookm_vllm.demo.trained import DEMO_MODEL_DIR
    from lookm_vllm.server.cli import parse_args
    from lookm_vllm.vllm_adapter import options

    for var in ("LOOKM_MODEL", "LOOKM_KV_COMPRESSION", "LOOKM_API_KEY", "LOOKM_HOST",
                "LOOKM_PORT"):
        monkeypatch.delenv(var, raising=False)
    args = parse_args(["--kv-compression", '{"method": "lookm", "budget": 0.2}',
                       "--allowed-image-domains", "A.com, b.org", "--max-images", "3",
                       "--block-size", "64", "--middleware", "my.Middleware"])
    # the shipped demo model with the tiny-model settings, the user's own flags winning
    assert args.model == str(DEMO_MODEL_DIR)
    assert args.block_size == 64 and args.dtype == "float32" and args.enforce_eager
    assert args.limit_mm_per_prompt == {"image": 3} and args.max_images == 3
    # the engine option from options.py, nothing else
    ktc = args.kv_transfer_config
    expected = options.kv_transfer_config({"method": "lookm", "budget": 0.2})
    assert ktc.kv_connector == expected["kv_connector"]
    assert ktc.kv_connector_module_path == expected["kv_connector_module_path"]
    assert ktc.kv_connector_extra_config == expected["kv_connector_extra_config"]
    assert args.middleware == ["lookm_vllm.server.middleware.LookMMiddleware", "my.Middleware"]
    assert args.allowed_media_domains == ["a.com", "b.org"]
    assert args.port == 8000 and args.max_request_mb == 32.0


def test_cli_environment_fallbacks(monkeypatch):
    from lookm_vllm.server.cli import parse_args

    monkeypatch.setenv("LOOKM_MODEL", "/models/llava")
    monkeypatch.setenv("LOOKM_API_KEY", "k1")
    monkeypatch.setenv("LOOKM_HOST", "127.0.0.1")
    monkeypatch.setenv("LOOKM_PORT", "9001")
    monkeypatch.setenv("LOOKM_KV_COMPRESSION", '{"method": "snapkv", "budget": 0.5}')
    args = parse_args([])
    assert (args.model, args.api_key, args.host, args.port) == \
        ("/models/llava", ["k1"], "127.0.0.1", 9001)
    assert args.kv_transfer_config.kv_connector_extra_config["default"]["method"] == "snapkv"
    assert args.max_images is None and not args.limit_mm_per_prompt
    # flags win over the environment
    args = parse_args(["--model", "/other", "--port", "9002", "--api-key", "k2"])
    assert (args.model, args.port, args.api_key) == ("/other", 9002, ["k2"])


@pytest.mark.parametrize("argv, words", [
    (["--kv-compression", '{"method": "lookm", "budget": 2}'], "kv_compression.budget"),
    (["--kv-compression", "lookm"], "invalid --kv-compression"),
    (["--kv-transfer-config", "{}"], "sets --kv-transfer-config itself"),
])
def test_cli_refuses_bad_settings(argv, words, capsys):
    from lookm_vllm.server.cli import parse_args

    with pytest.raises(SystemExit) as info:
        parse_args(["--model", "/m"] + argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert words in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv, backend", [
    ([], "FLASH_ATTN"),                                            # lookm-serve's choice
    (["--attention-backend", "TRITON_ATTN"], "TRITON_ATTN"),       # the user's flag wins
    (["-ac.backend=FLASHINFER"], "FLASHINFER"),                    # ... or attention config
])
def test_cli_picks_flash_attention_on_cuda(monkeypatch, argv, backend):
    """On CUDA lookm-serve asks for FLASH_ATTN (which LOOK-M wraps) unless the user chose a
    backend; vLLM itself would pick FlashInfer on some GPUs and the engine would be refused."""
    from lookm_vllm.server import cli

    monkeypatch.setattr(cli, "_serves_on_cuda", lambda: True)
    args = cli.parse_args(["--model", "/m"] + argv)
    chosen = args.attention_backend or args.attention_config.backend
    assert getattr(chosen, "name", chosen) == backend
    assert not (args.attention_backend and args.attention_config.backend)  # vLLM: exclusive
    monkeypatch.setattr(cli, "_serves_on_cuda", lambda: False)
    assert cli.parse_args(["--model", "/m"]).attention_backend is None  # CPU: vLLM's choice


def test_an_image_is_decoded_once_however_often_it_is_sent(photo_url, monkeypatch):
    """A chat re-sends its images every turn: a data URL that passed is not decoded again (by
    its digest), while a broken one is refused every time (failures are not remembered)."""
    from PIL import Image

    from lookm_vllm.server import validation

    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    monkeypatch.setattr(validation, "_validated_images", type(validation._validated_images)())
    body = chat(image(photo_url), image(photo_url))
    check_media(body, RequestPolicy())
    check_media(body, RequestPolicy())
    assert len(opened) == 1
    truncated = "data:image/jpeg;base64," + _b64(image_to_bytes(test_images(1)[0], "JPEG")[:200])
    for _ in range(2):
        with pytest.raises(RequestError, match="does not decode"):
            check_media(chat(image(truncated)), RequestPolicy())
    assert len(opened) == 3
    # the memory is bounded: with room for nothing, every check decodes again
    monkeypatch.setattr(validation, "VALIDATED_IMAGES_MAX", 0)
    validation._validated_images.clear()
    check_media(body, RequestPolicy())
    assert len(opened) == 5 and not validation._validated_images
