"""Train the demo VLM: a small LLaVA-1.5 that answers the questions of :mod:`.shapes`.

    python -m lookm_vllm.demo.train [--out DIR] [--steps N] [--seed 0] [--log FILE]

Architecture (what stock vLLM 0.32 serves as ``LlavaForConditionalGeneration``, no custom code):
a CLIP ViT (hidden 128, 2 layers, 4 heads, 8-pixel patches on 64x64 images: 64 tokens per image,
CLS dropped, features of the last layer), LLaVA's 2-layer GELU projector, and a Llama LM (hidden
128, 4 layers, 4 query / 2 KV heads (GQA), MLP 512). About 1.5 M parameters. Tokenizer, chat
template and processor are those of the random-weight fixtures
(:func:`lookm_vllm.demo.tiny_models.build_tokenizer`, ``LLAVA_CHAT_TEMPLATE``).

Training: loss on the answer tokens only ("It is <color>" and ``</s>``), AdamW (0.9, 0.98),
weight decay 0.01, gradient clipping 1.0, batch 16, linear warm-up, constant, then linear decay
over the last fifth. Curriculum: one image per prompt first (the model learns to read a color),
then 2-4 images (it learns which image the question is about); one image count per batch, the
tasks of ``shapes.TASKS`` in turn. Items come from ``shapes.item_rng("train", seed, i)``; the
held-out check every ``--eval-every`` steps uses ``"heldout"`` items with 4 images (teacher-
forced exact match of every answer token); training stops at the first check that reaches
``--target-accuracy`` (else after ``--steps``; the shipped weights stopped at step 400, held-out
100 %, in 8 minutes on one core of a busy 2-core machine). Deterministic: seeded torch and item
generators, a fixed thread count (one torch thread by default: on a busy 2-core machine two
OpenMP threads per process made each step more than 10x slower, waiting for each other).

The saved folder is a Hugging Face model folder (weights renamed to vLLM's
``vision_tower.vision_model.*`` layout, see :mod:`.tiny_models`) plus ``lookm_demo.json``: the
command, the training log summary and the sha256 of ``model.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from . import shapes
from .tiny_models import (
    _CLIP_MEAN,
    _CLIP_STD,
    _LLAVA_RENAME,
    LLAVA_CHAT_TEMPLATE,
    LLAVA_SPECIAL_TOKENS,
    _save_model,
    build_tokenizer,
)
from .trained import DEMO_MODEL_DIR, MANIFEST, sha256_file

__all__ = ["DEFAULT_OUT", "TrainConfig", "build_untrained", "main", "train"]

# Where the shipped weights live (inside the package: installed with it).
DEFAULT_OUT = DEMO_MODEL_DIR
IMAGE_TOKENS = (shapes.IMAGE_SIZE // 8) ** 2


class TrainConfig:
    """Hyper-parameters (the defaults made the shipped weights)."""

    def __init__(self, **overrides: Any) -> None:
        self.seed = 0
        self.steps = 1500
        self.batch_size = 16
        self.lr = 2e-3
        self.warmup = 100
        self.single_image_steps = 200      # curriculum: K=1 first
        self.max_images = 4                # then K uniform in [2, max_images] (and 1 at times)
        self.eval_every = 100
        self.eval_items = 64
        self.target_accuracy = 0.99         # stop at the first check at or above it
        self.threads = 1
        for key, value in overrides.items():
            if not hasattr(self, key):
                raise TypeError(f"unknown training setting {key!r}")
            setattr(self, key, value)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def _tokenizer():
    return build_tokenizer(
        LLAVA_SPECIAL_TOKENS, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", chat_template=LLAVA_CHAT_TEMPLATE,
        extra_attributes={"image_token": "<image>"})


def _processor(tok):
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = shapes.IMAGE_SIZE
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        do_center_crop=True, do_resize=True, do_normalize=True, do_convert_rgb=True,
        image_mean=_CLIP_MEAN, image_std=_CLIP_STD)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                          vision_feature_select_strategy="default",
                          chat_template=LLAVA_CHAT_TEMPLATE, image_token="<image>",
                          num_additional_image_tokens=1)


def build_untrained(seed: int = 0):
    """(model, processor): the architecture above with transformers' own random init."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    tok = _tokenizer()
    processor = _processor(tok)
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                              num_attention_heads=4, image_size=shapes.IMAGE_SIZE, patch_size=8,
                              projection_dim=128, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=512,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=32, max_position_embeddings=4096, rms_norm_eps=1e-6,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         projector_hidden_act="gelu", image_seq_length=IMAGE_TOKENS,
                         tie_word_embeddings=False)
    config.dtype = torch.float32
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    return model, processor


