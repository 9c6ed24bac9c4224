"""MileBench tasks on disk: loading with clear errors, the prompt text, truncation, task groups.

Layout (as MileBench's ``generate.py``/``evaluate.py`` read it, and as the released archives
unpack): one folder per task, ``<root>/<Task>/<Task>.json`` plus ``<root>/<Task>/images/``::

    {"meta_data": {"task": ..., "question_type": "multi-choice" | "open-ended" | ...,
                   "task_instruction": ["instruction 0", ...], "num_sample": N, ...},
     "data": [{"sample_id": 0, "task_instruction_id": 0,
               "task_instance": {"context": "{image#1} ... {image#2} ... Question: ...",
                                 "images_path": ["0.jpg", "1.jpg"],      # relative to images/
                                 "choice_list": ["...", ...]},          # multi-choice only
               "response": "...", "image_quantity_level": "Few"}, ...]}

``meta_data`` may also be spelled ``metadata`` (MileBench's per-task READMEs use that spelling;
its code reads ``meta_data``). ``{table#i}`` placeholders are images too (MileBench treats them
alike). Which metric a task gets follows MileBench (:func:`lookm_vllm.eval.metrics.metric_for`).

The prompt text is MileBench's: ``task_instruction + "\\n" + context``, where a multiple-choice
context gets ``"\\nChoice list: \\nA. ...\\nB. ...\\nYour answer is: "`` appended (GPR1200: no
letters), and each placeholder becomes the model's image in place (:class:`Segment`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .metrics import Metric, metric_for, normalize_answer, option_letter

# MileBench's task taxonomy (its paper's task table; the codes are its column names), in the
# order of its tables. Task names are the released folder names.
TASK_GROUPS: dict[str, tuple[str, ...]] = {
    "T-1": ("ActionLocalization", "ActionPrediction", "ActionSequence"),
    "T-2": ("ObjectExistence", "ObjectInteraction", "MovingAttribute", "ObjectShuffle"),
    "T-3": ("EgocentricNavigation", "MovingDirection"),
    "T-4": ("CounterfactualInference", "StateChange", "CharacterOrder", "SceneTransition"),
    "S-1": ("WebQA", "TQA", "MultiModalQA", "WikiVQA"),
    "S-2": ("SlideVQA", "OCR-VQA", "DocVQA"),
    "S-3": ("Spot-the-Diff", "CLEVR-Change", "IEdit"),
    "S-4": ("MMCoQA", "ALFRED"),
    "S-5": ("nuscenes",),
    "N-1": ("TextNeedleInAHaystack",),
    "N-2": ("ImageNeedleInAHaystack",),
    "I-1": ("GPR1200",),
}
GROUP_OF_TASK: dict[str, str] = {t: g for g, tasks in TASK_GROUPS.items() for t in tasks}

_PLACEHOLDER = re.compile(r"\{(image|table)#(\d+)\}")


class TaskFormatError(ValueError):
    """A task file or its images do not match the MileBench layout; names the file and field."""

    def __init__(self, path: Path | str, field: str, problem: str) -> None:
        self.path, self.field, self.problem = Path(path), field, problem
        super().__init__(f"{path}: {field}: {problem}")


@dataclass(frozen=True)
class Sample:
    """One MileBench item, validated."""

    sample_id: int | str
    instruction: str
    context: str
    images: tuple[Path, ...]
    response: str
    choice_list: tuple[str, ...] | None


@dataclass(frozen=True)
class Task:
    """One MileBench task (a ``<Task>/<Task>.json`` file and its images), validated."""

    name: str
    path: Path
    question_type: str
    metric: Metric
    samples: tuple[Sample, ...]

    @property
    def group(self) -> str | None:
        """MileBench's group code (``T-1`` ... ``I-1``), ``None`` for a task outside MileBench."""
        return GROUP_OF_TASK.get(self.name)


