"""The multimodal cache-miss retry of ``lookm_vllm.server.retry``.

Unit tests drive the hooks with stand-ins that produce exactly what vLLM produces (its own
``EngineCoreOutput`` / ``RequestOutput`` classes, the ``finish_reason == "error"`` completion of a
cache miss); the engine tests run a real ``lookm-serve`` whose engine answers chosen requests with
vLLM's genuine cache miss (``tests/mm_cache_miss_hook.py``) and talk to it with the official
``openai`` client: 200 after a retry, streamed and not, and 503 with ``Retry-After`` and an
OpenAI error body once the retries are spent, never a 500.
"""

from __future__ import annotations

import asyncio
import re
import sys
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client import REGISTRY

pytest.importorskip("vllm")

from vllm.exceptions import RetryableRequestError  # noqa: E402
from vllm.outputs import CompletionOutput, RequestOutput  # noqa: E402
from vllm.v1.engine import EngineCoreOutput, FinishReason  # noqa: E402

from lookm_vllm.server import retry  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RETRIES = "lookm_mm_cache_retries_total"
EXHAUSTED = "lookm_mm_cache_retries_exhausted_total"


def counters() -> dict[str, float]:
    return {name: REGISTRY.get_sample_value(name) or 0.0 for name in (RETRIES, EXHAUSTED)}


def deltas(before: dict[str, float]) -> dict[str, float]:
    after = counters()
    return {name: after[name] - before[name] for name in before}


def request_output(request_id: str, text: str, finish: str | None) -> RequestOutput:
    completion = CompletionOutput(index=0, text=text, token_ids=[7] if text else [],
                                  cumulative_logprob=None, logprobs=None, finish_reason=finish)
    return RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=[1, 2, 3],
                         prompt_logprobs=None, outputs=[completion],
                         finished=finish is not None)


def engine_miss(request_id: str) -> RequestOutput:
    """What vLLM hands the chat layer for a cache miss: the engine core's output goes through
    ``process_outputs`` (where the hook notes it), then a finished, token-less ``RequestOutput``
    with ``finish_reason "error"``."""
    internal = f"{request_id}-1a2b3c4d"
    miss = EngineCoreOutput(request_id=internal, new_token_ids=[],
                            finish_reason=FinishReason.ERROR, mm_cache_miss_hashes=["h1", "h2"])
    retry.note_misses([miss], {internal: SimpleNamespace(external_req_id=request_id)})
    return request_output(request_id, "", str(FinishReason.ERROR))


class FakeEngine:
    """An engine client whose ``generate`` plays one scripted attempt per call: ``"miss"``,
    ``"error"`` (an error that is not a cache miss) or ``"ok"`` (three outputs)."""

    def __init__(self, script: list[str]) -> None:
        self.script = script
        self.prompts: list = []
        self.closed = 0
        self.block = asyncio.Event()

    async def generate(self, prompt, sampling_params, request_id, *, priority=0):
        self.prompts.append(prompt)
        kind = self.script[len(self.prompts) - 1]
        try:
            if kind == "wait":
                await self.block.wait()
            if kind == "miss":
                yield engine_miss(request_id)
            elif kind == "error":
                yield request_output(request_id, "", "error")
            else:
                yield request_output(request_id, "a", None)
                yield request_output(request_id, "b", None)
                yield request_output(request_id, "c", "length")
        finally:
            self.closed += 1


class FakeServing:
    """vLLM's ``OpenAIServingChat`` as far as the retry sees it: ``create_chat_completion``
    renders, calls ``engine_client.generate`` once, then consumes the outputs (non-streaming)
    or returns an un-started stream generator."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine_client = engine
        self.renders = 0

    async def render_chat_request(self, request):
        self.renders += 1
        return [], [{"type": "multimodal", "render": self.renders}]

    async def create_chat_completion(self, request, raw_request=None):
        _, (engine_input,) = await self.render_chat_request(request)
        outputs = self.engine_client.generate(engine_input, "params", "chatcmpl-1", priority=1)
        if request.stream:
            return self.stream(outputs)
        return [res async for res in outputs]

    async def stream(self, outputs):
        async for res in outputs:
            yield f"data: {res.outputs[0].text}|{res.outputs[0].finish_reason}\n\n"


@pytest.fixture
def hooked(monkeypatch):
    """FakeEngine and FakeServing with the retry hooks applied as install_retry_hook applies
    them to AsyncLLM and OpenAIServingChat."""
    monkeypatch.setattr(FakeEngine, "generate", retry._generate_hook(FakeEngine.generate))
    monkeypatch.setattr(FakeServing, "create_chat_completion",
                        retry._create_hook(FakeServing.create_chat_completion))

    def make(script: list[str]) -> FakeServing:
        return FakeServing(FakeEngine(script))

    return make


def raw_request(retries: int | None = 2):
    args = Namespace() if retries is None else Namespace(mm_cache_retries=retries)
    return SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(args=args)))


def chat_request(stream: bool, beam: bool = False):
    return SimpleNamespace(stream=stream, use_beam_search=beam)


def texts(outputs) -> list[str]:
    return [f"{o.outputs[0].text}|{o.outputs[0].finish_reason}" for o in outputs]


# ------------------------------------------------------------------------------ units
def test_a_noted_miss_is_recognised_once():
    assert retry.is_cache_miss(engine_miss("chatcmpl-x"))
    # taken: the same output is not a miss twice; an unnoted error is none
    assert not retry.is_cache_miss(request_output("chatcmpl-x", "", "error"))
    assert not retry.is_cache_miss(request_output("chatcmpl-y", "a", "length"))
    # a note for an engine id the output processor no longer knows (aborted) is not kept
    gone = EngineCoreOutput(request_id="z-1", new_token_ids=[], finish_reason=FinishReason.ERROR,
                            mm_cache_miss_hashes=["h"])
    retry.note_misses([gone], {})
    assert retry.MISSES.take("z") is None


def test_miss_log_is_bounded():
    log = retry.MissLog(limit=3)
    for i in range(5):
        log.note(f"r{i}", ["h"])
    assert len(log) == 3 and log.take("r0") is None and log.take("r4") == ["h"]


def test_process_outputs_hook_notes_before_vllm_runs():
    seen = []

    class Processor:
        request_states = {"e-1": SimpleNamespace(external_req_id="e")}

        def process_outputs(self, outputs, timestamp=None):
            seen.append(retry.MISSES.take("e"))  # noted when vLLM's own code runs
            return "processed"

    hooked = retry._process_outputs_hook(Processor.process_outputs)
    miss = EngineCoreOutput(request_id="e-1", new_token_ids=[],
                            finish_reason=FinishReason.ERROR, mm_cache_miss_hashes=["h9"])
    assert hooked(Processor(), [miss], 1.0) == "processed"
    assert seen == [["h9"]]


@pytest.mark.parametrize("stream", [False, True])
def test_a_miss_is_retried_transparently(hooked, stream):
    serving = hooked(["miss", "ok"])
    before = counters()

    async def run():
        result = await serving.create_chat_completion(chat_request(stream), raw_request())
        # a stream is settled before the handler returns: both attempts were already made
        assert len(serving.engine_client.prompts) == 2
        return [chunk async for chunk in result] if stream else texts(result)

    got = asyncio.run(run())
    want = ["a|None", "b|None", "c|length"]
    assert got == ([f"data: {w}\n\n" for w in want] if stream else want)
    # the second attempt was rendered again (the stale items now carry their data)
    assert serving.renders == 2
    assert serving.engine_client.prompts == [{"type": "multimodal", "render": 1},
                                             {"type": "multimodal", "render": 2}]
    assert serving.engine_client.closed == 2
    assert deltas(before) == {RETRIES: 1, EXHAUSTED: 0}


@pytest.mark.parametrize("stream", [False, True])
def test_exhausted_retries_raise_vllms_retryable_503(hooked, stream):
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    serving = hooked(["miss"] * 3)
    before = counters()

    async def run():
        # raised by the handler itself, streamed or not: nothing of a response exists yet
        await serving.create_chat_completion(chat_request(stream), raw_request(retries=2))

    with pytest.raises(RetryableRequestError) as info:
        asyncio.run(run())
    assert len(serving.engine_client.prompts) == 3 and serving.engine_client.closed == 3
    assert deltas(before) == {RETRIES: 2, EXHAUSTED: 1}
    error = create_error_response(info.value).model_dump()["error"]
    assert (error["code"], error["type"]) == (503, "ServiceUnavailableError")
    assert "after 3 attempts" in error["message"]


def test_zero_retries_answers_503_at_once(hooked):
    serving = hooked(["miss", "ok"])
    with pytest.raises(RetryableRequestError):
        asyncio.run(serving.create_chat_completion(chat_request(False), raw_request(0)))
    assert len(serving.engine_client.prompts) == 1


def test_default_retries_without_the_flag(hooked):
    """A stock vLLM server with --middleware LookMMiddleware has no --mm-cache-retries."""
    assert retry.retries_of(raw_request(None)) == retry.DEFAULT_RETRIES == 3
    assert retry.retries_of(None) == retry.DEFAULT_RETRIES
    serving = hooked(["miss"] * 3 + ["ok"])
    result = asyncio.run(serving.create_chat_completion(chat_request(False), raw_request(None)))
    assert texts(result)[-1] == "c|length" and len(serving.engine_client.prompts) == 4


def test_other_errors_are_not_retried(hooked):
    """An error output that is not a cache miss goes to vLLM's chat layer as it came."""
    serving = hooked(["error", "ok"])
    before = counters()
    result = asyncio.run(serving.create_chat_completion(chat_request(False), raw_request()))
    assert texts(result) == ["|error"] and len(serving.engine_client.prompts) == 1
    assert deltas(before) == {RETRIES: 0, EXHAUSTED: 0}


def test_beam_search_and_calls_outside_a_chat_completion_are_left_alone(hooked):
    serving = hooked(["miss"])
    result = asyncio.run(serving.create_chat_completion(chat_request(False, beam=True),
                                                        raw_request()))
    assert texts(result) == ["|error"]  # no retry: vLLM answers as it always did
    engine = FakeEngine(["ok"])
    assert not isinstance(engine.generate("p", "s", "r"), retry.RetryingOutputs)


def test_a_client_that_hangs_up_while_primed_aborts_the_attempt(hooked):
    """A disconnect cancels vLLM's handler task (``with_cancellation``) while the stream is
    being primed: the attempt's generator is closed (vLLM's generate aborts the request)."""
    serving = hooked(["wait"])

    async def run():
        task = asyncio.create_task(
            serving.create_chat_completion(chat_request(True), raw_request()))
        while not serving.engine_client.prompts:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert serving.engine_client.closed == 1


def test_invalidation_runs_on_the_multimodal_executor_between_renders():
    """vLLM's output handler drops stale hashes from the P0 cache on the event loop; deferred,
    the drop waits for the render in progress and precedes the renders submitted after it."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    events: list[str] = []

    class Cache:
        def invalidate(self, mm_hash):
            events.append(f"invalidate {mm_hash} on {threading.current_thread().name}")

    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mm")
    renderer = SimpleNamespace(mm_processor_cache=Cache(), _mm_executor=executor)
    engine_client = SimpleNamespace(renderer=renderer)
    assert retry.defer_invalidation(engine_client)
    assert not retry.defer_invalidation(engine_client)  # once
    rendering = threading.Event()

    def render(name):
        rendering.set()
        events.append(f"render {name}")

    gate = threading.Event()
    executor.submit(gate.wait)
    executor.submit(render, "A")          # in progress when the miss comes back
    renderer.mm_processor_cache.invalidate("h1")   # what the output handler calls
    events.append("returned")             # without waiting for the executor
    executor.submit(render, "retry")
    gate.set()
    executor.shutdown(wait=True)
    assert events == ["returned", "render A", "invalidate h1 on mm_0", "render retry"]
    # after shutdown (server stopping) it runs inline
    renderer.mm_processor_cache.invalidate("h2")
    assert events[-1] == f"invalidate h2 on {threading.current_thread().name}"
    # no P0 cache (text-only model, cache disabled): nothing to do
    assert not retry.defer_invalidation(SimpleNamespace(renderer=SimpleNamespace(
        mm_processor_cache=None, _mm_executor=executor)))
    assert not retry.defer_invalidation(None)


def test_middleware_adds_retry_after_to_503():
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from fastapi.testclient import TestClient
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    from lookm_vllm.server.middleware import LookMMiddleware

    app = FastAPI()
    app.state.args = Namespace(max_request_mb=1, max_images=2, allowed_media_domains=None,
                               allow_remote_images=False, allowed_local_media_path="")

    @app.post("/v1/chat/completions")
    async def completions(body: dict):
        if body.get("fail"):
            err = create_error_response(RetryableRequestError("try again"))
            return JSONResponse(err.model_dump(), status_code=err.error.code)
        return {"usage": {}}

    app.add_middleware(LookMMiddleware)
    client = TestClient(app)
    r = client.post("/v1/chat/completions", json={"fail": True})
    assert r.status_code == 503 and r.headers["retry-after"] == str(retry.RETRY_AFTER_S)
    assert r.json() == {"error": {"message": "try again", "type": "ServiceUnavailableError",
                                  "param": None, "code": 503}}
    ok = client.post("/v1/chat/completions", json={})
    assert ok.status_code == 200 and "retry-after" not in ok.headers


def test_cli_flag(capsys):
    from lookm_vllm.server.cli import parse_args

    assert parse_args(["--model", "/m"]).mm_cache_retries == retry.DEFAULT_RETRIES
    assert parse_args(["--model", "/m", "--mm-cache-retries", "0"]).mm_cache_retries == 0
    with pytest.raises(SystemExit):
        parse_args(["--model", "/m", "--mm-cache-retries", "-1"])
    assert "must be 0 or more" in capsys.readouterr().err


# ------------------------------------------------------------------------------ a real server
HOOK = "tests.mm_cache_miss_hook.ForceMultiModalCacheMiss"
SERVER_RETRIES = 2
MISS_LINE = "Multi-modal cache miss for request"
ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback")


@pytest.fixture(scope="module")
def server(tiny_llava_path, tmp_path_factory):
    from lookm_vllm.demo.tiny_models import vllm_server_args
    from lookm_vllm.testing.server_process import ServerProcess, free_port

    port = free_port()
    cmd = [sys.executable, "-m", "lookm_vllm.server",
           *vllm_server_args(tiny_llava_path, max_images=2, max_model_len=1024,
                             kv_cache_gib=0.05),
           "--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log",
           "--mm-cache-retries", str(SERVER_RETRIES), "--middleware", HOOK]
    log = tmp_path_factory.mktemp("retry") / "server.log"
    with ServerProcess(cmd, port, log_path=log, cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT)}) as proc:
        yield proc


@pytest.fixture(scope="module")
def photo_url() -> str:
    from lookm_vllm.demo.images import image_to_data_url, test_images

    return image_to_data_url(test_images(2)[1], "JPEG")


def server_counters(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {s.name: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name in (RETRIES, EXHAUSTED)}


def misses_in_log(server) -> int:
    return server.log_path.read_text(errors="replace").count(MISS_LINE)


def ask(server, photo_url, misses: int, stream: bool, **extra):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                           timeout=120)
    model = client.models.list().data[0].id
    return client.chat.completions.create(
        model=model, max_tokens=4, temperature=0, stream=stream,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": photo_url}},
            {"type": "text", "text": "What is this?"}]}],
        extra_body={"vllm_xargs": {"lookm_test_mm_cache_miss": misses}, **extra},
        **({"stream_options": {"include_usage": True}} if stream else {}))


@pytest.mark.engine
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("misses", [1, SERVER_RETRIES])
def test_engine_cache_miss_is_retried_to_a_200(server, photo_url, stream, misses):
    before, log_before = server_counters(server.url), misses_in_log(server)
    reply = ask(server, photo_url, misses, stream,
                kv_compression={"method": "lookm", "budget": 0.5})
    if stream:
        chunks = list(reply)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
    else:
        assert reply.choices[0].message.content
        usage = reply.usage
    assert usage.completion_tokens == 4
    assert usage.model_extra["kv_compression"]["kv_blocks_freed"] >= 0
    # the engine really answered `misses` times with vLLM's cache miss, and each was retried
    assert misses_in_log(server) - log_before == misses
    after = server_counters(server.url)
    assert after[RETRIES] - before[RETRIES] == misses
    assert after[EXHAUSTED] == before[EXHAUSTED]


@pytest.mark.engine
@pytest.mark.parametrize("stream", [False, True])
def test_engine_cache_miss_beyond_the_retries_is_a_503(server, photo_url, stream):
    openai = pytest.importorskip("openai")
    before = server_counters(server.url)
    with pytest.raises(openai.InternalServerError) as info:
        reply = ask(server, photo_url, SERVER_RETRIES + 1, stream)
        list(reply) if stream else None
    response = info.value.response
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == {"error": {
        "message": f"The multimodal inputs of this request could not be matched with the "
                   f"engine's cache after {SERVER_RETRIES + 1} attempts; please retry",
        "type": "ServiceUnavailableError", "param": None, "code": 503}}
    after = server_counters(server.url)
    assert after[RETRIES] - before[RETRIES] == SERVER_RETRIES
    assert after[EXHAUSTED] - before[EXHAUSTED] == 1


@pytest.mark.engine
def test_engine_server_log_has_no_errors(server, photo_url):
    """Runs last in the module: retried and refused requests leave no ERROR line (vLLM's 500
    path logs one), and the server still serves."""
    assert ask(server, photo_url, 0, False).choices[0].message.content
    errors = [line for line in server.log_path.read_text(errors="replace").splitlines()
              if ERROR_LINE.search(line)]
    assert errors == []

