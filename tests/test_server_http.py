"""HTTP tests: the official ``openai`` client against real server processes (uvicorn).

Two servers start once for the module, side by side: ``lookm-serve`` with the built-in demo model
(the trained demo LLaVA of lookm_vllm/demo/shapes_llava, 64 tokens per image, KV blocks of 32
tokens) configured through the environment
fallbacks (LOOKM_HOST/PORT/API_KEY), and a stock ``python -m vllm.entrypoints.openai.api_server``
with LOOK-M's engine option (``options.kv_transfer_config()``), used by one test and stopped after
it.
"""

from __future__ import annotations

import base64
import json
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest

from lookm_vllm.demo.images import image_to_bytes, image_to_data_url, test_images
from lookm_vllm.demo.tiny_models import vllm_server_args
from lookm_vllm.testing.server_process import ServerProcess, free_port, vllm_api_server_cmd
from lookm_vllm.vllm_adapter import options

pytestmark = pytest.mark.engine
openai = pytest.importorskip("openai")
pytest.importorskip("vllm")

API_KEY = "lookm-test-key"
MAX_IMAGES = 4
MAX_REQUEST_MB = 4
LOOKM = {"method": "lookm", "budget": 0.2}
STARTUP_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def launched(tiny_llava_path, tmp_path_factory):
    """Start both servers at once (their startups overlap); tests wait for the one they use."""
    log_dir = tmp_path_factory.mktemp("server-logs")
    script = shutil.which("lookm-serve", path=str(Path(sys.executable).parent))
    lookm_argv = [script] if script else [sys.executable, "-m", "lookm_vllm.server"]
    lookm_port, stock_port = free_port(), free_port()
    servers = {
        "lookm": ServerProcess(
            lookm_argv + ["--max-images", str(MAX_IMAGES), "--max-request-mb",
                          str(MAX_REQUEST_MB), "--disable-uvicorn-access-log"],
            lookm_port, log_path=log_dir / "lookm-serve.log", startup_timeout=STARTUP_TIMEOUT_S,
            env={"LOOKM_HOST": "127.0.0.1", "LOOKM_PORT": str(lookm_port),
                 "LOOKM_API_KEY": API_KEY}).launch(),
        "stock": ServerProcess(
            vllm_api_server_cmd([
                *vllm_server_args(tiny_llava_path, kv_cache_gib=0.25),
                "--kv-transfer-config", json.dumps(options.kv_transfer_config()),
                "--host", "127.0.0.1", "--port", str(stock_port), "--disable-uvicorn-access-log"]),
            stock_port, log_path=log_dir / "stock-vllm.log", startup_timeout=STARTUP_TIMEOUT_S,
            env=dict(options.ENGINE_ENV)).launch(),
    }
    try:
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="module")
def lookm_server(launched) -> ServerProcess:
    launched["lookm"].wait_ready()
    return launched["lookm"]


@pytest.fixture(scope="module")
def client(lookm_server):
    return openai.OpenAI(base_url=f"{lookm_server.url}/v1", api_key=API_KEY, timeout=120,
                         max_retries=0)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def photo_urls() -> list[str]:
    return [image_to_data_url(img, "JPEG") for img in test_images(3)]


@pytest.fixture(scope="module")
def small_url() -> str:
    return image_to_data_url(test_images(4)[3].resize((48, 64)), "JPEG")


def messages(urls: list[str], question: str = "What is in these images?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": parts + [{"type": "text", "text": question}]}]


