"""Running the grid: chat-templated multi-image prompts, resumable predictions, the run loop.

Predictions go to ``<out>/predictions/<Task>/<cell>.jsonl``, one JSON object per item (with its
reference answer, so scoring needs only this file), appended after every batch; next to each
file, ``<cell>.settings.json`` records what produced it (model, decoding, truncation, engine
arguments, compression config, metric). A rerun skips the items already in the file
(a torn last line from an interrupted write is ignored and that item regenerated) and refuses to
mix settings: changing any of them needs a new ``--out`` (or deleting the files).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from .grid import Cell
from .milebench import Sample, Task, prompt_segments, truncate_segments

_PROBE = "\x00lookm-eval-probe\x00"
# Requests per engine call; predictions are appended after each call.
DEFAULT_BATCH_SIZE = 64


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One item to generate for: the rendered prompt and its images, in prompt order."""

    sample_id: int | str
    prompt: str
    images: tuple[Path, ...]


def _render(processor: Any, content: list[dict[str, Any]]) -> str:
    return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def image_placeholder(processor: Any) -> str:
    """The text the model's chat template writes for one image (e.g. ``"<image>\\n"``).

    Found by rendering one user turn with and without an image part: the template may place
    images anywhere (llava-hf's puts all images first), so the harness writes this text itself,
    in place, as MileBench's LLaVA worker does.

    Raises
    ------
    ValueError
        When adding an image does more than insert one piece of text.
    """
    with_image = _render(processor, [{"type": "image"}, {"type": "text", "text": _PROBE}])
    without = _render(processor, [{"type": "text", "text": _PROBE}])
    prefix = 0
    while prefix < min(len(with_image), len(without)) and with_image[prefix] == without[prefix]:
        prefix += 1
    suffix = 0
    while (suffix < len(without) - prefix
           and with_image[len(with_image) - 1 - suffix] == without[len(without) - 1 - suffix]):
        suffix += 1
    inserted = with_image[prefix:len(with_image) - suffix]
    if not inserted or prefix + suffix != len(without):
        raise ValueError("could not find the image placeholder of the model's chat template "
                         f"(rendered with an image: {with_image!r}, without: {without!r})")
    return inserted


class PromptBuilder:
    """Renders MileBench samples into chat-templated prompts for one model.

    Parameters
    ----------
    processor : transformers processor or tokenizer
        Anything with ``apply_chat_template`` (and a tokenizer, for truncation).
    max_context_tokens : int, optional
        Truncate MileBench's way (:func:`~lookm_vllm.eval.milebench.truncate_segments`) to this
        many instruction + context tokens; ``None``: no truncation.
    image_tokens : int, optional
        Tokens one image takes in the model, for truncation (LLaVA-1.5: 576).
    """

    def __init__(self, processor: Any, *, max_context_tokens: int | None = None,
                 image_tokens: int | None = None) -> None:
        if max_context_tokens is not None and image_tokens is None:
            raise ValueError("truncation (max_context_tokens) needs image_tokens")
        self.processor = processor
        self.placeholder = image_placeholder(processor)
        self.max_context_tokens = max_context_tokens
        self.image_tokens = image_tokens
        self._tokenizer = getattr(processor, "tokenizer", processor)

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def build(self, task: Task, sample: Sample) -> Request:
        segments = prompt_segments(task.name, sample)
        if self.max_context_tokens is not None:
            segments = truncate_segments(segments, self.count_tokens, self.max_context_tokens,
                                         self.image_tokens)
        text = "".join(self.placeholder if s.image is not None else s.text for s in segments)
        images = tuple(sample.images[s.image] for s in segments if s.image is not None)
        return Request(sample.sample_id, _render(self.processor, [{"type": "text", "text": text}]),
                       images)


# ---------------------------------------------------------------------------------------------
# Generation backends
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    """What the engine returned for one request."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    kv_compression: dict[str, Any] | None = None


class Backend(Protocol):
    """Greedy generation for a batch of requests under one compression config."""

    def generate(self, requests: Sequence[Request], compression: dict[str, Any],
                 max_tokens: int) -> list[Generation]: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# Predictions on disk
# ---------------------------------------------------------------------------------------------


class SettingsMismatch(RuntimeError):
    """Existing predictions were made with other settings than this run's."""