@dataclass(frozen=True)
class Segment:
    """A piece of a prompt: text, or the image at ``image`` (an index into the sample's images)."""

    text: str = ""
    image: int | None = None


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def find_task_files(paths: Iterable[str | Path]) -> list[Path]:
    """Task JSON files from paths that are task files, task folders or folders of task folders."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.append(path)
        elif (path / f"{path.name}.json").is_file():
            found.append(path / f"{path.name}.json")
        elif path.is_dir():
            inner = sorted(p / f"{p.name}.json" for p in path.iterdir()
                           if (p / f"{p.name}.json").is_file())
            if not inner:
                raise FileNotFoundError(
                    f"{path}: no MileBench task here (expected {path.name}.json, or sub-folders "
                    "<Task>/<Task>.json)")
            found.extend(inner)
        else:
            raise FileNotFoundError(f"{path}: no such task file or folder")
    found = list(dict.fromkeys(p.resolve() for p in found))
    names = [p.stem for p in found]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(f"several task files named {', '.join(clash)}: predictions are kept per "
                         "task name, give one of each")
    return found


def _need(obj: Any, kind: type | tuple[type, ...], path: Path, field: str) -> Any:
    if not isinstance(obj, kind) or isinstance(obj, bool) and kind is not bool:
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise TaskFormatError(path, field, f"expected {names}, got {type(obj).__name__}")
    return obj


def _field(obj: dict, key: str, kind: type | tuple[type, ...], path: Path, where: str) -> Any:
    if key not in obj:
        raise TaskFormatError(path, f"{where}.{key}" if where else key, "missing")
    return _need(obj[key], kind, path, f"{where}.{key}" if where else key)


def load_task(path: str | Path, *, check_images: bool = True) -> Task:
    """Read and validate one MileBench task file (and, by default, that its images exist).

    Raises
    ------
    TaskFormatError
        Naming the file and the offending field (e.g. ``data[3].task_instance.images_path[1]``).
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TaskFormatError(path, "(file)", f"not valid JSON: {exc}") from None
    _need(raw, dict, path, "(top level)")
    meta_key = next((k for k in ("meta_data", "metadata") if k in raw), "meta_data")
    meta = _field(raw, meta_key, dict, path, "")
    instructions = _field(meta, "task_instruction", list, path, meta_key)
    for i, text in enumerate(instructions):
        _need(text, str, path, f"{meta_key}.task_instruction[{i}]")
    question_type = _field(meta, "question_type", str, path, meta_key)
    name = path.stem
    try:
        metric = metric_for(name, question_type)
    except ValueError as exc:
        raise TaskFormatError(path, f"{meta_key}.question_type", str(exc)) from None
    data = _field(raw, "data", list, path, "")
    if not data:
        raise TaskFormatError(path, "data", "no samples")
    image_dir = path.parent / "images"
    samples, seen = [], set()
    for n, item in enumerate(data):
        where = f"data[{n}]"
        _need(item, dict, path, where)
        sample_id = _field(item, "sample_id", (int, str), path, where)
        if sample_id in seen:
            raise TaskFormatError(path, f"{where}.sample_id", f"duplicate sample_id {sample_id!r}")
        seen.add(sample_id)
        instruction_id = _field(item, "task_instruction_id", int, path, where)
        if not 0 <= instruction_id < len(instructions):
            raise TaskFormatError(path, f"{where}.task_instruction_id",
                                  f"{instruction_id} is not an index of "
                                  f"{meta_key}.task_instruction ({len(instructions)} entries)")
        instance = _field(item, "task_instance", dict, path, where)
        context = _field(instance, "context", str, path, f"{where}.task_instance")
        images_path = _field(instance, "images_path", list, path, f"{where}.task_instance")
        images = []
        for i, rel in enumerate(images_path):
            field = f"{where}.task_instance.images_path[{i}]"
            image = image_dir / _need(rel, str, path, field)
            if check_images and not image.is_file():
                raise TaskFormatError(path, field, f"image file not found: {image}")
            images.append(image)
        for match in _PLACEHOLDER.finditer(context):
            if not 1 <= int(match.group(2)) <= len(images):
                raise TaskFormatError(path, f"{where}.task_instance.context",
                                      f"placeholder {match.group(0)} but images_path has "
                                      f"{len(images)} entries")
        # MileBench does str(ann["response"]): numbers are valid answers.
        response = str(_field(item, "response", (str, int, float), path, where))
        choices = None
        if "choice_list" in instance:
            raw_choices = _field(instance, "choice_list", list, path, f"{where}.task_instance")
            choices = tuple(str(_need(c, (str, int, float), path,
                                      f"{where}.task_instance.choice_list[{i}]"))
                            for i, c in enumerate(raw_choices))
        if metric == "accuracy":
            if not choices:
                raise TaskFormatError(path, f"{where}.task_instance.choice_list",
                                      "missing (question_type is multi-choice)")
            if normalize_answer(response) not in [normalize_answer(c) for c in choices]:
                raise TaskFormatError(path, f"{where}.response",
                                      f"{response!r} is not one of task_instance.choice_list")
        samples.append(Sample(sample_id, instructions[instruction_id], context, tuple(images),
                              response, choices))
    return Task(name, path, question_type, metric, tuple(samples))