def lookm_metrics(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {sample.name: sample.value
            for family in text_string_to_metric_families(text) if family.name.startswith("lookm")
            for sample in family.samples if not sample.labels or sample.name.endswith("_count")}


def metric_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    names = ("lookm_compressed_requests_total", "lookm_kv_tokens_evicted_total",
             "lookm_kv_blocks_freed_total", "lookm_compression_seconds_count")
    return {name: after.get(name, 0.0) - before.get(name, 0.0) for name in names}


def expected_deltas(entry: dict) -> dict[str, float]:
    return {"lookm_compressed_requests_total": 1,
            "lookm_kv_tokens_evicted_total": entry["prompt_tokens"] - entry["kv_tokens_kept"],
            "lookm_kv_blocks_freed_total": entry["kv_blocks_freed"],
            "lookm_compression_seconds_count": 1}


# The fields of usage.kv_compression (a subset of the raw stats in kv_transfer_params).
USAGE_FIELDS = {"method", "budget", "max_kv_tokens", "prompt_tokens", "image_tokens",
                "video_tokens", "kv_tokens_kept", "kv_blocks_freed", "prefix_reused_tokens"}


def check_entry(entry: dict, prompt_tokens: int, method: str = "lookm", budget: float = 0.2):
    assert set(entry) == USAGE_FIELDS
    assert (entry["method"], entry["budget"]) == (method, budget)
    assert entry["prompt_tokens"] == prompt_tokens
    assert 0 < entry["kv_tokens_kept"] < prompt_tokens
    assert entry["kv_blocks_freed"] > 0


# ------------------------------------------------------------------------------ stock vLLM
def test_stock_vllm_server_with_plugin_option(launched, tiny_llava_path, photo_urls):
    """``python -m vllm.entrypoints.openai.api_server --kv-transfer-config <LOOK-M>`` (no
    lookm-serve): vllm_xargs reach the engine, the stats come back raw in kv_transfer_params, and
    an invalid config is refused at admission (the plugin's hook) with 400."""
    server, model = launched["stock"], str(tiny_llava_path)
    try:
        server.wait_ready()
        stock = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=120,
                              max_retries=0)
        raw = stock.chat.completions.with_raw_response.create(
            model=model, messages=messages(photo_urls), max_tokens=4, temperature=0,
            extra_body={"vllm_xargs": {"kv_compression": json.dumps(LOOKM)}})
        body = raw.http_response.json()
        check_entry({k: body["kv_transfer_params"]["kv_compression"][k] for k in USAGE_FIELDS},
                    body["usage"]["prompt_tokens"])
        with pytest.raises(openai.BadRequestError) as info:
            stock.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                extra_body={"vllm_xargs": {"kv_compression": '{"budget": 3}'}})
        assert info.value.response.json()["error"]["param"] == "kv_compression"
        plain = stock.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert plain.choices[0].message.content is not None
    finally:
        server.stop()  # first in the module: frees its cores for the tests after it


# ------------------------------------------------------------------------------ serving
def test_health_and_models(lookm_server, client, model):
    assert httpx.get(f"{lookm_server.url}/health").status_code == 200
    assert [m.id for m in client.models.list().data] == [model]
    assert Path(model).name == "shapes_llava"  # the built-in demo model


def test_compressed_chat_with_three_photos(lookm_server, client, model, photo_urls):
    before = lookm_metrics(lookm_server.url)
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages(photo_urls), max_tokens=8, temperature=0,
        extra_body={"kv_compression": LOOKM})
    assert raw.http_response.status_code == 200
    assert "kv_transfer_params" not in raw.http_response.json()
    completion = raw.parse()
    assert completion.choices[0].message.content
    usage = completion.usage
    assert usage.prompt_tokens > 3 * 64
    entry = usage.model_extra["kv_compression"]
    check_entry(entry, usage.prompt_tokens)
    assert metric_deltas(before, lookm_metrics(lookm_server.url)) == expected_deltas(entry)


def test_a_request_ending_in_its_compressing_step_reports_it(lookm_server, client, model,
                                                              photo_urls):
    """Compression runs in the step after the first token; a request whose second token is its
    last ends in that step, and vLLM frees it before the step's connector output is read: its
    usage still reports the compression (the plan's holes), equal to a longer request's."""
    def entry(max_tokens):
        completion = client.chat.completions.create(
            model=model, messages=messages(photo_urls), max_tokens=max_tokens, temperature=0,
            extra_body={"kv_compression": LOOKM, "ignore_eos": True})
        assert completion.usage.completion_tokens == max_tokens
        return completion.usage.model_extra["kv_compression"]

    before = lookm_metrics(lookm_server.url)
    short = entry(2)
    check_entry(short, entry(6)["prompt_tokens"])
    assert short == entry(6)
    deltas = metric_deltas(before, lookm_metrics(lookm_server.url))
    assert deltas["lookm_compressed_requests_total"] == 3
    assert deltas["lookm_kv_blocks_freed_total"] == 3 * short["kv_blocks_freed"]
    # the first token alone: never compressed (reported as such, not counted)
    before = lookm_metrics(lookm_server.url)
    completion = client.chat.completions.create(
        model=model, messages=messages(photo_urls), max_tokens=1, temperature=0,
        extra_body={"kv_compression": LOOKM})
    alone = completion.usage.model_extra["kv_compression"]
    assert alone["kv_tokens_kept"] == alone["prompt_tokens"] and alone["kv_blocks_freed"] == 0
    assert set(metric_deltas(before, lookm_metrics(lookm_server.url)).values()) == {0}


