"""A real ``voxeldose serve`` in a subprocess, for the end-to-end and browser tests and the service benchmark.

The server runs in a session of its own (``start_new_session=True``): the local Ray it starts (GCS, raylet,
workers — the workers get process groups of their own, but stay in the session) is killed with it by
:meth:`ServerProc.kill9`, which SIGKILLs every process of that session and nothing else.  Tokens are made with
the ``voxeldose token`` command, as an operator would.

:func:`shared_env` gives the test modules one server + one finished job per pytest process (a module-level
cache; the first caller's ``request`` tears it down at the end of the session, ``atexit`` as a fallback).
"""

from __future__ import annotations

import atexit
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import support  # tests/support.py: the suite's wait limits and polling helper

# Environment the server must not inherit from the test process (a Ray started by other tests sets some).
_STRIP_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
TERMINAL = ("succeeded", "failed", "cancelled")


def voxeldose_cmd() -> list[str]:
    """The ``voxeldose`` console script of the running interpreter's environment."""
    exe = Path(sys.executable).with_name("voxeldose")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from voxeldose.cli import main; sys.exit(main())"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(data_dir: Path, **settings: Any) -> dict[str, str]:
    keep = ("VOXELDOSE_KERNEL_CACHE",)  # the run's temporary kernel cache (tests/conftest.py), not ~/.cache
    env = {k: v for k, v in os.environ.items() if (k in keep or not k.startswith("VOXELDOSE_")) and k not in _STRIP_ENV}
    env["VOXELDOSE_DATA_DIR"] = str(data_dir)
    env["PYTHONUNBUFFERED"] = "1"
    for k, v in settings.items():
        env[f"VOXELDOSE_{k.upper()}"] = str(v)
    return env


def create_token(data_dir: Path, name: str, role: str) -> str:
    """``voxeldose token create`` → the plain token (printed once on stdout)."""
    out = subprocess.run(
        [*voxeldose_cmd(), "token", "--data-dir", str(data_dir), "create", "--name", name, "--role", role],
        env=child_env(data_dir),
        capture_output=True,
        text=True,
        timeout=120 * support.wait_scale(),  # a CLI start on a busy machine (VOXELDOSE_TEST_WAIT_SCALE)
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"voxeldose token create failed ({out.returncode}): {out.stderr.strip()}")
    tok = out.stdout.strip().splitlines()[-1].strip()
    assert len(tok) >= 32, out.stdout
    return tok


def session_pids(sid: int) -> list[int]:
    """Processes whose session id is ``sid`` (Linux /proc)."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2 :].split()
        # fields: state ppid pgrp session ...; zombies are already dead
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(d))
    return pids


def kill_session(sid: int, sig: int = signal.SIGKILL) -> int:
    n = 0
    for pid in session_pids(sid):
        try:
            os.kill(pid, sig)
            n += 1
        except (ProcessLookupError, PermissionError):
            pass
    return n


class ServerProc:
    """``voxeldose serve`` on a free loopback port; restartable on the same data folder."""

    def __init__(self, data_dir: Path, log_path: Path, **settings: Any) -> None:
        self.data_dir = Path(data_dir)
        self.log_path = Path(log_path)
        # The DICOM node that serve starts: on a port of its own (0: any free one; /readyz tells which)
        self.settings = {"dicom_port": 0, **settings}
        self.proc: subprocess.Popen | None = None
        self.dicom_port: int | None = None
        self.port: int | None = None
        self.starts = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def start(self, timeout: float = support.STATE_WAIT_S) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        last = ""
        for _try in range(3):  # the free port may be taken between bind() and uvicorn's bind
            self.port = free_port()
            self.starts += 1
            with open(self.log_path, "a") as log:
                log.write(f"\n===== start {self.starts} on port {self.port} =====\n")
                log.flush()
                self.proc = subprocess.Popen(
                    [
                        *voxeldose_cmd(),
                        "serve",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(self.port),
                        "--data-dir",
                        str(self.data_dir),
                    ],
                    env=child_env(self.data_dir, **self.settings),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            if self._wait_ready(timeout):
                return
            last = self.log_tail()
            self.kill9()
            if "address already in use" not in last.lower():
                break
        raise RuntimeError(f"voxeldose serve did not become ready:\n{last}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout * support.wait_scale()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                r = httpx.get(self.base_url + "/readyz", timeout=2.0)
                if r.status_code == 200:
                    self.dicom_port = r.json().get("dicom_port")
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        return False

    def kill9(self) -> None:
        """SIGKILL the server and everything it started (its session), as a power cut would."""
        if self.proc is not None:
            stop_session(self.proc, term_timeout=None)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (clean shutdown: dispatcher stop, ray.shutdown), then SIGKILL of whatever is left."""
        if self.proc is not None:
            stop_session(self.proc, term_timeout=timeout)
            self.proc = None


