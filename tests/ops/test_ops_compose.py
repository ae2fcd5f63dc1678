"""docker/compose.yaml and docker/kuberay-raycluster.yaml, checked without a Docker engine or a Kubernetes cluster:
the Compose Specification's JSON schema (vendored, see compose-spec.NOTICE.md), then what the stack needs — an
NVIDIA GPU reservation for the workers, a healthcheck on every service, volumes for the data folder and the
database, no secret values in the file, pinned images, Ray addresses that match the head's ports, and only
VOXELDOSE_* variables that the settings code knows."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import opsutil
import pytest
from opsutil import COMPOSE, KUBERAY, interpolate, load_yaml

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("yaml")

SCHEMA = Path(__file__).with_name("compose-spec.json")
# what docker/env.example asks the operator to fill in; any value works for these checks
SAMPLE_ENV = {"POSTGRES_PASSWORD": "0123abcd", "RAY_AUTH_TOKEN": "feedbeef"}
SECRET_KEY = re.compile(r"PASSWORD|TOKEN|SECRET|PASSPHRASE|(^|_)KEY$", re.I)


@pytest.fixture(scope="module")
def raw() -> dict:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def stack(raw) -> dict:
    """The compose model as Compose sees it with docker/env.example filled in and every default taken."""
    return interpolate(raw, SAMPLE_ENV)


def _validator():
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _errors(doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in _validator().iter_errors(doc)]


def test_compose_file_validates_against_the_compose_spec_schema(raw, stack) -> None:
    assert _errors(raw) == []
    assert _errors(stack) == []  # also after interpolation (count: all → a string, ports as strings)


def test_the_schema_check_catches_mistakes(raw) -> None:
    """The validation is not vacuous: typical mistakes in a compose file fail it."""
    bad = copy.deepcopy(raw)
    bad["services"]["api"]["helthcheck"] = bad["services"]["api"].pop("healthcheck")  # typo'd key
    assert any("helthcheck" in e for e in _errors(bad))
    bad = copy.deepcopy(raw)
    bad["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0].pop("capabilities")
    assert any("capabilities" in e for e in _errors(bad))
    bad = copy.deepcopy(raw)
    bad["services"]["postgres"]["depends_on"] = {"api": {"condition": "healthy"}}  # not an allowed condition
    assert _errors(bad)


def test_services_of_the_stack(stack) -> None:
    assert set(stack["services"]) == {"postgres", "ray-head", "worker", "api"}


def test_gpu_worker_has_an_nvidia_device_reservation(stack) -> None:
    devices = stack["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    nvidia = [d for d in devices if d.get("driver") == "nvidia"]
    assert nvidia, devices
    assert "gpu" in nvidia[0]["capabilities"]
    count = str(nvidia[0].get("count", "all"))
    assert count == "all" or int(count) >= 1
    # no other service reserves the GPUs the workers need
    for name, svc in stack["services"].items():
        if name != "worker":
            assert "deploy" not in svc or "devices" not in str(svc["deploy"]), name


def test_every_service_has_a_healthcheck(stack) -> None:
    for name, svc in stack["services"].items():
        hc = svc.get("healthcheck")
        assert hc and not hc.get("disable") and hc.get("test"), f"{name}: no healthcheck"
        assert hc["test"][0] in ("CMD", "CMD-SHELL"), (name, hc["test"])
    # the images' own check script does what compose asks of it
    assert stack["services"]["api"]["healthcheck"]["test"][-1] == "http"
    assert stack["services"]["ray-head"]["healthcheck"]["test"][-1] == "gcs"
    assert stack["services"]["worker"]["healthcheck"]["test"][-1] == "raylet"


def test_api_waits_for_a_healthy_database_and_ray_head(stack) -> None:
    deps = stack["services"]["api"]["depends_on"]
    assert deps["postgres"]["condition"] == "service_healthy"
    assert deps["ray-head"]["condition"] == "service_healthy"
    assert stack["services"]["worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"


def _mounts(svc: dict) -> dict[str, str]:
    out = {}
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            src, dst = v.split(":")[:2]
        else:
            src, dst = v["source"], v["target"]
        out[dst] = src
    return out


def test_volumes_for_the_data_folder_and_the_database(stack) -> None:
    svcs = stack["services"]
    assert set(stack["volumes"]) >= {"data", "pgdata"}
    assert _mounts(svcs["postgres"]).get("/var/lib/postgresql/data") == "pgdata"
    # the API writes incoming/ and the workers read it and write jobs/<id>/out: the same volume, the same path
    for name in ("api", "worker"):
        assert _mounts(svcs[name]).get("/data") == "data", name
        assert svcs[name]["environment"]["VOXELDOSE_DATA_DIR"] == "/data", name


def test_no_secret_values_in_the_compose_file(raw) -> None:
    """Secrets come from docker/.env through ${...}; the file itself holds none."""
    found = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                if (
                    isinstance(v, (str, int))
                    and SECRET_KEY.search(str(k))
                    and not str(k).endswith("_FILE")
                    and not re.fullmatch(r"\$\{[A-Z0-9_]+(:?[?][^}]*)?\}", str(v))
                    and str(k) != "RAY_AUTH_MODE"
                ):
                    found.append(f"{path}/{k}={v!r}")
                walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(raw, "")
    assert found == [], f"literal secret values: {found}"
    url = raw["services"]["api"]["environment"]["VOXELDOSE_DATABASE_URL"]
    m = re.match(r"postgresql(\+psycopg)?://([^:@/]+):([^@]+)@", url)
    assert m and m.group(3).startswith("${POSTGRES_PASSWORD"), url
    # and the required secrets really are required: without them compose refuses to start
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        interpolate(raw, {"RAY_AUTH_TOKEN": "x"})
    with pytest.raises(KeyError, match="RAY_AUTH_TOKEN"):
        interpolate(raw, {"POSTGRES_PASSWORD": "x"})


def test_images_are_pinned(stack) -> None:
    for name, svc in stack["services"].items():
        image = svc["image"]
        ref, _, digest = image.partition("@")
        tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else ""
        assert tag and tag != "latest", f"{name}: image {image!r} has no fixed tag"
        assert re.search(r"\d+\.\d+", tag) or digest.startswith("sha256:"), f"{name}: {image!r} is not a version tag"
        if "build" not in svc:  # third-party image: a version tag with its base distribution, or a digest
            assert re.match(r"\d+\.\d+", tag) or digest, (name, image)


def test_ray_addresses_match_the_head(stack) -> None:
    head = stack["services"]["ray-head"]
    args = dict(a.lstrip("-").split("=", 1) for a in head["command"] if "=" in a)
    assert "--head" in head["command"] and "--block" in head["command"]
    assert args["num-cpus"] == "0" and args["num-gpus"] == "0", "jobs must run on the workers, not on the head"
    assert stack["services"]["worker"]["environment"]["RAY_ADDRESS"] == f"ray-head:{args['port']}"
    assert stack["services"]["api"]["environment"]["RAY_ADDRESS"] == f"ray://ray-head:{args['ray-client-server-port']}"
    for name in ("ray-head", "worker", "api"):  # every Ray participant presents the same token
        env = stack["services"][name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == SAMPLE_ENV["RAY_AUTH_TOKEN"], name


def test_api_listens_where_compose_publishes(stack) -> None:
    api = stack["services"]["api"]
    env = api["environment"]
    targets = {str(p).rsplit(":", 1)[-1] if isinstance(p, str) else str(p["target"]) for p in api["ports"]}
    assert targets == {env["VOXELDOSE_PORT"], env["VOXELDOSE_DICOM_PORT"]} == {"8000", "11112"}
    assert env["VOXELDOSE_HOST"] == env["VOXELDOSE_DICOM_HOST"] == "0.0.0.0"


def _names_in(path: Path) -> set[str]:
    return set(opsutil.VAR_NAME.findall(path.read_text()))


@pytest.mark.parametrize(
    "path", [COMPOSE, KUBERAY, opsutil.DOCKER / "env.example", *opsutil.DOCKERFILES.values()], ids=lambda p: p.name
)
def test_voxeldose_variables_in_deployment_files_exist_in_the_code(path: Path) -> None:
    unknown = _names_in(path) - opsutil.known_env_names()
    assert not unknown, f"{path.relative_to(opsutil.REPO)} names variables no code reads: {sorted(unknown)}"


def test_kuberay_example() -> None:
    docs = [d for d in __import__("yaml").safe_load_all(KUBERAY.read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert {"RayCluster", "PersistentVolumeClaim", "Deployment", "Service"} <= set(kinds)
    rc = kinds["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["spec"]["rayVersion"] == opsutil.constraint_pins()["ray"], "rayVersion must be the images' Ray"
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (group,) = rc["spec"]["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(m["mountPath"] == "/data" for m in worker["volumeMounts"])
    assert kinds["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    api = kinds["Deployment"]["spec"]
    assert api["replicas"] == 1, "one dispatcher per database"
    for spec in (head["template"]["spec"], group["template"]["spec"], api["template"]["spec"]):
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"]:
            for e in c.get("env", []):
                if SECRET_KEY.search(e["name"]) and e["name"] != "RAY_AUTH_MODE":
                    assert "valueFrom" in e and "value" not in e, f"{c['name']}: {e['name']} must come from a Secret"
            if "DATABASE_URL" in str(c.get("env")):
                (db,) = [e for e in c["env"] if e["name"] == "VOXELDOSE_DATABASE_URL"]
                assert "secretKeyRef" in db["valueFrom"]
    env = {e["name"]: e.get("value") for e in api["template"]["spec"]["containers"][0]["env"]}
    assert env["RAY_ADDRESS"].startswith("ray://") and env["RAY_ADDRESS"].endswith(":10001")


def _compose_cli() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            ok = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return cmd
    return None


def test_docker_compose_config_accepts_the_file(tmp_path) -> None:
    """Docker Compose itself (``config`` needs no engine), where a Compose v2 CLI is installed."""
    cmd = _compose_cli()
    if cmd is None:
        pytest.skip("no Docker Compose CLI here (`docker compose` / `docker-compose`); the schema test covers CI")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOXELDOSE_", "STACK_", "POSTGRES_", "RAY_"))}
    res = subprocess.run(
        [*cmd, "-f", str(COMPOSE), "config", "--quiet"],
        env={**env, **SAMPLE_ENV},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    res = subprocess.run(
        [*cmd, "-f", str(COMPOSE), "config", "--quiet"], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode != 0 and "POSTGRES_PASSWORD" in res.stderr + res.stdout
