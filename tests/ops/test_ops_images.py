"""The two images, checked without a Docker engine: what the Dockerfiles say (pinned bases, a non-root user in the
final stage, health checks, ports, no secrets, the same Python and the same pinned packages in both — Ray refuses
nodes whose Python patch or Ray version differ), and — ``slow`` — that each image's Python requirements install
in a clean virtual environment: the API image's set for real, the GPU worker's set (cupy-cuda12x on top) through
pip's resolver (``--dry-run --report``), since CuPy's CUDA wheels are large and need a GPU to be of any use.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import opsutil
import pytest
from opsutil import CONSTRAINTS, DOCKERFILES, REPO

SECRET = re.compile(r"PASSWORD|TOKEN|SECRET|PASSPHRASE|(^|_)KEY$", re.I)


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[dict]]:
    """``(global ARG defaults, stages)``; a stage is ``{"from", "name", "instructions": [(OP, args)]}``."""
    text = re.sub(r"\\\n", " ", path.read_text())
    global_args: dict[str, str] = {}
    stages: list[dict] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op, rest = op.upper(), rest.strip()
        if op == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            assert m, f"{path.name}: cannot read {line!r}"
            image = re.sub(r"\$\{?(\w+)\}?", lambda v: global_args.get(v.group(1), v.group(0)), m.group(1))
            stages.append({"from": image, "name": m.group(2), "instructions": []})
        elif op == "ARG" and not stages:
            name, _, default = rest.partition("=")
            global_args[name] = default
        elif stages:
            stages[-1]["instructions"].append((op, rest))
    return global_args, stages


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def image(request) -> tuple[str, dict[str, str], list[dict]]:
    args, stages = parse_dockerfile(DOCKERFILES[request.param])
    return request.param, args, stages


def _ops(stage: dict, op: str) -> list[str]:
    return [a for o, a in stage["instructions"] if o == op]


def test_base_images_are_pinned(image) -> None:
    name, _args, stages = image
    names = {s["name"] for s in stages if s["name"]}
    for s in stages:
        ref = s["from"]
        if ref in names:  # an earlier stage of this file
            continue
        assert "$" not in ref, f"{name}: FROM {ref!r} has no default"
        base, _, digest = ref.partition("@")
        tag = base.rsplit(":", 1)[1] if ":" in base.rsplit("/", 1)[-1] else ""
        assert digest.startswith("sha256:") or re.match(r"v?\d+\.\d+\.\d+", tag), (
            f"{name}: base image {ref!r} is not pinned to a full version (or a digest)"
        )


def test_final_stage_runs_as_a_non_root_user(image) -> None:
    name, _args, stages = image
    users = _ops(stages[-1], "USER")
    assert users, f"{name}: no USER in the final stage (the image would run as root)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{name}: USER {user}"
    run = " ".join(_ops(stages[-1], "RUN"))
    assert re.search(rf"useradd\b.*\b{re.escape(user)}\b", run), f"{name}: user {user} is not created"
    # the data volume belongs to that user (a new named volume takes the ownership of the image's folder)
    assert "/data" in " ".join(_ops(stages[-1], "VOLUME")) and re.search(rf"chown {user}:\S+ /data", run), name


def test_no_secrets_baked_in(image) -> None:
    name, args, stages = image
    pairs = list(args.items())
    for s in stages:
        for op, rest in s["instructions"]:
            if op in ("ENV", "ARG", "LABEL"):
                pairs += re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S*)", rest) or [(rest.split()[0], "")]
    leaked = [f"{k}={v}" for k, v in pairs if SECRET.search(k)]
    assert not leaked, f"{name}: secret-like build args / env in the image: {leaked}"
    text = DOCKERFILES[name].read_text()
    assert ".env" not in re.findall(r"^COPY\s+(.*)$", text, re.M).__str__(), f"{name} copies an env file"


def _install_line(stages: list[dict]) -> tuple[str, str]:
    """(constraints path in the image, extras) of the image's ``pip install -c ... "/src[extras]"``."""
    for s in stages:
        for run in _ops(s, "RUN"):
            m = re.search(r"pip install\s+-c\s+(\S+)\s+\"/src\[([a-z,]+)\]\"", run)
            if m:
                return m.group(1), m.group(2)
    raise AssertionError('no `pip install -c <constraints> "/src[extras]"` in the Dockerfile')


