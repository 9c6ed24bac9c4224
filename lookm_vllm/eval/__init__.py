"""MileBench-format evaluation of LOOK-M and its baselines on vLLM (the ``lookm-eval`` CLI).

* :mod:`.milebench`: task files (layout, validation with clear errors, prompt text, truncation,
  MileBench's task groups);
* :mod:`.metrics`: MileBench's scores (option extraction + accuracy, ROUGE-L, needle match) and
  the token agreement with the full-cache run;
* :mod:`.synthetic`: small offline tasks in the same format;
* :mod:`.grid`: methods x budgets; :mod:`.runner`: prompts, resumable predictions, the run loop;
  :mod:`.engine`: the vLLM backend; :mod:`.report`: the table (JSON/CSV) and the plot;
* :mod:`.cli`: ``lookm-eval generate | run | report``.

Importing this package does not import vLLM (only `run` starts an engine).
"""

from .grid import Cell, build_grid
from .metrics import metric_for, normalize_answer, rouge_l, score, token_agreement
from .milebench import Sample, Task, TaskFormatError, load_task
from .synthetic import generate_task, generate_tasks

__all__ = [
    "Cell",
    "Sample",
    "Task",
    "TaskFormatError",
    "build_grid",
    "generate_task",
    "generate_tasks",
    "load_task",
    "metric_for",
    "normalize_answer",
    "rouge_l",
    "score",
    "token_agreement",
]