class Batcher:
    """Turns :class:`shapes.Item` lists into model inputs (prompt ids as ``lookm-eval`` renders
    them, images expanded to their 64 placeholder tokens, labels on the answer only)."""

    def __init__(self, processor) -> None:
        self.processor = processor
        self.tok = processor.tokenizer
        self.image_id = self.tok.convert_tokens_to_ids("<image>")
        self._prompt_cache: dict[tuple[int, str], list[int]] = {}

    def prompt(self, num_images: int, question: str) -> str:
        text = shapes.prompt_text(num_images, question)
        return self.tok.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": text}]}],
            tokenize=False, add_generation_prompt=True)

    def prompt_ids(self, num_images: int, question: str) -> list[int]:
        key = (num_images, question)
        if key not in self._prompt_cache:
            ids = self.tok(self.prompt(num_images, question), add_special_tokens=False)["input_ids"]
            out: list[int] = []
            for i in ids:
                out.extend([i] * IMAGE_TOKENS if i == self.image_id else [i])
            self._prompt_cache[key] = out
        return self._prompt_cache[key]

    def answer_ids(self, answer: str) -> list[int]:
        # The chat template writes "ASSISTANT:" then, for an answer, " <answer></s>".
        return self.tok(" " + answer, add_special_tokens=False)["input_ids"] + [
            self.tok.eos_token_id]

    def __call__(self, items: list[shapes.Item]) -> dict[str, Any]:
        import torch

        seqs, labels = [], []
        for item in items:
            p = self.prompt_ids(len(item.images), item.question)
            a = self.answer_ids(shapes.spoken(item.task, item.answer))
            seqs.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(len(s) for s in seqs)
        pad = self.tok.pad_token_id
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        lab = torch.full((len(seqs), width), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for n, (s, lb) in enumerate(zip(seqs, labels, strict=True)):
            ids[n, :len(s)] = torch.tensor(s)
            lab[n, :len(lb)] = torch.tensor(lb)
            mask[n, :len(s)] = 1
        images = [img for item in items for img in item.images]
        pixels = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return {"input_ids": ids, "attention_mask": mask, "labels": lab, "pixel_values": pixels}


def _items(split: str, seed: int, start: int, count: int, num_images: int) -> list[shapes.Item]:
    out = []
    for i in range(start, start + count):
        rng = shapes.item_rng(split, seed, i)
        task = shapes.TASKS[i % len(shapes.TASKS)]
        out.append(shapes.make_item(task, num_images, rng))
    return out


def exact_match(model, batch: dict[str, Any]) -> float:
    """Teacher-forced exact match: every answer token (and ``</s>``) is the argmax."""
    import torch

    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    pred = logits[:, :-1].argmax(-1)
    target = batch["labels"][:, 1:]
    ok = (pred == target) | (target == -100)
    return ok.all(dim=1).float().mean().item()


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    decay_from = int(cfg.steps * 0.8)
    if step < decay_from:
        return cfg.lr
    return cfg.lr * max(0.05, (cfg.steps - step) / max(1, cfg.steps - decay_from))


def _num_images(cfg: TrainConfig, step: int) -> int:
    if step < cfg.single_image_steps:
        return 1
    r = random.Random(f"k:{cfg.seed}:{step}")
    return 1 if r.random() < 0.1 else r.randint(2, cfg.max_images)


def train(cfg: TrainConfig, out: str | Path | None, *, log: str | Path | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Train from scratch; save to ``out`` (unless ``None``). Returns the summary (losses,
    held-out exact match per check)."""
    import torch
    from tqdm import tqdm

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, processor = build_untrained(cfg.seed)
    batcher = Batcher(processor)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
    heldout = batcher(_items("heldout", cfg.seed, 0, cfg.eval_items, 4))
    log_f = open(log, "a", encoding="utf-8") if log else None  # noqa: SIM115
    summary: dict[str, Any] = {"losses": [], "heldout_exact_match": []}
    start = time.time()

    def record(entry: dict[str, Any]) -> None:
        entry["elapsed_s"] = round(time.time() - start, 1)
        if log_f:
            log_f.write(json.dumps(entry) + "\n")
            log_f.flush()

    try:
        bar = tqdm(range(cfg.steps), unit="step", disable=not progress, dynamic_ncols=True)
        smooth = None
        for step in bar:
            model.train()
            k = _num_images(cfg, step)
            batch = batcher(_items("train", cfg.seed, step * cfg.batch_size, cfg.batch_size, k))
            for group in opt.param_groups:
                group["lr"] = _lr(cfg, step)
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            value = loss.item()
            summary["losses"].append(value)
            smooth = value if smooth is None else 0.95 * smooth + 0.05 * value
            bar.set_postfix(loss=f"{smooth:.3f}", images=k)
            record({"step": step, "images": k, "loss": round(value, 5),
                    "lr": _lr(cfg, step)})
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                model.eval()
                acc = exact_match(model, heldout)
                summary["heldout_exact_match"].append((step + 1, acc))
                bar.write(f"step {step + 1}: loss {smooth:.4f}, held-out exact match "
                          f"(4 images, teacher-forced) {acc:.3f}")
                record({"step": step + 1, "heldout_exact_match": acc})
                if acc >= cfg.target_accuracy:
                    bar.write(f"held-out exact match {acc:.3f} >= target "
                              f"{cfg.target_accuracy}: stopping")
                    break
                if out is not None:
                    save(model, processor, out, cfg, summary)
    finally:
        if log_f:
            log_f.close()
    summary["train_seconds"] = round(time.time() - start, 1)
    if out is not None:
        save(model, processor, out, cfg, summary)
    return summary


def save(model, processor, out: str | Path, cfg: TrainConfig, summary: dict[str, Any]) -> Path:
    """Write the model folder (vLLM's key layout) and its manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    _save_model(model, out, rename=_LLAVA_RENAME)
    processor.save_pretrained(out)
    processor.tokenizer.save_pretrained(out)
    losses = summary["losses"]
    manifest = {
        "model": "LOOK-M demo VLM (LLaVA-1.5 layout) trained on lookm_vllm.demo.shapes",
        "command": "python -m lookm_vllm.demo.train" + "".join(
            f" --{k.replace('_', '-')} {v}" for k, v in cfg.as_dict().items()
            if v != getattr(TrainConfig(), k)),
        "config": cfg.as_dict(),
        "steps_done": len(losses),
        "final_loss_mean_last_50": (round(sum(losses[-50:]) / len(losses[-50:]), 5)
                                    if losses else None),
        "heldout_exact_match": summary["heldout_exact_match"],
        "train_seconds": summary.get("train_seconds"),
        "model.safetensors_sha256": sha256_file(out / "model.safetensors"),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m lookm_vllm.demo.train",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help=f"model folder to write (default: the shipped one, {DEFAULT_OUT})")
    parser.add_argument("--log", default=None, help="append a JSON line per step to this file")
    parser.add_argument("--no-progress", action="store_true")
    for key, value in defaults.as_dict().items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{k: getattr(args, k) for k in defaults.as_dict()})
    summary = train(cfg, args.out, log=args.log, progress=not args.no_progress)
    last = summary["heldout_exact_match"][-1] if summary["heldout_exact_match"] else None
    steps = len(summary["losses"])
    print(f"trained {steps} steps in {summary['train_seconds']} s; held-out exact match "
          f"(teacher-forced) {last}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