def image_extras(name: str) -> str:
    return _install_line(parse_dockerfile(DOCKERFILES[name])[1])[1]


def test_images_install_the_package_with_the_shared_constraints(image) -> None:
    name, _args, stages = image
    target, extras = _install_line(stages)
    copies = [c for s in stages for c in _ops(s, "COPY")]
    assert f"docker/constraints.txt {target}" in copies, f"{name}: constraints.txt is not what pip gets"
    assert extras == {"api": "service", "worker": "service,gpu"}[name]


def test_api_image_serves_with_a_health_check() -> None:
    _args, stages = parse_dockerfile(DOCKERFILES["api"])
    final = stages[-1]
    assert set(" ".join(_ops(final, "EXPOSE")).split()) == {"8000", "11112"}
    (hc,) = _ops(final, "HEALTHCHECK")
    assert "healthcheck.py" in hc and '"http"' in hc
    assert _ops(final, "ENTRYPOINT") == ['["voxeldose"]'] and _ops(final, "CMD") == ['["serve"]']
    env = " ".join(_ops(final, "ENV"))
    assert "VOXELDOSE_DATA_DIR=/data" in env and "VOXELDOSE_KERNEL_DIR=/opt/voxeldose/kernels" in env


def test_worker_image_is_cuda_with_the_api_images_python() -> None:
    api_args, _ = parse_dockerfile(DOCKERFILES["api"])
    w_args, w_stages = parse_dockerfile(DOCKERFILES["worker"])
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-runtime-ubuntu\d\d\.\d\d(@sha256:\w+)?", w_args["CUDA_IMAGE"])
    m = re.fullmatch(r"python:(\d+\.\d+\.\d+)-slim-bookworm(@sha256:\w+)?", api_args["PYTHON_IMAGE"])
    assert m, api_args["PYTHON_IMAGE"]
    assert w_args["PYTHON_VERSION"] == m.group(1), "Ray needs the same Python patch version on every node"
    assert m.group(1).startswith("3.11."), "the images' Python"
    final = w_stages[-1]
    (entry,) = _ops(final, "ENTRYPOINT")
    assert "ray start --address=" in entry and "RAY_ADDRESS" in entry and "--block" in entry
    (hc,) = _ops(final, "HEALTHCHECK")
    assert '"raylet"' in hc
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in " ".join(_ops(final, "ENV"))


def test_health_check_script(tmp_path) -> None:
    """docker/healthcheck.py: ``raylet`` fails where none runs, an unknown check is an error, ``http`` fails
    against a closed port (and succeeds against a real /healthz in the stack smoke test's server)."""
    script = REPO / "docker" / "healthcheck.py"

    def run(*a: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), *a], capture_output=True, text=True, timeout=30, env={**os.environ, **env}
        )

    res = run("nonsense")
    assert res.returncode == 1 and "unknown check" in res.stderr
    from serverproc import free_port

    res = run("http", VOXELDOSE_PORT=str(free_port()))
    assert res.returncode == 1 and "healthz" in res.stderr
    res = run("gcs")  # no Ray head runs in this test's process tree; other tests' may run on the machine
    assert res.returncode in (0, 1) and (res.returncode == 0 or "not running" in res.stderr)


def test_dockerignore_sends_what_the_images_copy_and_nothing_secret() -> None:
    rules = [
        r.strip() for r in (REPO / ".dockerignore").read_text().splitlines() if r.strip() and not r.startswith("#")
    ]

    def ignored(rel: str) -> bool:
        out = False
        for r in rules:
            neg = r.startswith("!")
            pat = r[1:] if neg else r
            pat = pat.rstrip("/")
            if (
                fnmatch.fnmatch(rel, pat)
                or fnmatch.fnmatch(rel, pat + "/*")
                or rel.startswith(pat + "/")
                or (pat.startswith("**/") and fnmatch.fnmatch(rel.split("/")[-1], pat[3:]))
            ):
                out = not neg
        return out

    for name, path in DOCKERFILES.items():
        for s in parse_dockerfile(path)[1]:
            for c in _ops(s, "COPY"):
                if c.startswith("--from"):
                    continue
                for src in c.split()[:-1]:
                    rel = src.rstrip("/")
                    assert not ignored(rel), f"{name}: COPY {src} is excluded by .dockerignore"
                    assert (REPO / rel).exists(), f"{name}: COPY {src}: no such path"
    for secret in ("docker/.env", ".env", ".venv/bin/python", ".git/config", "voxeldose-data/voxeldose.db"):
        assert ignored(secret), f".dockerignore sends {secret}"


