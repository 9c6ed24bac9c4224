"""The layering, enforced (like vLLM's forbidden-imports check): the algorithm never imports vLLM,
the server never imports the worker-side connector, production code never imports the test
helpers, and the modules documented as vLLM-free really load without vLLM."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION = [p for p in [*(ROOT / "lookm_vllm").rglob("*.py"), *(ROOT / "server").rglob("*.py")]
              if "testing" not in p.relative_to(ROOT).parts]


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    if package == "server" or package.startswith("server."):
        package = "lookm_vllm." + package          # installed as lookm_vllm.server
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def files_under(*folders: str) -> list[Path]:
    return [p for p in PRODUCTION if p.relative_to(ROOT).parts[:len(folders[0].split("/"))]
            in {tuple(f.split("/")) for f in folders}]


def offenders(files: list[Path], forbidden: str) -> list[str]:
    return sorted(f"{p.relative_to(ROOT)} imports {name}" for p in files
                  for name in imported_modules(p)
                  if name == forbidden or name.startswith(forbidden + "."))


def test_production_code_never_imports_the_test_helpers():
    assert PRODUCTION
    assert offenders(PRODUCTION, "lookm_vllm.testing") == []


@pytest.mark.parametrize("folder", ["lookm_vllm/core", "lookm_vllm/kernels"])
def test_the_algorithm_never_imports_vllm(folder):
    files = files_under(folder)
    assert files
    assert offenders(files, "vllm") == []
    assert offenders(files, "lookm_vllm.vllm_adapter") == []
    assert offenders(files, "lookm_vllm.server") == []


def test_the_server_never_imports_the_connector_or_tensors_code():
    files = files_under("server")
    assert files
    assert offenders(files, "lookm_vllm.vllm_adapter.connector") == []
    assert offenders(files, "lookm_vllm.vllm_adapter.worker_state") == []
    assert offenders(files, "lookm_vllm.vllm_adapter.attention") == []


def test_the_detector_sees_an_offence(monkeypatch):
    """The check can fail: a file importing vLLM (relatively or not) is reported."""
    bad = ROOT / "lookm_vllm" / "core" / "_layering_probe.py"
    monkeypatch.setattr(sys.modules[__name__], "PRODUCTION", [*PRODUCTION, bad])
    original = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (
        "from vllm import LLM\nfrom ..vllm_adapter import connector\n" if self == bad
        else original(self, *a, **k)))
    found = offenders(files_under("lookm_vllm/core"), "vllm")
    assert found == ["lookm_vllm/core/_layering_probe.py imports vllm",
                     "lookm_vllm/core/_layering_probe.py imports vllm.LLM"]
    assert offenders(files_under("lookm_vllm/core"), "lookm_vllm.vllm_adapter") == [
        "lookm_vllm/core/_layering_probe.py imports lookm_vllm.vllm_adapter",
        "lookm_vllm/core/_layering_probe.py imports lookm_vllm.vllm_adapter.connector"]


VLLM_FREE = ["lookm_vllm.core", "lookm_vllm.kernels", "lookm_vllm.stats",
             "lookm_vllm.vllm_adapter.options", "lookm_vllm.vllm_adapter.plan",
             "lookm_vllm.vllm_adapter.compaction", "lookm_vllm.vllm_adapter.kv_layout",
             "lookm_vllm.vllm_adapter.worker_state", "lookm_vllm.vllm_adapter.layer_compute"]


def test_vllm_free_modules_load_without_vllm():
    """Imported in a fresh interpreter, these modules pull in no vLLM at all (transitively),
    so the algorithm and the worker's compute run where vLLM is absent (e.g. the GPU check)."""
    code = ("import sys\n"
            f"for name in {VLLM_FREE!r}:\n"
            "    __import__(name)\n"
            "loaded = sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.'))\n"
            "print(loaded)\n"
            "sys.exit(1 if loaded else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_stats_need_neither_vllm_nor_torch():
    code = ("import sys, lookm_vllm.stats\n"
            "sys.exit(1 if {'vllm', 'torch'} & set(sys.modules) else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_compression_stats_round_trip_through_kv_transfer_params():
    """The stats cross processes as the plain dict vLLM serialises; reading them back gives the
    same object, and fields unknown to this version are ignored rather than failing a request."""
    import json

    from lookm_vllm.stats import CompressionStats

    stats = CompressionStats(compressed=True, method="lookm", budget=None, prompt_tokens=460,
                             kv_tokens_kept=204, kv_blocks_freed=8, scoring_ms=None,
                             max_kv_tokens=256, image_tokens=288, video_tokens=0)
    wire = json.loads(json.dumps(stats.to_dict()))
    assert CompressionStats.from_dict(wire) == stats
    assert CompressionStats.from_dict(wire | {"future_field": 1}) == stats
    assert stats.usage() == {"method": "lookm", "budget": None, "max_kv_tokens": 256,
                             "prompt_tokens": 460, "image_tokens": 288, "video_tokens": 0,
                             "kv_tokens_kept": 204, "kv_blocks_freed": 8,
                             "prefix_reused_tokens": 0}