class PredictionFile:
    """The predictions of one (task, cell): a JSONL file plus its settings sidecar."""

    def __init__(self, out_dir: Path, task: str, cell: str) -> None:
        self.path = Path(out_dir) / "predictions" / task / f"{cell}.jsonl"
        self.settings_path = self.path.with_suffix(".settings.json")

    def settings(self) -> dict[str, Any] | None:
        if not self.settings_path.is_file():
            return None
        return json.loads(self.settings_path.read_text())

    def records(self) -> list[dict[str, Any]]:
        """The complete records in the file (a torn last line is skipped), first one per id."""
        if not self.path.is_file():
            return []
        out, seen = [], set()
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if str(record["sample_id"]) not in seen:
                seen.add(str(record["sample_id"]))
                out.append(record)
        return out

    def open_for(self, settings: dict[str, Any]) -> set[str]:
        """Check (or write) the settings; returns the ids already predicted.

        Raises
        ------
        SettingsMismatch
            Naming the file and the first differing setting.
        """
        existing = self.settings()
        if existing is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.settings_path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        elif existing != settings:
            key = next(k for k in sorted(set(existing) | set(settings))
                       if existing.get(k) != settings.get(k))
            raise SettingsMismatch(
                f"{self.path} was made with {key}={existing.get(key)!r}, this run has "
                f"{key}={settings.get(key)!r}: use another --out, or delete the file and "
                f"{self.settings_path.name} to redo it")
        if self.path.is_file():
            # An interrupted write leaves a line without its newline: cut it, so that the next
            # append starts on a line of its own.
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                self.path.write_bytes(data[:data.rfind(b"\n") + 1])
        return {str(r["sample_id"]) for r in self.records()}

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
            f.flush()


# ---------------------------------------------------------------------------------------------
# The run loop
# ---------------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    """What one invocation generates: every (task, cell) and its pending requests."""

    out_dir: Path
    base_settings: dict[str, Any]
    max_tokens: int
    work: list[tuple[Task, Cell, PredictionFile, list[Request]]] = field(default_factory=list)

    @property
    def pending(self) -> int:
        return sum(len(requests) for *_, requests in self.work)

    @property
    def max_images(self) -> int:
        return max((len(r.images) for *_, requests in self.work for r in requests), default=1)


def plan_run(tasks: Sequence[Task], cells: Sequence[Cell], builder: PromptBuilder,
             out_dir: str | Path, *, max_tokens: int, base_settings: dict[str, Any],
             limit: int | None = None) -> RunPlan:
    """Render every prompt and find, per (task, cell), the items not yet predicted.

    Raises
    ------
    SettingsMismatch
        When an existing predictions file was made with other settings.
    """
    plan = RunPlan(Path(out_dir), dict(base_settings), max_tokens)
    for task in tasks:
        requests = [builder.build(task, s) for s in task.samples[:limit]]
        for cell in cells:
            store = PredictionFile(plan.out_dir, task.name, cell.name)
            settings = {**plan.base_settings, "max_tokens": max_tokens, "task": task.name,
                        "metric": task.metric, "group": task.group,
                        "method": cell.method, "budget": cell.budget,
                        "compression": cell.request_config()}
            done = store.open_for(settings)
            plan.work.append((task, cell, store,
                              [r for r in requests if str(r.sample_id) not in done]))
    return plan


def _batches(items: Sequence[Request], size: int) -> Iterator[Sequence[Request]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def execute(plan: RunPlan, backend_factory: Callable[[int], Backend], *,
            batch_size: int = DEFAULT_BATCH_SIZE,
            progress: bool = True) -> int:
    """Generate every pending item, appending after each batch; returns how many were generated.

    ``backend_factory(max_images)`` is called only when something is pending, so a finished run
    resumes without starting an engine.
    """
    if plan.pending == 0:
        return 0
    samples = {(t.name, str(s.sample_id)): s for t, *_ in plan.work for s in t.samples}
    backend = backend_factory(plan.max_images)
    done = 0
    try:
        with tqdm(total=plan.pending, unit="item", disable=not progress) as bar:
            for task, cell, store, requests in plan.work:
                bar.set_description(f"{task.name} {cell.name}")
                for batch in _batches(requests, batch_size):
                    try:
                        outputs = backend.generate(batch, cell.request_config(), plan.max_tokens)
                    except Exception as exc:
                        ids = ", ".join(str(r.sample_id) for r in batch)
                        hint = (" (truncate long prompts with --max-context-tokens)"
                                if "length" in str(exc) else "")
                        raise RuntimeError(f"generation failed for task {task.name}, "
                                           f"{cell.name}, samples [{ids}]: {exc}{hint}") from exc
                    store.append([_record(samples[(task.name, str(r.sample_id))], r, g)
                                  for r, g in zip(batch, outputs, strict=True)])
                    done += len(batch)
                    bar.update(len(batch))
    finally:
        backend.close()
    return done


def _record(sample: Sample, request: Request, gen: Generation) -> dict[str, Any]:
    return {"sample_id": sample.sample_id, "prediction": gen.text, "token_ids": gen.token_ids,
            "response": sample.response, "choice_list": sample.choice_list,
            "prompt_tokens": gen.prompt_tokens, "num_images": len(request.images),
            "kv_compression": gen.kv_compression}