# --------------------------------------------------------------------------------------------- constraints
def test_constraints_pin_every_dependency_within_pyproject() -> None:
    """Every requirement of ``voxeldose[service,gpu]`` (pyproject.toml) is pinned in docker/constraints.txt, at a
    version its specifier allows, with the extras' own dependencies in the same file.  (The test environment
    itself resolves pyproject's ranges afresh; ``python docker/lock_constraints.py --check`` shows how far the
    pins are from it, and regenerates them without ``--check``.)"""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = opsutil.constraint_pins()
    assert {"ray", "numpy", "fastapi", "sqlalchemy", "psycopg", "cupy-cuda12x", "pydantic-settings"} <= set(pins)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    problems = []
    for raw in [*project["dependencies"], *extras["service"], *extras["gpu"]]:
        req = Requirement(raw)
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{name}: not pinned")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{name}=={pins[name]} outside {req.specifier}")
    assert not problems, f"docker/constraints.txt vs pyproject.toml: {problems}; run python docker/lock_constraints.py"


def _venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
    return path / "bin" / "python"


def _pip(py: Path, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [str(py), "-m", "pip", "--disable-pip-version-check", *args], capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, f"pip {' '.join(args[:3])} ... failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.mark.slow
def test_image_requirements_install_in_a_clean_virtualenv(tmp_path) -> None:
    """What the Dockerfiles install, into a fresh venv: the API image's set for real (then ``voxeldose serve``'s
    modules import and ``pip check`` is clean), the worker's set through the resolver; every package either
    resolves to is pinned in docker/constraints.txt at that version."""
    from packaging.utils import canonicalize_name

    pins = opsutil.constraint_pins()
    venv = tmp_path / "venv"
    try:
        py = _venv(venv)
        t0 = time.monotonic()
        _pip(py, "install", "--quiet", "-c", str(CONSTRAINTS), f"{REPO}[{image_extras('api')}]")
        t_install = time.monotonic() - t0
        _pip(py, "check")
        frozen = _pip(py, "list", "--format=json", "--exclude-editable").stdout
        installed = {canonicalize_name(p["name"]): p["version"] for p in json.loads(frozen)}
        installed.pop("voxeldose", None)
        for tool in ("pip", "setuptools", "wheel"):
            installed.pop(tool, None)
        unpinned = {n: v for n, v in installed.items() if pins.get(n) != v}
        assert not unpinned, f"installed but not pinned (or at another version) in constraints.txt: {unpinned}"
        code = (
            "import service.cli, service.app, service.dispatcher, service.worker, service.store, ray, psycopg, "
            "uvicorn; from service.config import Settings; print(Settings(data_dir='/tmp').database_url)"
        )
        res = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        assert Path(res.stdout.strip().split("sqlite:///", 1)[1]).name == "voxeldose.db"
        # the installed package is the wheel, not this checkout: kernels come from VOXELDOSE_KERNEL_DIR in images
        res = subprocess.run(
            [str(py), "-c", "import voxeldose; print(voxeldose.__file__)"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert str(venv) in res.stdout, res.stdout

        report = tmp_path / "worker-report.json"
        t0 = time.monotonic()
        _pip(
            py,
            "install",
            "--quiet",
            "--dry-run",
            "--ignore-installed",
            "--report",
            str(report),
            "-c",
            str(CONSTRAINTS),
            f"{REPO}[{image_extras('worker')}]",
        )
        t_resolve = time.monotonic() - t0
        resolved = {
            canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
            for i in json.loads(report.read_text())["install"]
        }
        resolved.pop("voxeldose", None)
        assert "cupy-cuda12x" in resolved
        off = {n: v for n, v in resolved.items() if pins.get(n) != v}
        assert not off, f"worker image would install packages not pinned in constraints.txt: {off}"
        print(f"\napi set installed in {t_install:.0f} s; worker set resolved in {t_resolve:.0f} s")
    finally:
        shutil.rmtree(venv, ignore_errors=True)
