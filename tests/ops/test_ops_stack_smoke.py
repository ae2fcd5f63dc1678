"""The compose stack's entry points on this machine, without Docker: PostgreSQL, a Ray head started with
``ray start --head`` (no CPUs, no GPUs: it can run no job), one worker node joining it with ``ray start --address``,
and ``voxeldose serve`` joining that cluster from outside — once as the driver on the head's node
(``RAY_ADDRESS=127.0.0.1:<port>``) and once through Ray Client (``ray://127.0.0.1:<port>``, what the compose API
container uses).  A real job goes in over HTTP with a token from ``voxeldose token create``; it must succeed, run on
the worker node (its task name is in the worker node's logs, not the head's), and land in PostgreSQL.

Ray token authentication is on, as in the stack: ``RAY_AUTH_MODE=token`` and the token file
(``RAY_AUTH_TOKEN_PATH``) for every Ray node and for ``voxeldose serve``.  Each ``ray start --block`` runs in a session of its own and is stopped by its own
pid and session (SIGTERM, then SIGKILL of what is left) — never ``ray stop``, which would also stop the Ray of
every other test on the machine.  Runtime ≈ 2–3 min on 2 cores (two pipeline runs of the small phantom).

Needs ``VOXELDOSE_TEST_POSTGRES_URL`` (``bash tests/service/postgres.sh`` starts a local PostgreSQL; .ci/run does);
skipped without it unless ``VOXELDOSE_REQUIRE_POSTGRES`` is set, then it fails.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("uvicorn")
pytest.importorskip("sqlalchemy")
httpx = pytest.importorskip("httpx")

import serverproc  # tests/service, on sys.path through conftest.py
from serverproc import ServerProc, auth, child_env, free_port, stop_session, voxeldose_cmd

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

PG_ENV = "VOXELDOSE_TEST_POSTGRES_URL"
RAY = str(Path(sys.executable).with_name("ray"))
REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ PostgreSQL
@pytest.fixture(scope="module")
def pg_base() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        msg = f"{PG_ENV} is not set (bash tests/service/postgres.sh starts a local PostgreSQL and prints the URL)"
        if os.environ.get("VOXELDOSE_REQUIRE_POSTGRES"):
            pytest.fail(f"VOXELDOSE_REQUIRE_POSTGRES is set but {msg}")
        pytest.skip(msg)
    from service.store import normalise_url

    return normalise_url(url)


@pytest.fixture
def pg_url(pg_base: str) -> Iterator[str]:
    """A fresh schema of its own (dropped afterwards), as tests/service/conftest.py does."""
    from sqlalchemy import create_engine, text

    schema = f"ops_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in pg_base else "?"
    try:
        yield f"{pg_base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


# ------------------------------------------------------------------------------------------------------ Ray
class RayNode:
    """``ray start ... --block`` in a process session of its own."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name, self.args, self.env, self.log_path = name, args, env, log_path
        self.proc: subprocess.Popen | None = None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def start(self, timeout: float = 180.0) -> None:
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [RAY, "start", *self.args, "--block"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Ray runtime started" in self.log_path.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.25)
        raise RuntimeError(f"ray start ({self.name}) did not start:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to ``ray start --block`` (it stops its node's processes), then SIGKILL of the session's rest."""
        if self.proc is None:
            return
        left = stop_session(self.proc, term_timeout=30.0, linger_s=20.0)
        self.proc = None
        assert not left, f"processes of ray start ({self.name}) survived: {left}"


@dataclass
class Cluster:
    gcs_port: int
    client_port: int
    token_path: Path
    head_dir: Path
    worker_dir: Path
    head: RayNode
    worker: RayNode

    def client_server_logs(self, n: int = 30) -> str:
        """The tails of the head's Ray Client server logs (proxier and specific servers), for failure messages."""
        out = []
        for p in sorted(self.head_dir.glob("session_*/logs/ray_client_server*")):
            lines = p.read_text(errors="replace").splitlines()[-n:]
            if lines:
                out.append(f"[{p.name}]\n" + "\n".join(lines))
        return "\n".join(out) or "(none)"

    def task_logged(self, temp_dir: Path, task_name: str) -> bool:
        """Whether a Ray worker process under ``temp_dir`` (one node's --temp-dir) ran the task ``task_name``
        (Ray writes ``:task_name:<name>`` into that worker's log when it starts a task)."""
        marker = f":task_name:{task_name}"
        for p in temp_dir.glob("session_*/logs/worker-*"):
            try:
                if marker in p.read_text(errors="replace"):
                    return True
            except OSError:
                continue
        return False


def ray_auth_env(token_path: Path) -> dict[str, str]:
    """Ray's token authentication, as every process of the stack has it (compose gives RAY_AUTH_TOKEN itself)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    """A head with no CPUs and no GPUs and one worker node with one CPU, both on this machine."""
    # AF_UNIX socket paths (<temp-dir>/session_<date>_<pid>/sockets/plasma_store) must stay under 107 bytes
    root = Path(tempfile.mkdtemp(prefix="vdo", dir="/tmp"))
    head_dir, worker_dir = root / "h", root / "w"
    token = root / "ray-auth-token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {
        k: v for k, v in os.environ.items() if k == "VOXELDOSE_KERNEL_CACHE" or not k.startswith(("RAY_", "VOXELDOSE_"))
    }  # the run's temporary kernel cache stays (tests/conftest.py)
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", **ray_auth_env(token))
    gcs, client = free_port(), free_port()
    common = ["--num-gpus=0", "--object-store-memory=100000000", "--disable-usage-stats"]
    head = RayNode(
        "head",
        [
            "--head",
            f"--port={gcs}",
            f"--ray-client-server-port={client}",
            "--num-cpus=0",
            "--include-dashboard=false",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={head_dir}",
            *common,
        ],
        env,
        root / "head.log",
    )
    worker = RayNode(
        "worker",
        [
            f"--address=127.0.0.1:{gcs}",
            "--num-cpus=1",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={worker_dir}",
            *common,
        ],
        env,
        root / "worker.log",
    )
    cluster = Cluster(gcs, client, token, head_dir, worker_dir, head, worker)
    try:
        t0 = time.monotonic()
        head.start()
        t1 = time.monotonic()
        worker.start()
        print(f"\nray head up in {t1 - t0:.1f} s, worker joined in {time.monotonic() - t1:.1f} s")
        yield cluster
    finally:
        try:
            worker.stop()
        finally:
            head.stop()
            shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> dict:
    from voxeldose.phantom import PhantomSettings, write_phantom

    d = tmp_path_factory.mktemp("phantom")
    st = PhantomSettings.small()
    write_phantom(d, st)
    truth = json.loads((d / "truth" / "truth.json").read_text())
    return {
        "zip": serverproc.zip_folder(d / "dicom"),
        "patient_id": st.patient_id,
        "patient_name": st.patient_name,
        "spec": {"calibration": {"cps_per_mbq": truth["calibration_cps_per_mbq"]}},
    }


def create_token(data_dir: Path, database_url: str, name: str, role: str) -> str:
    """``voxeldose token create`` against the stack's database (serverproc.create_token uses the SQLite default)."""
    out = subprocess.run(
        [*voxeldose_cmd(), "token", "create", "--name", name, "--role", role],
        env=child_env(data_dir, database_url=database_url),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------------ test
@pytest.mark.parametrize("mode", ["driver-on-head-node", "ray-client"])
def test_jobs_run_on_the_separately_started_worker_and_land_in_postgresql(
    mode: str, ray_cluster: Cluster, pg_url: str, phantom: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = (
        f"127.0.0.1:{ray_cluster.gcs_port}"
        if mode == "driver-on-head-node"
        else f"ray://127.0.0.1:{ray_cluster.client_port}"
    )
    # serverproc's child_env strips the RAY_AUTH_* of the test process; `voxeldose serve` gets the cluster's
    orig_child_env = serverproc.child_env
    monkeypatch.setattr(
        serverproc, "child_env", lambda *a, **kw: {**orig_child_env(*a, **kw), **ray_auth_env(ray_cluster.token_path)}
    )
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    token = create_token(data_dir, pg_url, "ops-physicist", "physicist")
    server = ServerProc(
        data_dir,
        tmp_path / "server.log",
        ray_address=address,
        database_url=pg_url,
        log_json="true",
        jobs_in_flight=1,
        min_free_disk_mb=64,
        dicom_port=0,
    )
    t0 = time.monotonic()
    for attempt in (1, 2):
        try:
            server.start(timeout=180)
            break
        except RuntimeError as exc:
            # Ray's own race (ray-project/ray#63202): the Ray Client proxier's per-client server sometimes dies as
            # it is forked.  serve then exits, and compose's restart policy starts it again; so does this test, once.
            if attempt == 1 and mode == "ray-client" and "Initialization failure from server" in str(exc):
                print(f"\nserve could not connect through Ray Client (ray#63202), starting it again:\n{exc}")
                continue
            raise RuntimeError(
                f"{exc}\n--- Ray head's client-server logs ---\n{ray_cluster.client_server_logs()}"
            ) from None
    t_start = time.monotonic() - t0
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as c:
            ready = c.get("/readyz").json()
            assert ready["checks"] == {**ready["checks"], "database": True, "ray": True}, ready
            assert ready["device"] == "cpu"
            # the image's health check script against the real server
            hc = subprocess.run(
                [sys.executable, str(REPO / "docker" / "healthcheck.py"), "http"],
                env={**os.environ, "VOXELDOSE_PORT": str(server.port)},
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert hc.returncode == 0, hc.stderr

            t0 = time.monotonic()
            r = serverproc.submit(c, token, phantom["zip"], phantom["spec"])
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            job = serverproc.wait_for(c, token, job_id, ["succeeded"], timeout=420, interval=0.5, server=server)
            t_job = time.monotonic() - t0
            assert job["attempts"] == 1 and job["has_result"], job
            summary = c.get(f"/v1/jobs/{job_id}/summary", headers=auth(token))
            assert summary.status_code == 200 and "Kidney_L" in summary.json()["vois"]
            metrics = c.get("/metrics").text
            assert 'voxeldose_jobs{state="succeeded"} 1.0' in metrics and "voxeldose_ray_up 1.0" in metrics
    finally:
        server.stop()

    # ran on the worker node, not on the head (which has no CPU, so it could not have)
    task = f"voxeldose-job-{job_id}"
    assert ray_cluster.task_logged(ray_cluster.worker_dir, task), f"{task} is not in the worker node's logs"
    assert not ray_cluster.task_logged(ray_cluster.head_dir, task)

    # the result is in PostgreSQL (the service is stopped: read the tables directly)
    from sqlalchemy import create_engine, text

    eng = create_engine(pg_url)
    try:
        with eng.connect() as conn:
            row = conn.execute(
                text("SELECT state, attempts, result_dir, patient_id, submitted_by FROM jobs WHERE id = :id"),
                {"id": job_id},
            ).one()
            schema = conn.execute(text("SELECT current_schema()")).scalar()
    finally:
        eng.dispose()
    assert schema.startswith("ops_")
    assert row.state == "succeeded" and row.attempts == 1 and row.submitted_by == "ops-physicist"
    assert row.patient_id == phantom["patient_id"]
    out = Path(row.result_dir)
    assert out == data_dir / "jobs" / job_id / "out"
    assert {"rtdose.dcm", "summary.json", "report.html"} <= {p.name for p in out.iterdir()}

    # JSON log lines of the service, with the job id, without the patient
    lines = [ln for ln in (tmp_path / "server.log").read_text().splitlines() if ln.startswith("{")]
    recs = [json.loads(ln) for ln in lines]
    about = [r["msg"] for r in recs if r.get("job_id") == job_id]
    assert any("queued" in m for m in about) and any("succeeded" in m for m in about), about
    for r in recs:  # the patient's name and id are in the DICOM, the database and the results, never in the log
        line = json.dumps(r, ensure_ascii=False)
        assert phantom["patient_name"] not in line and phantom["patient_id"] not in line, line
    print(f"\n{mode}: serve ready in {t_start:.1f} s, job succeeded in {t_job:.1f} s")
