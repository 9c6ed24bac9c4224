"""The evaluation harness: MileBench metrics on hand-worked cases, task files and their
errors, the synthetic generator, prompts and truncation, resumable predictions, the table, and the
whole ``lookm-eval`` CLI on a generated task with the tiny LLaVA (engine in a subprocess)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lookm_vllm.eval import metrics
from lookm_vllm.eval.grid import build_grid
from lookm_vllm.eval.milebench import (
    Sample,
    Segment,
    TaskFormatError,
    context_with_choices,
    find_task_files,
    load_task,
    prompt_segments,
    truncate_segments,
)
from lookm_vllm.eval.report import format_table, report
from lookm_vllm.eval.runner import (
    Generation,
    PredictionFile,
    PromptBuilder,
    SettingsMismatch,
    execute,
    image_placeholder,
    plan_run,
)
from lookm_vllm.eval.synthetic import generate_task, generate_tasks

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Metrics, against hand-worked cases (MileBench's rules, quirks included)
# ----------------------------------------------------------------------------------------------
OPTIONS = ["a cat", "a dog", "a clock", "an astronaut"]  # A, B, C, D


@pytest.mark.parametrize(("prediction", "expected"), [
    ("B. a dog", "B"),            # 1. "<letter> <option>" -> "b a dog" after normalization
    ("It is a dog", "B"),         # 2. the option text, spaces ignored: "itisadog" has "adog"
    ("I think a cat or a dog", "A"),  # 2. the leftmost option text wins
    ("b", "B"),                   # 3. a bare letter
    ("The answer is (B)", "AB"),  # 4. fallback: every option letter in the text ("a", "b")
    ("", "C"),                    # MileBench: an empty answer is option C
])
def test_option_extraction(prediction, expected):
    options = {metrics.option_letter(i): metrics.normalize_answer(o) for i, o in enumerate(OPTIONS)}
    assert metrics.extract_choice(metrics.normalize_answer(prediction), options) == expected


def test_multi_choice_accuracy():
    assert metrics.score("accuracy", "B. a dog", "a dog", OPTIONS) == 1.0
    assert metrics.score("accuracy", "The answer is (B)", "a dog", OPTIONS) == 0.0  # "AB"
    assert metrics.score("accuracy", "", "a clock", OPTIONS) == 1.0  # empty -> "C"
    assert metrics.score("accuracy", "A DOG!", "a dog", OPTIONS) == 1.0
    with pytest.raises(ValueError, match="not one of the choices"):
        metrics.score("accuracy", "B", "a horse", OPTIONS)


def test_normalization():
    assert metrics.normalize_answer("  Hello,   World!\n") == "hello   world"
    assert metrics.normalize_answer("It costs 3.5 dollars.") == "it costs 3.5 dollars"
    assert metrics.normalize_answer('"Yes"') == "yes"


def test_rouge_l_hand_worked():
    # LCS "the cat on the mat": 4 distinct words; 5 distinct words on each side -> P = R = 0.8.
    # (Textbook ROUGE-L counts repeats: 5/6. MileBench's rouge package counts distinct words.)
    assert metrics.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8)
    assert metrics.rouge_l("a dog", "a cat") == pytest.approx(0.5)  # LCS {a}: P = R = 1/2
    assert metrics.rouge_l("a a a", "a") == pytest.approx(1.0)  # distinct: {a} vs {a}
    assert metrics.rouge_l("x y z", "a b") == 0.0
    # the metric normalizes first; an empty prediction scores 0
    assert metrics.score("rouge_l", "The cat is on the mat.", "the cat is on the mat") == \
        pytest.approx(1.0)
    assert metrics.score("rouge_l", "", "the cat") == 0.0


def test_needle_exact_match():
    assert metrics.score("needle", "Image 3.", "3") == 1.0
    assert metrics.score("needle", "image 13", "3") == 0.0      # a whole word, not a substring
    assert metrics.score("needle", "The password is Meadow", "meadow") == 1.0
    assert metrics.score("contains", "image 13", "3") == 1.0    # MMCoQA: substring


def test_metric_routing_follows_milebench():
    assert metrics.metric_for("ImageNeedleInAHaystack", "open-ended") == "needle"
    assert metrics.metric_for("MMCoQA", "open-ended") == "contains"
    assert metrics.metric_for("ALFRED", "open-ended") == "rouge_l"
    assert metrics.metric_for("WebQA", "multi-choice") == "accuracy"
    with pytest.raises(ValueError, match="cannot be scored"):
        metrics.metric_for("Other", "yes-no")


def test_token_agreement():
    assert metrics.token_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == (0.75, 2)
    assert metrics.token_agreement([1, 2], [1, 2, 3]) == (pytest.approx(2 / 3), 2)
    assert metrics.token_agreement([1, 2], [1, 2]) == (1.0, None)
    assert metrics.token_agreement([], []) == (1.0, None)


# ----------------------------------------------------------------------------------------------
# Task files: generator, loading, errors
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_tasks(out, num_samples=4, images_per_sample=3, seed=0)
    return out


def test_generator_is_deterministic_and_loads(synth, tmp_path):
    again = generate_task(tmp_path / "a", "SynthVQA", num_samples=4, images_per_sample=3, seed=0)
    assert again.read_bytes() == (synth / "SynthVQA" / "SynthVQA.json").read_bytes()
    other = generate_task(tmp_path / "b", "SynthVQA", num_samples=4, images_per_sample=3, seed=1)
    assert other.read_bytes() != again.read_bytes()
    tasks = {t.name: t for t in map(load_task, find_task_files([synth]))}
    assert {n: t.metric for n, t in tasks.items()} == {
        "SynthCaption": "rouge_l", "SynthImageNeedleInAHaystack": "needle",
        "SynthTextNeedleInAHaystack": "needle", "SynthVQA": "accuracy"}
    for task in tasks.values():
        assert len(task.samples) == 4
        assert all(len(s.images) == 3 and all(p.is_file() for p in s.images)
                   for s in task.samples)
    needle = tasks["SynthTextNeedleInAHaystack"].samples[0]
    assert f"The password is {needle.response}." in needle.context


def _write_task(tmp_path: Path, mutate) -> Path:
    task_dir = tmp_path / "Broken"
    (task_dir / "images").mkdir(parents=True)
    for name in ("0.jpg", "1.jpg"):
        (task_dir / "images" / name).write_bytes(b"")
    doc = {"meta_data": {"task": "Broken", "question_type": "multi-choice",
                         "task_instruction": ["Pick one."]},
           "data": [{"sample_id": i, "task_instruction_id": 0,
                     "task_instance": {"context": "{image#1}{image#2} Which?",
                                       "images_path": ["0.jpg", "1.jpg"],
                                       "choice_list": ["a cat", "a dog"]},
                     "response": "a dog"} for i in range(2)]}
    mutate(doc)
    path = task_dir / "Broken.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(("mutate", "field", "problem"), [
    (lambda d: d.pop("data"), "data", "missing"),
    (lambda d: d["data"][1]["task_instance"].pop("context"), "data[1].task_instance.context",
     "missing"),
    (lambda d: d["data"][0].update(response="a horse"), "data[0].response",
     "not one of task_instance.choice_list"),
    (lambda d: d["data"][1].update(task_instruction_id=3), "data[1].task_instruction_id",
     "not an index"),
    (lambda d: d["data"][0]["task_instance"].update(context="{image#5} Which?"),
     "data[0].task_instance.context", "{image#5}"),
    (lambda d: d["data"][0]["task_instance"].update(images_path="0.jpg"),
     "data[0].task_instance.images_path", "expected list"),
    (lambda d: d["meta_data"].update(question_type="yes-no"), "meta_data.question_type",
     "cannot be scored"),
    (lambda d: d["data"][1].update(sample_id=0), "data[1].sample_id", "duplicate"),
])
def test_malformed_task_file_names_file_and_field(tmp_path, mutate, field, problem):
    path = _write_task(tmp_path, mutate)
    with pytest.raises(TaskFormatError) as info:
        load_task(path)
    assert info.value.field == field
    assert str(path) in str(info.value) and field in str(info.value)
    assert problem in str(info.value)


def test_metadata_spelling_and_numeric_answers_load(tmp_path):
    def mutate(doc):
        doc["metadata"] = doc.pop("meta_data")
        doc["data"][0]["task_instance"]["choice_list"] = [1, 2]
        doc["data"][0]["response"] = 2
    task = load_task(_write_task(tmp_path, mutate))
    assert task.samples[0].choice_list == ("1", "2") and task.samples[0].response == "2"


def test_invalid_json_and_missing_image(tmp_path):
    path = _write_task(tmp_path, lambda d: None)
    assert len(load_task(path).samples) == 2
    (path.parent / "images" / "1.jpg").unlink()
    with pytest.raises(TaskFormatError, match=r"data\[0\]\.task_instance\.images_path\[1\]: "
                                              r"image file not found: .*1\.jpg"):
        load_task(path)
    path.write_text("{not json")
    with pytest.raises(TaskFormatError, match=r"Broken\.json: \(file\): not valid JSON"):
        load_task(path)


def test_cli_reports_a_bad_task_without_a_traceback(tmp_path):
    path = _write_task(tmp_path, lambda d: d["data"][0].update(response="a horse"))
    proc = subprocess.run([sys.executable, "-m", "lookm_vllm.eval", "run", "--model", "unused",
                           "--tasks", str(path.parent), "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert f"lookm-eval: error: {path}: data[0].response" in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------
# Prompts: MileBench's text, images in place, truncation
# ----------------------------------------------------------------------------------------------
class WordsFirstImagesProcessor:
    """A chat template that writes all images first (as llava-hf's does); one token per word."""

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        parts = messages[0]["content"]
        images = "".join("<image>\n" for p in parts if p["type"] == "image")
        text = "".join(p["text"] for p in parts if p["type"] == "text")
        return f"USER: {images}{text} ASSISTANT:"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


def _sample(context, images=("p1", "p2"), choices=None):
    return Sample(0, "Answer briefly.", context, tuple(Path(p) for p in images), "x", choices)


def test_prompt_text_and_images_in_place():
    sample = _sample("{image#1}alpha beta{image#2}gamma delta epsilon",
                     choices=("a cat", "a dog"))
    assert context_with_choices("T", sample).endswith(
        "epsilon\nChoice list: \nA. a cat\nB. a dog\nYour answer is: ")
    assert context_with_choices("GPR1200", sample).endswith("\na cat\na dog\nYour answer is: ")
    builder = PromptBuilder(WordsFirstImagesProcessor())
    assert builder.placeholder == "<image>\n"
    task = type("T", (), {"name": "T"})()
    request = builder.build(task, _sample("{image#2} first {image#1} second"))
    assert request.prompt == ("USER: Answer briefly.\n<image>\n first <image>\n second "
                              "ASSISTANT:")
    assert request.images == (Path("p2"), Path("p1"))
    # an image the context never references goes before the context
    assert [s.image for s in prompt_segments("T", _sample("{image#2} text"))] == [None, 0, 1, None]


def test_truncation_keeps_instruction_and_the_end():
    segments = prompt_segments("T", _sample("{image#1}alpha beta{image#2}gamma delta epsilon"))
    assert segments == [Segment("Answer briefly.\n"), Segment(image=0), Segment("alpha beta"),
                        Segment(image=1), Segment("gamma delta epsilon")]

    def count(text):
        return len(text.split())

    assert truncate_segments(segments, count, 100, image_tokens=4) == segments
    # budget 11 - 2 (instruction) = 9: text 3 + image 4 + text 2 fit, the first image does not
    assert truncate_segments(segments, count, 11, image_tokens=4) == [
        segments[0], Segment("alpha beta"), Segment(image=1), Segment("gamma delta epsilon")]
    # budget 2: only the last 2 words of the last text
    assert truncate_segments(segments, count, 4, image_tokens=4) == [
        segments[0], Segment(" delta epsilon")]


def test_tiny_llava_placeholder(tiny_llava_path):
    from lookm_vllm.demo.tiny_models import load_processor

    assert image_placeholder(load_processor(tiny_llava_path)) == "<image>\n"


# ----------------------------------------------------------------------------------------------
# Resumable predictions and the table, with a stand-in backend
# ----------------------------------------------------------------------------------------------
class FakeBackend:
    def __init__(self):
        self.generated: list[str] = []
        self.closed = False

    def generate(self, requests, compression, max_tokens):
        self.generated += [f"{compression['method']}:{r.sample_id}" for r in requests]
        tokens = [1, 2, 3] if compression["method"] == "none" else [1, 2, 9]
        return [Generation("2", tokens, 10, None) for _ in requests]

    def close(self):
        self.closed = True


def test_resume_skips_done_items_and_refuses_other_settings(synth, tmp_path):
    tasks = [load_task(synth / "SynthImageNeedleInAHaystack" / "SynthImageNeedleInAHaystack.json")]
    cells = build_grid(["none", "h2o"], [0.2])
    builder = PromptBuilder(WordsFirstImagesProcessor())

    def plan(**kw):
        return plan_run(tasks, cells, builder, tmp_path, max_tokens=4,
                        base_settings={"model": "fake", **kw})

    first = FakeBackend()
    assert execute(plan(), lambda n: first, batch_size=3, progress=False) == 8
    assert first.closed and len(first.generated) == 8

    # a finished run starts no backend at all
    assert execute(plan(), lambda n: pytest.fail("backend started"), progress=False) == 0

    # drop one complete line and tear another: exactly those two are redone
    store = PredictionFile(tmp_path, "SynthImageNeedleInAHaystack", "h2o@0.2")
    lines = store.path.read_text().splitlines(keepends=True)
    store.path.write_text("".join(lines[:2]) + lines[3][:20])
    second = FakeBackend()
    assert execute(plan(), lambda n: second, progress=False) == 2
    assert sorted(second.generated) == ["h2o:2", "h2o:3"]
    assert sorted(r["sample_id"] for r in store.records()) == [0, 1, 2, 3]

    with pytest.raises(SettingsMismatch, match=r"none\.jsonl was made with model='fake'"):
        plan(model="other")


def _write_predictions(out: Path, task: str, cell: str, settings: dict, records: list[dict]):
    store = PredictionFile(out, task, cell)
    store.open_for(settings)
    store.append(records)


def test_table_and_plot_from_hand_made_predictions(tmp_path):
    needle, action = "SynthTextNeedleInAHaystack", "ActionLocalization"
    cells = {"none": ("none", None), "lookm-pivotal@0.2": ("lookm-pivotal", 0.2)}
    rows = {  # task -> cell -> [(prediction, token_ids, kept/prompt)]
        needle: {"none": [("image 3", [5, 6, 7], None), ("7", [8, 9], None)],
                 "lookm-pivotal@0.2": [("image 3", [5, 6, 7], 0.2), ("image 13", [8, 1], 0.3)]},
        action: {"none": [("B", [1], None)], "lookm-pivotal@0.2": [("A", [2], 0.5)]},
    }
    answers = {needle: ["3", "7"], action: ["a dog"]}
    for task, by_cell in rows.items():
        for cell, items in by_cell.items():
            method, budget = cells[cell]
            settings = {"method": method, "budget": budget,
                        "metric": "needle" if task == needle else "accuracy",
                        "group": None if task == needle else "T-1"}
            _write_predictions(tmp_path, task, cell, settings, [
                {"sample_id": i, "prediction": p, "token_ids": t, "response": answers[task][i],
                 "choice_list": None if task == needle else ["a cat", "a dog"],
                 "kv_compression": None if k is None else
                 {"kv_tokens_kept": int(k * 100), "prompt_tokens": 100}}
                for i, (p, t, k) in enumerate(items)])
    table = report(tmp_path, ["none", "lookm-pivotal@0.2"])
    assert table["columns"] == ["method", "budget", "T-1", action, needle, "Avg", "KV kept",
                                "Token match", "Identical", "First div."]
    full, lookm = (r["values"] for r in table["rows"])
    assert full == {"T-1": 100.0, action: 100.0, needle: 100.0, "Avg": 100.0, "KV kept": 1.0,
                    "Token match": 1.0, "Identical": 1.0, "First div.": 2.0}
    assert lookm == pytest.approx({"T-1": 0.0, action: 0.0, needle: 50.0, "Avg": 25.0,
                                   "KV kept": 1 / 3, "Token match": 0.5, "Identical": 1 / 3,
                                   "First div.": 4 / 3})
    with open(tmp_path / "results.csv") as f:
        csv_rows = list(csv.reader(f))
    assert csv_rows[0] == table["columns"]
    assert csv_rows[2] == ["lookm-pivotal", "0.2", "0.0", "0.0", "50.0", "25.0", "0.333",
                           "0.500", "0.333", "1.3"]
    assert json.loads((tmp_path / "results.json").read_text()) == table
    assert (tmp_path / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lookm-pivotal  0.2" in format_table(table)


# ----------------------------------------------------------------------------------------------
# The whole harness: lookm-eval on a generated task with the tiny LLaVA
# ----------------------------------------------------------------------------------------------
def _cli(*args, timeout=600):
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the CLI sets it
    proc = subprocess.run([sys.executable, "-m", "lookm_vllm.eval", *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc.stdout


@pytest.mark.engine
def test_lookm_eval_end_to_end_with_tiny_llava(tmp_path, tiny_llava_path):
    pytest.importorskip("vllm")
    data, out = tmp_path / "data", tmp_path / "out"
    _cli("generate", data, "--tasks", "SynthImageNeedleInAHaystack", "SynthVQA", "--samples", 3,
         "--images", 3)
    run = ["run", "--model", "tiny-llava", "--tasks", data, "--out", out, "--methods", "none",
           "lookm-pivotal", "h2o", "--budgets", 0.2, 0.5, "--max-tokens", 6, "--no-progress"]
    stdout = _cli(*run)
    assert "30 of 30 item runs to generate" in stdout

    table = json.loads((out / "results.json").read_text())
    tasks = ["SynthImageNeedleInAHaystack", "SynthVQA"]
    assert table["columns"] == ["method", "budget", *tasks, "Avg", "KV kept", "Token match",
                                "Identical", "First div."]
    assert [(r["method"], r["budget"]) for r in table["rows"]] == [
        ("none", None), ("lookm-pivotal", 0.2), ("lookm-pivotal", 0.5), ("h2o", 0.2),
        ("h2o", 0.5)]
    for row in table["rows"]:
        assert row["items"] == 6
        assert all(0.0 <= row["values"][t] <= 100.0 for t in [*tasks, "Avg"])
    full = table["rows"][0]["values"]
    assert (full["KV kept"], full["Token match"], full["Identical"]) == (1.0, 1.0, 1.0)
    compressed = [r["values"] for r in table["rows"][1:]]
    assert all(v["KV kept"] < 1.0 for v in compressed)
    # the first token comes from the uncompressed prefill; the tiny model is sensitive enough
    # for compression to change later tokens
    assert all(v["First div."] >= 1.0 for v in compressed)
    assert any(v["Token match"] < 1.0 for v in compressed)
    with open(out / "results.csv") as f:
        assert len(list(csv.reader(f))) == 6
    from PIL import Image

    with Image.open(out / "scores.png") as img:
        assert img.format == "PNG" and img.width > 400
    assert "lookm-pivotal" in stdout and "Token match" in stdout

    # resume: drop one finished item; only it is generated again, and identically
    store = PredictionFile(out, "SynthVQA", "lookm-pivotal@0.2")
    before = [(r["sample_id"], r["prediction"], r["token_ids"]) for r in store.records()]
    lines = store.path.read_text().splitlines(keepends=True)
    store.path.write_text("".join(lines[:-1]))
    assert "1 of 30 item runs to generate" in _cli(*run)
    assert [(r["sample_id"], r["prediction"], r["token_ids"]) for r in store.records()] == before
    # and a finished run starts no engine and changes nothing
    before = {p: p.read_bytes() for p in (out / "predictions").rglob("*.jsonl")}
    assert "0 of 30 item runs to generate" in _cli(*run)
    assert {p: p.read_bytes() for p in (out / "predictions").rglob("*.jsonl")} == before
