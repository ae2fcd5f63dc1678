"""A real Orthanc (Debian package ``orthanc``) as a PACS peer for the tests: start, talk REST, stop.

    from orthanc import require_orthanc, start_orthanc

    require_orthanc()                          # skips (or fails under VOXELDOSE_REQUIRE_ORTHANC=1)
    with start_orthanc(tmp_path / "orthanc", modalities={"vx": ("VOXELDOSE", "127.0.0.1", 11112)}) as pacs:
        iid = pacs.upload(path)                # POST /instances
        pacs.push_study("vx", study_id)        # POST /modalities/vx/store, synchronous

Each instance is our own process: free HTTP and DICOM ports (asked of the kernel, retried if taken
meanwhile), storage, index, temporary folder, config and log under ``workdir``, no plugins, no Lua scripts,
Orthanc Explorer and WebDAV off. It never touches the package's own service (``/etc/orthanc``,
ports 8042/4242, ``/var/lib/orthanc``), whether that runs or not.

Orthanc 1.10 cannot bind its HTTP or DICOM server to one address (both listen on 0.0.0.0):
``RemoteAccessAllowed: false`` makes the HTTP server answer loopback clients only, and the DICOM
port accepts C-ECHO/C-STORE from anyone while the instance lives (``DicomAlwaysAllowStore``), which
is what a test PACS needs. Orthanc runs as root without complaint, so it runs as the current user.

:meth:`Orthanc.stop` terminates (SIGTERM: Orthanc shuts down cleanly, 2-3.5 s, most of it its HTTP
server's stop), waits, then kills; an ``atexit`` hook stops any instance a test left running, and on
Linux it runs under ``setpriv --pdeathsig KILL`` (the kernel kills it with its parent), so not even a
killed pytest leaves an Orthanc behind.  It stays in pytest's process group.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx
import support  # tests/support.py: the suite's wait limits

REQUIRE_ENV = "VOXELDOSE_REQUIRE_ORTHANC"
BINARY_ENV = "VOXELDOSE_ORTHANC"  # optional: path of another Orthanc binary
DEBIAN_BINARY = "/usr/sbin/Orthanc"  # the package installs it here, often not on a user's PATH

_LIVE: weakref.WeakSet[Orthanc] = weakref.WeakSet()


def _with_parent_death_signal(argv: list[str]) -> list[str]:
    """``setpriv --pdeathsig KILL`` (util-linux, in every Debian) before the binary: the kernel kills
    Orthanc when the test process dies, even by SIGKILL where atexit can't run; setpriv execs it, so
    the pid stays Orthanc's.  Done by exec, not with a ``preexec_fn`` (Python code in a forked child of
    a threaded process)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or not sys.platform.startswith("linux"):
        return argv
    return [setpriv, "--pdeathsig", "KILL", "--", *argv]


