"""The trained demo VLM: its task data, its training script, the shipped weights, and (engine)
its held-out accuracy through vLLM with and without compression.

The engine test runs ``lookm-eval`` (one engine, in a subprocess) on a small held-out sample of
the demo task and checks what was measured when the weights were made (docs/evaluation.md): the
full cache answers >= 90 % exactly ("It is <color>", then the end of the answer), LOOK-M at
budget 0.2 stays within 10 points of it, and a damaged cache (StreamingLLM at budget 0.05, no
image kept) loses exact answers: the color is decided on the compressed cache (see the test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lookm_vllm.demo import shapes, train
from lookm_vllm.demo.trained import DEMO_MODEL_DIR, demo_model_path, manifest, sha256_file

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Task data
# ----------------------------------------------------------------------------------------------
def _pixels_of(image, color: str) -> int:
    """Pixels within the per-image jitter (+-20 per channel) of a named color."""
    want = shapes.COLORS[color]
    return sum(n for n, rgb in image.getcolors(64 * 64)
               if all(abs(a - b) <= 20 for a, b in zip(rgb, want, strict=True)))


def test_items_are_deterministic_and_answers_follow_the_pixels():
    a = shapes.make_item(shapes.FRAMED, 4, shapes.item_rng("heldout", 0, 3))
    b = shapes.make_item(shapes.FRAMED, 4, shapes.item_rng("heldout", 0, 3))
    assert [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images]
    assert (a.question, a.answer) == (b.question, b.answer)
    other = shapes.make_item(shapes.FRAMED, 4, shapes.item_rng("train", 0, 3))
    assert [im.tobytes() for im in a.images] != [im.tobytes() for im in other.images]
    for i in range(40):
        item = shapes.make_item(shapes.FRAMED, 4, shapes.item_rng("t", 0, i))
        assert all(im.size == (64, 64) for im in item.images)
        # exactly one framed image (white border), and the answer is its shape's color
        framed = [im for im in item.images if im.getpixel((1, 1)) == (255, 255, 255)]
        assert len(framed) == 1
        assert _pixels_of(framed[0], item.answer) > 100
    answers = []
    for i in range(200):
        item = shapes.make_item(shapes.EXISTS, 4, shapes.item_rng("t", 0, i))
        asked = item.question.split()[3]
        assert item.question == f"Is there a {asked} shape in any image?"
        holders = [im for im in item.images if _pixels_of(im, asked) > 100]
        assert len(holders) == (1 if item.answer == "yes" else 0)
        answers.append(item.answer)
    assert 70 < answers.count("yes") < 130


def test_training_prompts_are_the_prompts_lookm_eval_sends(tmp_path):
    """The trained model sees at training time exactly the text lookm-eval renders."""
    from transformers import AutoProcessor

    from lookm_vllm.eval.milebench import load_task
    from lookm_vllm.eval.runner import PromptBuilder
    from lookm_vllm.eval.synthetic import generate_task

    processor = AutoProcessor.from_pretrained(str(DEMO_MODEL_DIR))
    batcher = train.Batcher(processor)
    builder = PromptBuilder(processor)
    for task in shapes.TASKS:
        loaded = load_task(generate_task(tmp_path, task, num_samples=3, images_per_sample=4))
        for sample in loaded.samples:
            request = builder.build(loaded, sample)
            question = sample.context.split("Question: ")[-1]
            assert request.prompt == batcher.prompt(4, question)
            assert len(request.images) == 4
    # and the expanded ids are the processor's (64 image tokens per image)
    item = shapes.make_item(shapes.FRAMED, 2, shapes.item_rng("t", 0, 0))
    enc = processor(text=batcher.prompt(2, item.question), images=list(item.images))
    assert enc["input_ids"][0] == batcher.prompt_ids(2, item.question)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def test_a_few_training_steps_lower_the_loss_deterministically():
    cfg = train.TrainConfig(steps=12, batch_size=8, warmup=2, single_image_steps=12,
                            eval_every=1000, eval_items=2)
    first = train.train(cfg, None, progress=False)["losses"]
    assert len(first) == 12
    assert sum(first[-3:]) / 3 < 0.7 * sum(first[:3]) / 3, first
    again = train.train(train.TrainConfig(**{**cfg.as_dict(), "steps": 3}), None,
                        progress=False)["losses"]
    assert again == first[:3]


def test_shipped_weights_match_their_manifest():
    path = demo_model_path()
    info = manifest(path)
    assert info["model.safetensors_sha256"] == sha256_file(path / "model.safetensors")
    assert info["command"].startswith("python -m lookm_vllm.demo.train")
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["image_seq_length"] == 64
    assert config["text_config"]["num_key_value_heads"] < config["text_config"][
        "num_attention_heads"]  # GQA
    # vLLM's key layout for the CLIP tower
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("vision_tower.vision_model.") for k in keys)
    assert not any(k.startswith("vision_tower.") and ".vision_model." not in k
                   and not k.startswith("vision_tower.vision_model.") for k in keys)


def test_a_damaged_file_is_refused(tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(DEMO_MODEL_DIR, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        demo_model_path(copy)
    with pytest.raises(FileNotFoundError, match="lookm_vllm.demo.train"):
        demo_model_path(tmp_path / "nothing")


# ----------------------------------------------------------------------------------------------
# Through vLLM (one engine, lookm-eval in a subprocess)
# ----------------------------------------------------------------------------------------------
HELDOUT_SAMPLES = 20  # per task


def _exact(records) -> float:
    """Exact answers: the whole prediction is the sentence the model was taught."""
    return 100.0 * sum(r["prediction"].strip() == shapes.spoken(shapes.FRAMED, r["response"])
                       for r in records) / len(records)


@pytest.mark.engine
def test_heldout_accuracy_through_vllm_with_and_without_compression(tmp_path):
    pytest.importorskip("vllm")
    from lookm_vllm.eval.runner import PredictionFile

    data, out = tmp_path / "data", tmp_path / "out"
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "lookm_vllm.eval", *map(str, args)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
                              check=False)
        assert proc.returncode == 0, proc.stderr[-6000:]
        return proc.stdout

    cli("generate", data, "--tasks", *shapes.TASKS, "--samples", HELDOUT_SAMPLES,
        "--images", 4, "--seed", 1)
    cli("run", "--model", "demo", "--tasks", data, "--out", out, "--methods", "none",
        "lookm-pivotal", "streaming", "--budgets", 0.05, 0.2, "--max-tokens", 6,
        "--no-progress")

    def accuracy(cell: str) -> float:
        records = [r for task in shapes.TASKS for r in PredictionFile(out, task, cell).records()]
        assert len(records) == len(shapes.TASKS) * HELDOUT_SAMPLES
        return _exact(records)

    full, lookm = accuracy("none"), accuracy("lookm-pivotal@0.2")
    damaged = accuracy("streaming@0.05")
    print(f"exact match: full {full:.1f}, lookm@0.2 {lookm:.1f}, streaming@0.05 {damaged:.1f}")
    assert full >= 90.0
    assert lookm >= full - 10.0
    # A damaged cache loses answers. The model says "It is <color>": the color is the third
    # token, decided from the compressed cache (vLLM samples the first from the prefill, LOOK-M
    # compresses in the next step). StreamingLLM at budget 0.05 keeps the attention sinks and
    # the recent window (17 % of the KV), no image: measured 2026-12-06 on 100 held-out items,
    # 36 % exact against 100 %.
    assert damaged <= full - 20.0


# ----------------------------------------------------------------------------------------------
# The grid's scoring variants (lookm-eval run --scoring, lookm-eval demo)
# ----------------------------------------------------------------------------------------------
def test_scoring_variants_in_the_grid():
    from lookm_vllm.eval.cli import DEMO_METHODS, DEMO_SCORINGS
    from lookm_vllm.eval.grid import build_grid, method_fields, with_scorings

    assert method_fields("h2o+window") == {"method": "h2o", "scoring": "window"}
    assert method_fields("lookm-average+full") == {"method": "lookm", "merge": "average",
                                                   "scoring": "full"}
    for bad in ("h2o+sideways", "none+window"):
        with pytest.raises(ValueError):
            method_fields(bad)
    names = with_scorings(DEMO_METHODS, DEMO_SCORINGS)
    # scored methods twice, the full cache and the methods that do not score once
    assert names == ["none", "lookm-pivotal+full", "lookm-pivotal+window", "lookm-average+full",
                     "lookm-average+window", "lookm-weighted+full", "lookm-weighted+window",
                     "h2o+full", "h2o+window", "snapkv+full", "snapkv+window", "streaming",
                     "random"]
    cells = build_grid(names, [0.05, 0.1, 0.2, 0.5])
    assert len(cells) == 1 + 12 * 4
    by_name = {c.name: c.config for c in cells}
    assert by_name["h2o+window@0.2"].scoring == "window"
    assert by_name["snapkv+full@0.2"].scoring == "full"
    assert by_name["lookm-weighted+window@0.05"].merge == "weighted"
    assert by_name["lookm-pivotal+full@0.1"].recent_ratio == pytest.approx(0.05)
