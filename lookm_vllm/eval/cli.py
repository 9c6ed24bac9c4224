"""``lookm-eval``: MileBench-format evaluation of LOOK-M and its baselines on vLLM.

    lookm-eval generate DATA_DIR [--samples 20] [--images 4] [--seed 0]
    lookm-eval run --model MODEL --tasks DATA_DIR --out RESULTS [--methods ...] [--budgets ...]
    lookm-eval report RESULTS
    lookm-eval demo [--out results/demo-eval] [--samples 100]

``run`` renders each task's prompts with the model's chat template, generates greedily for the
full cache and every method x budget (resuming from what ``RESULTS/predictions`` holds), then
writes ``results.json``, ``results.csv`` and ``scores.png`` and prints the table. The engine runs
in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set). See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from lookm_vllm.demo.shapes import TASKS as DEMO_TASKS  # the tasks the demo model answers

from .grid import (
    DEFAULT_BUDGETS,
    DEFAULT_METHODS,
    DEFAULT_RECENT_SHARE,
    build_grid,
    with_scorings,
)
from .milebench import TaskFormatError
from .runner import DEFAULT_BATCH_SIZE, SettingsMismatch
from .synthetic import ALL_TASKS, SHAPE_TASKS
from .synthetic import TASKS as SYNTHETIC_TASKS

# ``lookm-eval demo``: the trained demo model on its held-out tasks, every method, both scorings.
DEMO_METHODS: tuple[str, ...] = ("none", "lookm-pivotal", "lookm-average", "lookm-weighted",
                                 "h2o", "snapkv", "streaming", "random")
DEMO_BUDGETS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5)
DEMO_SCORINGS: tuple[str, ...] = ("full", "window")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lookm-eval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="write small synthetic tasks in MileBench's format")
    gen.add_argument("out", help="folder to write <Task>/<Task>.json and <Task>/images/ into")
    gen.add_argument("--tasks", nargs="+", default=list(SYNTHETIC_TASKS),
                     choices=ALL_TASKS, metavar="TASK",
                     help=f"which tasks (default: all of {', '.join(SYNTHETIC_TASKS)}; the "
                          f"colored-shape tasks: {', '.join(SHAPE_TASKS)}; the trained demo "
                          f"model answers {', '.join(DEMO_TASKS)})")
    gen.add_argument("--samples", type=int, default=20, help="items per task (default 20)")
    gen.add_argument("--images", type=int, default=4, help="images per item (default 4)")
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=_generate)

    run = sub.add_parser("run", help="generate predictions for the grid, then report")
    run.add_argument("--model", required=True,
                     help="model path or hub id (or demo: the trained demo model; "
                          "tiny-llava[:TOKENS_PER_IMAGE], tiny-qwen2vl: random weights)")
    run.add_argument("--tasks", nargs="+", required=True,
                     help="task files, task folders, or folders of task folders")
    run.add_argument("--out", required=True, help="results folder (reused to resume)")
    run.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                     help="method names (see lookm_vllm.eval.grid; the full cache 'none' is "
                          f"always run). Default: {' '.join(DEFAULT_METHODS)}")
    run.add_argument("--budgets", nargs="+", type=float, default=list(DEFAULT_BUDGETS),
                     help="KV budgets, fractions of the prompt (default 0.1 0.2 0.5)")
    run.add_argument("--scoring", nargs="+", choices=DEMO_SCORINGS, default=None,
                     help="run every method that ranks by attention once per scoring "
                          "(labelled <method>+full, <method>+window); default: each method's "
                          "own (window for snapkv, full otherwise)")
    run.add_argument("--recent-share", type=float, default=DEFAULT_RECENT_SHARE,
                     help="share of each budget given to the recent window (default 0.5)")
    run.add_argument("--max-tokens", type=int, default=512,
                     help="greedy output tokens per item (default 512, MileBench's)")
    run.add_argument("--limit", type=int, default=None, help="only the first N items per task")
    run.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                     help="requests per engine call; predictions are saved after each "
                          f"(default {DEFAULT_BATCH_SIZE}; larger keeps a GPU busier)")
    run.add_argument("--max-context-tokens", type=int, default=None,
                     help="truncate instruction+context to N tokens MileBench's way "
                          "(LOOK-M/MileBench with LLaVA-1.5: 4096); default: no truncation")
    run.add_argument("--image-tokens", type=int, default=None,
                     help="tokens per image for truncation (default: the model config's "
                          "image_seq_length)")
    run.add_argument("--engine-args", type=_json_object, default={},
                     help="JSON object of extra vllm.LLM arguments, e.g. "
                          "'{\"max_model_len\": 4608, \"dtype\": \"float16\"}'")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=_run)

    demo = sub.add_parser(
        "demo", help="the trained demo model's accuracy table: its held-out tasks, none, LOOK-M "
                     "(pivotal, average, weighted), h2o, snapkv, streaming and random at budgets "
                     "0.05 0.1 0.2 0.5, full and window scoring")
    demo.add_argument("--out", default="results/demo-eval",
                      help="results folder (reused to resume; the tasks go to OUT/data)")
    demo.add_argument("--samples", type=int, default=100, help="items per task (default 100)")
    demo.add_argument("--images", type=int, default=4, help="images per item (default 4)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)

    rep = sub.add_parser("report", help="(re)build the table and plot from saved predictions")
    rep.add_argument("out", help="results folder of a previous run")
    rep.set_defaults(func=_report)
    return parser


def _generate(args: argparse.Namespace) -> int:
    from .synthetic import generate_tasks

    for path in generate_tasks(args.out, args.tasks, num_samples=args.samples,
                               images_per_sample=args.images, seed=args.seed):
        print(path)
    return 0


def _image_tokens(model_path: str) -> int:
    from transformers import AutoConfig

    value = getattr(AutoConfig.from_pretrained(model_path), "image_seq_length", None)
    if value is None:
        raise ValueError(f"{model_path}: the config has no image_seq_length; pass --image-tokens")
    return int(value)


def _run(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from transformers import AutoProcessor

    from .engine import VllmBackend, resolve_model
    from .milebench import find_task_files, load_task
    from .report import format_table, report
    from .runner import PromptBuilder, execute, plan_run

    extra = args.engine_args
    tasks = [load_task(p) for p in find_task_files(args.tasks)]
    methods = with_scorings(args.methods, args.scoring) if args.scoring else args.methods
    cells = build_grid(methods, args.budgets, args.recent_share)
    model_path, engine_kwargs = resolve_model(args.model)
    engine_kwargs.update(extra)
    image_tokens = args.image_tokens
    if args.max_context_tokens is not None and image_tokens is None:
        image_tokens = _image_tokens(model_path)
    builder = PromptBuilder(AutoProcessor.from_pretrained(model_path),
                            max_context_tokens=args.max_context_tokens, image_tokens=image_tokens)
    settings = {"model": model_path, "max_context_tokens": args.max_context_tokens,
                "image_tokens": image_tokens, "engine_args": extra}
    plan = plan_run(tasks, cells, builder, args.out, max_tokens=args.max_tokens,
                    base_settings=settings, limit=args.limit)
    total = sum(len(t.samples[:args.limit]) for t in tasks) * len(cells)
    print(f"{len(tasks)} task(s) x {len(cells)} cell(s): {plan.pending} of {total} item runs to "
          f"generate ({total - plan.pending} already in {args.out})", flush=True)

    def backend(max_images: int) -> VllmBackend:
        kwargs: dict[str, Any] = dict(engine_kwargs)
        if "limit_mm_per_prompt" not in extra:
            kwargs["limit_mm_per_prompt"] = {"image": max_images}
        return VllmBackend(kwargs)

    execute(plan, backend, batch_size=args.batch_size, progress=not args.no_progress)
    table = report(args.out, [c.name for c in cells], [t.name for t in tasks])
    print(format_table(table))
    print(f"wrote {args.out}/results.json, results.csv, scores.png")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .synthetic import generate_tasks

    data = Path(args.out) / "data"
    for path in generate_tasks(data, DEMO_TASKS, num_samples=args.samples,
                               images_per_sample=args.images, seed=args.seed):
        print(path)
    run = _parser().parse_args([
        "run", "--model", "demo", "--tasks", str(data), "--out", args.out,
        "--methods", *DEMO_METHODS, "--budgets", *map(str, DEMO_BUDGETS),
        "--scoring", *DEMO_SCORINGS, "--max-tokens", "8", "--batch-size", str(args.batch_size),
        *(["--no-progress"] if args.no_progress else [])])
    return _run(run)


def _report(args: argparse.Namespace) -> int:
    from .report import format_table, report

    print(format_table(report(args.out)))
    print(f"wrote {args.out}/results.json, results.csv, scores.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lookm-eval`` and ``python -m lookm_vllm.eval``."""
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    # TaskFormatError names the file and field; pydantic's ValueErrors name the config field.
    except (TaskFormatError, SettingsMismatch, FileNotFoundError, ValueError) as exc:
        print(f"lookm-eval: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