# ---------------------------------------------------------------------------------------------
# Prompt text
# ---------------------------------------------------------------------------------------------


def context_with_choices(task_name: str, sample: Sample) -> str:
    """The context MileBench builds: the choice list appended for multiple choice."""
    if sample.choice_list is None:
        return sample.context
    # GPR1200 has more options than letters: MileBench lists its options without letters.
    lines = [(f"{option_letter(i)}. " if task_name != "GPR1200" else "") + c
             for i, c in enumerate(sample.choice_list)]
    return sample.context + "\nChoice list: \n" + "\n".join(lines) + "\nYour answer is: "


def prompt_segments(task_name: str, sample: Sample) -> list[Segment]:
    """``instruction + "\\n" + context`` as text and image segments, images where referenced.

    An image that the context never references is placed, in ``images_path`` order, before the
    context (MileBench passes every image of ``images_path`` to the model).
    """
    context = context_with_choices(task_name, sample)
    referenced = {int(m.group(2)) - 1 for m in _PLACEHOLDER.finditer(context)}
    segments = [Segment(text=sample.instruction + "\n")]
    segments += [Segment(image=i) for i in range(len(sample.images)) if i not in referenced]
    pos = 0
    for m in _PLACEHOLDER.finditer(context):
        segments.append(Segment(text=context[pos:m.start()]))
        segments.append(Segment(image=int(m.group(2)) - 1))
        pos = m.end()
    segments.append(Segment(text=context[pos:]))
    return [s for s in segments if s.image is not None or s.text]


def truncate_segments(segments: Sequence[Segment], count_tokens: Callable[[str], int],
                      max_tokens: int, image_tokens: int) -> list[Segment]:
    """MileBench's (and LOOK-M's) context truncation: keep the instruction and the end.

    The first segment is the instruction (never cut). The rest is walked from the end: each text
    piece then the image before it are kept while the running count (text tokens, plus
    ``image_tokens`` per image) stays within ``max_tokens - len(instruction)``; the first piece
    that does not fit ends the walk (if it is the very last text, its last tokens are kept; the
    cut text is re-tokenized by the caller's tokenizer, so the count is approximate). Nothing is
    changed when everything fits.
    """
    head, body = segments[0], list(segments[1:])
    budget = max_tokens - count_tokens(head.text)
    kept: list[Segment] = []
    used = 0
    for seg in reversed(body):
        cost = image_tokens if seg.image is not None else count_tokens(seg.text)
        if used + cost > budget:
            if not kept and seg.image is None:
                kept.append(Segment(text=_last_tokens(seg.text, count_tokens, budget)))
            break
        kept.append(seg)
        used += cost
    return [head] + kept[::-1]


def _last_tokens(text: str, count_tokens: Callable[[str], int], budget: int) -> str:
    """The longest suffix of ``text`` (cut at a character) with at most ``budget`` tokens."""
    lo, hi = 0, len(text)  # find the smallest start with count(text[start:]) <= budget
    while lo < hi:
        mid = (lo + hi) // 2
        if count_tokens(text[mid:]) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return text[lo:]