def test_uncompressed_chat_reports_no_compression(lookm_server, client, model, photo_urls):
    before = lookm_metrics(lookm_server.url)
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages(photo_urls), max_tokens=8, temperature=0)
    body = raw.http_response.json()
    assert raw.http_response.status_code == 200 and body["choices"][0]["message"]["content"]
    assert "kv_compression" not in body["usage"] and "kv_transfer_params" not in body
    assert set(metric_deltas(before, lookm_metrics(lookm_server.url)).values()) == {0}


def test_streaming_usage_chunk_carries_kv_compression(lookm_server, client, model, photo_urls):
    before = lookm_metrics(lookm_server.url)
    chunks = list(client.chat.completions.create(
        model=model, messages=messages(photo_urls), max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"kv_compression": LOOKM}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    entry = last.usage.model_extra["kv_compression"]
    check_entry(entry, last.usage.prompt_tokens)
    assert all(c.usage is None for c in chunks[:-1])
    assert metric_deltas(before, lookm_metrics(lookm_server.url)) == expected_deltas(entry)


def test_streaming_without_usage_is_still_counted(lookm_server, client, model, photo_urls):
    before = lookm_metrics(lookm_server.url)
    chunks = list(client.chat.completions.create(
        model=model, messages=messages(photo_urls), max_tokens=4, temperature=0, stream=True,
        extra_body={"kv_compression": LOOKM}))
    assert all(c.usage is None for c in chunks)
    deltas = metric_deltas(before, lookm_metrics(lookm_server.url))
    assert deltas["lookm_compressed_requests_total"] == 1
    assert deltas["lookm_kv_blocks_freed_total"] > 0


def test_vllm_xargs_sent_directly(client, model, photo_urls):
    completion = client.chat.completions.create(
        model=model, messages=messages(photo_urls), max_tokens=4, temperature=0,
        extra_body={"vllm_xargs": {"kv_compression": json.dumps(
            {"method": "snapkv", "budget": 0.3})}})
    check_entry(completion.usage.model_extra["kv_compression"], completion.usage.prompt_tokens,
                method="snapkv", budget=0.3)


# ------------------------------------------------------------------------------ bad input
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _image_body(url: str) -> dict:
    return {"messages": messages([url], "hi")}


def _truncated_png() -> str:
    png = image_to_bytes(test_images(1)[0].resize((64, 64)), "PNG")
    return "data:image/png;base64," + _b64(png[: len(png) // 2])


IMAGE_PARAM = "messages[0].content[0].image_url"
BAD_REQUESTS = {
    # id: (extra request fields, expected param, words in the message)
    "unknown-method": ({"kv_compression": {"method": "magic"}}, "kv_compression.method",
                       "'lookm'"),
    "budget-too-large": ({"kv_compression": {"budget": 1.5}}, "kv_compression.budget",
                         "less than or equal to 1"),
    "budget-zero": ({"kv_compression": {"budget": 0}}, "kv_compression.budget",
                    "greater than 0"),
    "budget-string": ({"kv_compression": {"budget": "0.2"}}, "kv_compression.budget",
                      "valid number"),
    "recent-over-budget": ({"kv_compression": {"budget": 0.1, "recent_ratio": 0.3}},
                           "kv_compression", "recent_ratio (0.3) must not exceed budget"),
    "unknown-field": ({"kv_compression": {"budget": 0.2, "ratio": 1}}, "kv_compression.ratio",
                      "Extra inputs are not permitted"),
    "budget-and-max-kv-tokens": ({"kv_compression": {"budget": 0.2, "max_kv_tokens": 256}},
                                 "kv_compression", "give either budget (a fraction of the "
                                 "prompt) or max_kv_tokens (a token count), not both"),
    "max-kv-tokens-zero": ({"kv_compression": {"max_kv_tokens": 0}},
                           "kv_compression.max_kv_tokens", "greater than or equal to 1"),
    "not-an-object": ({"kv_compression": "lookm"}, "kv_compression", "must be a JSON object"),
    "xargs-invalid": ({"vllm_xargs": {"kv_compression": '{"budget": -1}'}},
                      "vllm_xargs.kv_compression.budget", "greater than 0"),
    "bad-base64": (_image_body("data:image/png;base64,%%%notbase64"), IMAGE_PARAM,
                   "not valid base64"),
    "not-an-image": (_image_body("data:image/png;base64," + _b64(b"plain text, no pixels")),
                     IMAGE_PARAM, "does not decode"),
    "truncated-image": (_image_body(_truncated_png()), IMAGE_PARAM, "does not decode"),
    "unsupported-type": (_image_body("data:image/svg+xml;base64," + _b64(b"<svg/>")),
                         IMAGE_PARAM, "unsupported image type"),
    "remote-url": (_image_body("https://example.com/cat.png"), IMAGE_PARAM,
                   "remote media URLs are not allowed"),
    "file-url": (_image_body("file:///etc/passwd"), IMAGE_PARAM,
                 "local file URLs are not allowed"),
}


def assert_serving(client, model, small_url):
    """A normal request (one image, compressed) right after a refused one."""
    completion = client.chat.completions.create(
        model=model, messages=messages([small_url], "hi"), max_tokens=2, temperature=0,
        extra_body={"kv_compression": {"method": "lookm", "budget": 0.5, "recent_ratio": 0.1}})
    assert completion.choices[0].message.content is not None


def expect_400(client, model, **fields) -> dict:
    extra = {k: v for k, v in fields.items() if k != "messages"}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=model, messages=fields.get("messages", [{"role": "user", "content": "hi"}]),
            max_tokens=2, extra_body=extra)
    assert info.value.status_code == 400
    error = info.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "BadRequestError" and error["code"] == 400
    return error


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_refused_and_server_keeps_serving(client, model, small_url, case):
    fields, param, words = BAD_REQUESTS[case]
    error = expect_400(client, model, **fields)
    assert error["param"] == param
    assert words in error["message"]
    assert_serving(client, model, small_url)


def test_too_many_images(client, model, small_url):
    error = expect_400(client, model, messages=messages([small_url] * (MAX_IMAGES + 1)))
    assert error["param"] == "messages"
    assert f"at most {MAX_IMAGES}" in error["message"]
    assert_serving(client, model, small_url)


def test_oversized_payload(client, model, small_url):
    big = "data:image/png;base64," + "A" * ((MAX_REQUEST_MB + 1) << 20)
    error = expect_400(client, model, messages=messages([big]))
    assert "--max-request-mb" in error["message"]
    assert_serving(client, model, small_url)


def test_unauthenticated_requests_get_401_before_validation(lookm_server, model):
    r = httpx.post(f"{lookm_server.url}/v1/chat/completions", timeout=30,
                   json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                         "kv_compression": {"budget": 7}})
    assert r.status_code == 401


def _engine_gauges(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {s.name: s.value for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc")}


def test_aborted_compressed_request_leaks_no_blocks(lookm_server, model, photo_urls):
    """A client that hangs up mid-stream aborts its request: every KV block comes back."""
    body = {"model": model, "messages": messages(photo_urls), "max_tokens": 3000,
            "ignore_eos": True, "stream": True,
            "kv_compression": {"method": "lookm", "budget": 0.2}}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{lookm_server.url}/v1/chat/completions", json=body,
                      headers=headers, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                break                       # hang up after the first generated text
    assert _engine_gauges(lookm_server.url)  # the gauges are exported
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        gauges = _engine_gauges(lookm_server.url)
        if gauges["vllm:num_requests_running"] == 0 and gauges["vllm:kv_cache_usage_perc"] == 0:
            break
        time.sleep(0.5)
    assert gauges == {"vllm:num_requests_running": 0.0, "vllm:kv_cache_usage_perc": 0.0}
    after = httpx.post(
        f"{lookm_server.url}/v1/chat/completions", headers=headers, timeout=120,
        json={"model": model, "messages": messages(photo_urls[:1]), "max_tokens": 4})
    assert after.status_code == 200  # and the server still serves
