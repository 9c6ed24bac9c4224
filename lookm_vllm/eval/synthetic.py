"""Small synthetic tasks in MileBench's layout, from real photos that ship in packages (offline).

Four tasks, each ``<out>/<Task>/<Task>.json`` + ``<out>/<Task>/images/<photo>.jpg``:

* ``SynthImageNeedleInAHaystack``: K photos; "which image shows <label>?", answer the image
  number. Scored like MileBench's needles (the answer must be a word of the prediction).
* ``SynthTextNeedleInAHaystack``: K photos interleaved with filler text, one sentence of which
  hides a password; "what is the password?". Needle scoring.
* ``SynthVQA``: K photos; "what is shown in image j?" with a 4-way choice list (multi-choice,
  MileBench's option extraction and accuracy).
* ``SynthCaption``: K photos; "describe image j in one sentence", the reference a caption of
  the photo (open-ended, ROUGE-L).

The names route the metrics exactly as MileBench routes its own tasks. Everything is drawn from
``random.Random(seed)``: the same arguments write byte-identical JSON and images.

Two more tasks, ``SHAPE_TASKS``, are colored-shape questions (:mod:`lookm_vllm.demo.shapes`:
"What color is the shape in the framed image?", which the trained demo model answers, and "Is
there a red shape in any image?", which it does not), written from that module's held-out item
stream (never a training item), with PNG images.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from lookm_vllm.demo import shapes
from lookm_vllm.demo.images import PHOTO_NAMES, load_photo
from lookm_vllm.demo.tiny_models import CORPUS

# What each bundled photo shows: a short label (answers, choices) and a caption (ROUGE-L refs).
PHOTO_LABELS: dict[str, tuple[str, str]] = {
    "astronaut": ("an astronaut", "An astronaut in a white space suit stands in front of a flag."),
    "coffee": ("a cup of coffee", "A cup of coffee sits on a saucer on a table."),
    "chelsea": ("a cat", "A small orange cat looks at the camera."),
    "rocket": ("a rocket", "A rocket stands on the launch pad under a clear sky."),
    "motorcycle": ("a motorcycle", "A red motorcycle is parked in a room next to a wall."),
    "hubble_deep_field": ("distant galaxies", "A space telescope photo shows many galaxies."),
    "immunohistochemistry": ("stained cells", "A microscope image shows cells stained brown."),
    "retina": ("the retina of an eye", "The retina of an eye appears as an orange circle."),
    "grace_hopper": ("a woman in uniform", "A woman in a uniform with medals smiles."),
    "camera": ("a man with a camera", "A man with a camera stands on a field of grass."),
    "coins": ("coins", "Several coins of different sizes lie on a dark surface."),
    "moon": ("the moon", "The gray surface of the moon is covered with craters."),
    "clock": ("a clock", "A clock hangs on the wall and shows the time."),
    "brick": ("a brick wall", "The wall is made of gray bricks."),
}
PASSWORDS: tuple[str, ...] = ("apple", "river", "mountain", "violin", "lantern", "harbor",
                              "meadow", "falcon", "copper", "orchid", "glacier", "saddle")
TASKS: tuple[str, ...] = ("SynthImageNeedleInAHaystack", "SynthTextNeedleInAHaystack", "SynthVQA",
                          "SynthCaption")
SHAPE_TASKS: tuple[str, ...] = shapes.ALL_TASKS
ALL_TASKS: tuple[str, ...] = TASKS + SHAPE_TASKS
# Filler for the text needle: corpus lines that say nothing about "the image" or a question.
_FILLER = tuple(line.strip() for line in CORPUS.strip().splitlines()
                if line.strip() and not any(
                    w in line.lower()
                    for w in ("image", "picture", "photo", "answer", "question", "?")))

_INSTRUCTIONS = {
    "SynthImageNeedleInAHaystack": [
        ("You are given several images. Find the image that matches the question and answer "
         "with its number only.")],
    "SynthTextNeedleInAHaystack": [
        "Read the text between the images carefully and answer the question with one word."],
    "SynthVQA": [
        ("Look at the images and answer the question. You must choose your answer from the "
         "Choice List. ")],
    "SynthCaption": ["Look at the images and answer the question in one sentence."],
}
_QUESTION_TYPE = {"SynthImageNeedleInAHaystack": "open-ended",
                  "SynthTextNeedleInAHaystack": "open-ended",
                  "SynthVQA": "multi-choice", "SynthCaption": "open-ended"}


def available_photos() -> list[str]:
    """The bundled photos that have a label, in ``PHOTO_NAMES`` order."""
    return [name for name in PHOTO_NAMES if name in PHOTO_LABELS]


def _image_refs(count: int) -> str:
    return "".join(f"{{image#{i + 1}}}" for i in range(count))


def _sample(task: str, rng: random.Random, photos: Sequence[str], k: int) -> tuple[dict, list]:
    shown = rng.sample(list(photos), k)
    target = rng.randrange(k)
    label, caption = PHOTO_LABELS[shown[target]]
    instance: dict = {"images_path": [f"{p}.jpg" for p in shown]}
    if task == "SynthImageNeedleInAHaystack":
        instance["context"] = (f"{_image_refs(k)}\nQuestion: Which image shows {label}? "
                               "Answer with the number of the image.")
        response = str(target + 1)
    elif task == "SynthTextNeedleInAHaystack":
        password = rng.choice(PASSWORDS)
        needle_at = rng.randrange(k)
        parts = []
        for i in range(k):
            text = " ".join(rng.sample(_FILLER, 2))
            if i == needle_at:
                text += f" The password is {password}."
            parts.append(f"{{image#{i + 1}}}{text}\n")
        instance["context"] = "".join(parts) + "Question: What is the password?"
        response = password
    elif task == "SynthVQA":
        others = [PHOTO_LABELS[p][0] for p in photos if p != shown[target]]
        choices = rng.sample(others, 3) + [label]
        rng.shuffle(choices)
        instance["context"] = f"{_image_refs(k)}\nQuestion: What is shown in image {target + 1}?"
        instance["choice_list"] = choices
        response = label
    else:
        instance["context"] = (f"{_image_refs(k)}\nQuestion: Describe image {target + 1} in one "
                               "sentence.")
        response = caption
    return {"task_instruction_id": 0, "task_instance": instance, "response": response,
            "image_quantity_level": "Few"}, shown


def generate_task(out_dir: str | Path, task: str, *, num_samples: int = 20,
                  images_per_sample: int = 4, seed: int = 0) -> Path:
    """Write one synthetic task under ``out_dir``; returns its JSON file.

    Raises
    ------
    ValueError
        For an unknown task name, or more images per sample than labelled photos (or fewer than
        4 photos for the multiple-choice task's 4 options).
    """
    if task in SHAPE_TASKS:
        return generate_shapes_task(out_dir, task, num_samples=num_samples,
                                    images_per_sample=images_per_sample, seed=seed)
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; one of {', '.join(ALL_TASKS)}")
    photos = available_photos()
    if not 1 <= images_per_sample <= len(photos) or len(photos) < 4:
        raise ValueError(f"images_per_sample must be in [1, {len(photos)}] (labelled photos)")
    # One stream per task: adding a task does not change the others.
    rng = random.Random(f"{seed}:{task}")
    task_dir = Path(out_dir) / task
    (task_dir / "images").mkdir(parents=True, exist_ok=True)
    data, used = [], set()
    for sample_id in range(num_samples):
        item, shown = _sample(task, rng, photos, images_per_sample)
        data.append({"sample_id": sample_id, **item})
        used.update(shown)
    for name in sorted(used):
        target = task_dir / "images" / f"{name}.jpg"
        if not target.exists():
            load_photo(name).save(target, format="JPEG", quality=90)
    meta = {"task": task, "split": "synthetic", "num_sample": num_samples,
            "task_instruction": _INSTRUCTIONS[task], "question_type": _QUESTION_TYPE[task],
            "generator": {"seed": seed, "images_per_sample": images_per_sample}}
    path = task_dir / f"{task}.json"
    path.write_text(json.dumps({"meta_data": meta, "data": data}, indent=2) + "\n")
    return path


def generate_shapes_task(out_dir: str | Path, task: str, *, num_samples: int = 20,
                         images_per_sample: int = 4, seed: int = 0) -> Path:
    """Write one of the demo model's tasks (``SHAPE_TASKS``) from the held-out item stream
    ``shapes.item_rng("heldout", seed, i)``; images are ``images/<sample>_<k>.png``."""
    if task not in SHAPE_TASKS:
        raise ValueError(f"unknown shapes task {task!r}; one of {', '.join(SHAPE_TASKS)}")
    task_dir = Path(out_dir) / task
    (task_dir / "images").mkdir(parents=True, exist_ok=True)
    data = []
    for sample_id in range(num_samples):
        # One stream per task (the task name is part of the split): tasks do not share items.
        item = shapes.make_item(task, images_per_sample,
                                shapes.item_rng(f"heldout-{task}", seed, sample_id))
        names = [f"{sample_id}_{k}.png" for k in range(len(item.images))]
        for name, img in zip(names, item.images, strict=True):
            img.save(task_dir / "images" / name, format="PNG")
        data.append({"sample_id": sample_id, "task_instruction_id": 0,
                     "task_instance": {"context": shapes.context_text(len(names), item.question),
                                       "images_path": names},
                     "response": item.answer, "image_quantity_level": "Few"})
    meta = {"task": task, "split": "heldout", "num_sample": num_samples,
            "task_instruction": [shapes.INSTRUCTION], "question_type": shapes.QUESTION_TYPE,
            "generator": {"seed": seed, "images_per_sample": images_per_sample,
                          "module": "lookm_vllm.demo.shapes"}}
    path = task_dir / f"{task}.json"
    path.write_text(json.dumps({"meta_data": meta, "data": data}, indent=2) + "\n")
    return path


def generate_tasks(out_dir: str | Path, tasks: Sequence[str] = TASKS, **kwargs) -> list[Path]:
    """:func:`generate_task` for each of ``tasks``; returns the JSON files."""
    return [generate_task(out_dir, task, **kwargs) for task in tasks]