def stop_session(proc: subprocess.Popen, *, term_timeout: float | None = 30.0, linger_s: float = 10.0) -> list[int]:
    """Stop ``proc``, started with ``start_new_session=True``, and everything in its session: SIGTERM and up to
    ``term_timeout`` s for a clean exit (None: straight to SIGKILL), then SIGKILL of the session until none is
    left (up to ``linger_s``: orphans such as Ray's workers).  Returns the pids that survived."""
    sid = proc.pid
    if term_timeout is not None and proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=term_timeout)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    kill_session(sid)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    deadline = time.monotonic() + linger_s
    while session_pids(sid) and time.monotonic() < deadline:
        kill_session(sid)
        time.sleep(0.2)
    return session_pids(sid)


# ------------------------------------------------------------------------------------ client helpers
def zip_folder(folder: Path, arc_root: str = "dicom") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                zf.write(p, f"{arc_root}/{p.relative_to(folder).as_posix()}")
    return buf.getvalue()


def auth(token: str | None, **extra: str) -> dict[str, str]:
    h = dict(extra)
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    return h


def submit(
    client: httpx.Client,
    token: str | None,
    payload: bytes,
    spec: dict | None,
    *,
    filename: str = "study.zip",
    idempotency_key: str | None = None,
) -> httpx.Response:
    headers = auth(token)
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    data = {"spec": json.dumps(spec)} if spec is not None else None
    return client.post(
        "/v1/jobs", headers=headers, files=[("files", (filename, payload, "application/zip"))], data=data, timeout=120
    )


def get_job(client: httpx.Client, token: str, job_id: str) -> dict:
    r = client.get(f"/v1/jobs/{job_id}", headers=auth(token), timeout=30)
    r.raise_for_status()
    return r.json()


def wait_for(
    client: httpx.Client,
    token: str,
    job_id: str,
    states: Iterable[str],
    *,
    timeout: float = support.JOB_WAIT_S,
    interval: float = 0.25,
    server: ServerProc | None = None,
) -> dict:
    """Poll the job until its state is one of ``states`` (or terminal: then it must be wanted)."""
    states = tuple(states)
    context = server.log_tail if server is not None else None
    job = support.wait_for(
        lambda: get_job(client, token, job_id),
        until=lambda j: j["state"] in states or j["state"] in TERMINAL,
        timeout_s=timeout,
        interval_s=interval,
        what=f"job {job_id} to reach {states}",
        context=context,
    )
    if job["state"] not in states:
        tail = "\n" + server.log_tail() if server is not None else ""
        raise AssertionError(f"job {job_id} did not reach {states}: last seen {job}{tail}")
    return job


# ------------------------------------------------------------------------------ one shared server
@dataclass
class E2EEnv:
    """A running server on ``data_dir`` with tokens, the small phantom zipped, and (after
    :meth:`finished_job`) one succeeded job."""

    root: Path
    server: ServerProc
    tokens: dict[str, str]
    phantom: dict[str, Any]
    zip_bytes: bytes
    spec: dict[str, Any]
    idempotency_key: str = "e2e-first-upload"
    first_job: dict[str, Any] | None = None
    first_response: dict[str, Any] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.server.data_dir

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.server.base_url, timeout=60)

    def finished_job(self, timeout: float = support.JOB_WAIT_S) -> dict[str, Any]:
        """The small phantom submitted once (physicist, with an Idempotency-Key) and run to success."""
        if self.first_job is None:
            with self.client() as c:
                r = submit(c, self.tokens["physicist"], self.zip_bytes, self.spec, idempotency_key=self.idempotency_key)
                self.first_response = {
                    "status": r.status_code,
                    "location": r.headers.get("location"),
                    "content_type": r.headers.get("content-type"),
                    "body": r.json(),
                }
                assert r.status_code == 202, (r.status_code, r.text)
                job_id = r.json()["id"]
                self.first_job = wait_for(
                    c, self.tokens["physicist"], job_id, ["succeeded"], timeout=timeout, server=self.server
                )
        return self.first_job

    def close(self) -> None:
        self.server.stop()


_SHARED: E2EEnv | None = None


def shared_env(tmp_path_factory: Any, request: Any, phantom: dict[str, Any]) -> E2EEnv:
    """One server per pytest process, shared by the modules that ask for it."""
    global _SHARED
    if _SHARED is not None:
        return _SHARED
    root = tmp_path_factory.mktemp("e2e")
    data_dir = root / "data"
    data_dir.mkdir()
    tokens = {
        "physicist": create_token(data_dir, "e2e-physicist", "physicist"),
        "submitter": create_token(data_dir, "e2e-submitter", "submitter"),
        "admin": create_token(data_dir, "e2e-admin", "admin"),
    }
    # min_free_disk_mb: CI disks can be small; the uploads here are a few MB
    server = ServerProc(data_dir, root / "server.log", min_free_disk_mb=64)
    env = E2EEnv(
        root=root,
        server=server,
        tokens=tokens,
        phantom=phantom,
        zip_bytes=zip_folder(phantom["dicom"]),
        spec={"calibration": {"cps_per_mbq": phantom["truth"]["calibration_cps_per_mbq"]}},
    )

    def _close() -> None:
        global _SHARED
        env.close()
        _SHARED = None

    request.addfinalizer(_close)
    atexit.register(server.stop)  # a crashed session must not leave a server and its Ray behind
    server.start()
    _SHARED = env
    return env
