"""Where the shipped demo VLM lives, and a check that its weights are the recorded ones.

The folder ``lookm_vllm/demo/shapes_llava/`` is a Hugging Face model folder (LLaVA-1.5 layout)
made by ``python -m lookm_vllm.demo.train`` and committed to the repository (about 7 MB), so that
serving and testing never train. Its ``lookm_demo.json`` records the training command, settings,
held-out accuracy and the sha256 of ``model.safetensors``. Importing this module imports neither
torch nor vLLM.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = ["DEMO_MODEL_DIR", "MANIFEST", "demo_model_path", "manifest", "sha256_file"]

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "shapes_llava"
MANIFEST = "lookm_demo.json"
WEIGHTS = "model.safetensors"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest(path: str | Path = DEMO_MODEL_DIR) -> dict[str, Any]:
    """The model folder's ``lookm_demo.json``."""
    return json.loads((Path(path) / MANIFEST).read_text())


def demo_model_path(path: str | Path = DEMO_MODEL_DIR, *, verify: bool = True) -> Path:
    """The trained demo model's folder.

    Raises
    ------
    FileNotFoundError
        When the folder or its manifest is missing (train it: ``python -m lookm_vllm.demo.train``).
    ValueError
        When ``verify`` and ``model.safetensors`` is not the file the manifest records.
    """
    path = Path(path)
    if not (path / MANIFEST).is_file() or not (path / WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{path}: the trained demo model is missing; make it with "
            "`python -m lookm_vllm.demo.train`")
    if verify:
        want = manifest(path)["model.safetensors_sha256"]
        got = sha256_file(path / WEIGHTS)
        if got != want:
            raise ValueError(f"{path / WEIGHTS}: sha256 {got} is not the recorded {want} "
                             f"({MANIFEST}); retrain with `python -m lookm_vllm.demo.train`")
    return path