class OrthancError(RuntimeError):
    """Orthanc did not start, or a REST call answered an HTTP error (``status`` and ``body`` kept)."""

    def __init__(self, message: str, *, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


def orthanc_binary() -> str | None:
    """Path of the Orthanc server binary: ``$VOXELDOSE_ORTHANC``, ``Orthanc`` on PATH, or /usr/sbin/Orthanc."""
    env = os.environ.get(BINARY_ENV)
    if env:
        return env if os.access(env, os.X_OK) else None
    found = shutil.which("Orthanc")
    if found:
        return found
    return DEBIAN_BINARY if os.access(DEBIAN_BINARY, os.X_OK) else None


def require_orthanc() -> str:
    """The binary, or skip the calling test/module with the reason (fail when ``VOXELDOSE_REQUIRE_ORTHANC=1``)."""
    import pytest

    binary = orthanc_binary()
    if binary is None:
        why = "Orthanc is not installed (apt-get install orthanc: /usr/sbin/Orthanc)"
        if os.environ.get(BINARY_ENV):
            why = f"${BINARY_ENV}={os.environ[BINARY_ENV]} is not an executable"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{why}, and {REQUIRE_ENV}=1", pytrace=False)
        pytest.skip(why)
    return binary


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now (the kernel's choice); a start that loses it to a race is retried."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def modality(aet: str, host: str, port: int, **extra: Any) -> dict[str, Any]:
    """A ``DicomModalities`` entry / ``PUT /modalities/{id}`` body (extra keys e.g. ``LocalAet``)."""
    return {"AET": aet, "Host": host, "Port": int(port), **extra}


def make_config(
    workdir: Path,
    *,
    aet: str,
    http_port: int,
    dicom_port: int,
    modalities: Mapping[str, tuple[str, str, int]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole configuration of a test instance (see the module docstring for why each key)."""
    storage = str(workdir / "storage")
    cfg: dict[str, Any] = {
        "Name": f"voxeldose-test-{aet}",
        "StorageDirectory": storage,
        "IndexDirectory": storage,
        "TemporaryDirectory": str(workdir / "tmp"),
        "StorageCompression": False,
        "Plugins": [],  # not the package's /usr/share/orthanc/plugins
        "LuaScripts": [],
        "ExecuteLuaEnabled": False,
        "RestApiWriteToFileSystemEnabled": False,
        "SaveJobs": False,
        "ConcurrentJobs": 2,
        # HTTP: loopback clients only, no login, no web UI/WebDAV
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "RegisteredUsers": {},
        "SslEnabled": False,
        "HttpDescribeErrors": True,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "HttpThreadsCount": 10,
        "HttpTimeout": 30,
        # DICOM: our AE title, checked; anyone may echo and store (the test SCU is not declared)
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomCheckModalityHost": False,
        "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
        "DicomModalitiesInDatabase": False,
        "DicomScuTimeout": 15,
        "DicomScpTimeout": 30,
        # close an outgoing association as soon as a push ends (default: kept open 5 s for reuse)
        "DicomAssociationCloseDelay": 0,
        "UnknownSopClassAccepted": False,
        "OverwriteInstances": False,
        "StableAge": 1,
    }
    cfg.update(extra or {})
    return cfg


class Orthanc:
    """One running Orthanc process of ours and a thin REST client on it (use :func:`start_orthanc`)."""

    def __init__(self, binary: str, workdir: Path, config: dict[str, Any]) -> None:
        self.binary = binary
        self.workdir = Path(workdir)
        self.config = config
        self.aet: str = config["DicomAet"]
        self.http_port: int = config["HttpPort"]
        self.dicom_port: int = config["DicomPort"]
        self.host = "127.0.0.1"
        self.url = f"http://{self.host}:{self.http_port}"
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, timeout=120.0, trust_env=False)

    # ------------------------------------------------------------------ process
    def _launch(self, timeout: float) -> None:
        for sub in ("storage", "tmp"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=2))
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                _with_parent_death_signal([self.binary, str(self.config_path)]),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                # no new session: in pytest's process group, so a group kill (CI, ^C) reaches it too
            )
        _LIVE.add(self)
        timeout *= support.wait_scale()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise OrthancError(f"Orthanc exited with {self.process.returncode} at start:\n{self.log_tail()}")
            try:
                r = self.http.get("/system", timeout=2.0)
                if r.status_code == 200:
                    info = r.json()
                    # the answer must be ours, not some other server that holds the port
                    if info.get("HttpPort") == self.http_port and info.get("DicomAet") == self.aet:
                        self.version = str(info.get("Version"))
                        self.system_info = info
                        break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise OrthancError(f"Orthanc did not answer GET /system within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)
        # the DICOM server is up before the REST API in Orthanc's start order; check all the same
        with socket.create_connection((self.host, self.dicom_port), timeout=5):
            pass

    def stop(self, timeout: float = 15.0) -> int | None:
        """Terminate, wait, kill if need be; idempotent. Returns the exit code."""
        proc = self.process
        try:
            self.http.close()
        except Exception:  # noqa: BLE001 - closing a client never matters for the stop
            pass
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        _LIVE.discard(self)
        return proc.returncode

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    def __enter__(self) -> Orthanc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Orthanc {self.aet} http={self.http_port} dicom={self.dicom_port} running={self.running}>"

    # ------------------------------------------------------------------ REST
    def request(self, method: str, path: str, **kw: Any) -> Any:
        """One REST call; JSON answer (or text); :class:`OrthancError` on an HTTP status >= 400."""
        r = self.http.request(method, path, **kw)
        try:
            body: Any = r.json()
        except ValueError:
            body = r.text
        if r.status_code >= 400:
            raise OrthancError(f"{method} {path} -> HTTP {r.status_code}: {body}", status=r.status_code, body=body)
        return body

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        if body is not None:
            kw["json"] = body
        return self.request("POST", path, **kw)

    def put(self, path: str, body: Any = None, **kw: Any) -> Any:
        if body is not None:
            kw["json"] = body
        return self.request("PUT", path, **kw)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def system(self) -> dict[str, Any]:
        return self.get("/system")

    def statistics(self) -> dict[str, Any]:
        """``GET /statistics``: CountPatients/Studies/Series/Instances, disk sizes."""
        return self.get("/statistics")

    def upload(self, path: str | Path) -> str:
        """``POST /instances`` of one Part 10 file; the Orthanc instance id (also when already stored)."""
        data = Path(path).read_bytes()
        ans = self.request("POST", "/instances", content=data, headers={"Content-Type": "application/dicom"})
        if not isinstance(ans, dict) or ans.get("Status") not in ("Success", "AlreadyStored"):
            raise OrthancError(f"upload of {path} not stored: {ans}", body=ans)
        return str(ans["ID"])

    def upload_many(self, paths: Iterable[str | Path]) -> list[str]:
        return [self.upload(p) for p in paths]

    def put_modality(self, name: str, aet: str, host: str, port: int, **extra: Any) -> None:
        """``PUT /modalities/{name}`` (declare/replace a peer; extra keys e.g. ``LocalAet="OTHER"``)."""
        self.put(f"/modalities/{name}", modality(aet, host, port, **extra))

    def modalities(self) -> list[str]:
        return list(self.get("/modalities"))

    def echo(self, name: str) -> bool:
        """``POST /modalities/{name}/echo``: C-ECHO from Orthanc; False when the peer refuses."""
        try:
            self.post(f"/modalities/{name}/echo", {})
            return True
        except OrthancError:
            return False

    def push(self, name: str, resources: list[str], **extra: Any) -> dict[str, Any]:
        """``POST /modalities/{name}/store`` of Orthanc ids (any level), synchronous.

        Orthanc 1.10 answers ``{"Description", "FailedInstancesCount", "InstancesCount", "LocalAet",
        "ParentResources", "RemoteAet"}``; a refused association or a failed C-STORE is an HTTP error
        (:class:`OrthancError`, ``body`` holds Orthanc's error JSON).
        """
        body = {"Resources": list(resources), "Synchronous": True, **extra}
        return self.post(f"/modalities/{name}/store", body)

    def push_study(self, name: str, study_id: str, **extra: Any) -> dict[str, Any]:
        return self.push(name, [study_id], **extra)

    def find(self, level: str, query: Mapping[str, str], **extra: Any) -> list[dict[str, Any]]:
        """``POST /tools/find`` with ``Expand: true``: the matching resources, each with MainDicomTags."""
        body = {"Level": level, "Query": dict(query), "Expand": True, **extra}
        return list(self.post("/tools/find", body))

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """``GET /instances/{id}/tags?simplify``: ``{keyword: value}``."""
        return self.get(f"/instances/{instance_id}/tags", params={"simplify": ""})

    def instance_file(self, instance_id: str) -> bytes:
        """The stored Part 10 bytes (``GET /instances/{id}/file``)."""
        r = self.http.get(f"/instances/{instance_id}/file")
        if r.status_code != 200:
            raise OrthancError(f"GET /instances/{instance_id}/file -> HTTP {r.status_code}", status=r.status_code)
        return r.content

    def study_instances(self, study_id: str) -> list[dict[str, Any]]:
        return list(self.get(f"/studies/{study_id}/instances"))

    def changes(self, since: int = 0, limit: int = 1000) -> dict[str, Any]:
        """``GET /changes``: ``{"Changes": [{"ChangeType", "ResourceType", "ID", "Seq", ...}], "Done", "Last"}``."""
        return self.get("/changes", params={"since": since, "limit": limit})


def start_orthanc(
    workdir: str | Path,
    *,
    aet: str = "ORTHANC",
    modalities: Mapping[str, tuple[str, str, int]] | None = None,
    extra_config: Mapping[str, Any] | None = None,
    timeout: float = support.STATE_WAIT_S,
    binary: str | None = None,
) -> Orthanc:
    """Start an Orthanc of our own in ``workdir`` (created) and wait until ``GET /system`` answers.

    ``modalities``: ``{id: (AET, host, port)}`` known from the start (``put_modality`` adds more).
    Up to three tries with fresh ports, in case another process takes a chosen port meanwhile.
    """
    binary = binary or orthanc_binary()
    if binary is None:
        raise OrthancError("Orthanc is not installed (apt-get install orthanc)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    last: OrthancError | None = None
    for _ in range(3):
        http_port = free_port()
        dicom_port = free_port()
        while dicom_port == http_port:
            dicom_port = free_port()
        cfg = make_config(
            workdir, aet=aet, http_port=http_port, dicom_port=dicom_port, modalities=modalities, extra=extra_config
        )
        node = Orthanc(binary, workdir, cfg)
        try:
            node._launch(timeout)
            return node
        except BaseException as e:
            node.stop()
            if not isinstance(e, OrthancError):
                raise
            last = e
    assert last is not None
    raise last


@atexit.register
def _stop_leftovers() -> None:
    for o in list(_LIVE):
        try:
            o.stop(timeout=5)
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass
