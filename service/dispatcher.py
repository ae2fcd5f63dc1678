"""The dispatcher: hands queued jobs from the database to Ray and records what comes back.

One daemon thread, every ``dispatch_interval_s``:

1. collects finished tasks (``ray.wait(timeout=0)``): success → ``finish``; a job failure the
   worker reported (bad input, or a bug) → ``fail``; the worker lost (crash, kill, node died,
   ``sys.exit``) → ``requeue``, which fails the job once it has run ``max_attempts`` times;
2. stops (``ray.cancel(force=True)``) tasks whose job a user cancelled or that ran past
   ``job_timeout_s``;
3. claims up to ``jobs_in_flight − in_flight`` queued jobs and submits them, asking for one GPU
   when the cluster has GPUs, else one CPU.

At start, jobs left ``running`` by a service that died are requeued, so after a ``kill -9`` and
a restart they run again.  One dispatcher per database: a second replica's restart would requeue
the first one's running jobs.

Ray: ``ray_address`` None starts Ray in this process — ``num_cpus`` from the settings, no
dashboard, a small object store (jobs pass file paths, not arrays).  Ray binds its ports on the
machine's address, not loopback (Ray maps 127.0.0.1 to the node address on purpose), so token
authentication (Ray's default for a new local cluster) stays on, with the token generated into
``data_dir/ray-auth-token`` (mode 0600, passed as ``RAY_AUTH_TOKEN_PATH``; no ``~/.ray`` needed),
unless the operator set ``RAY_AUTH_MODE`` / ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``.  With
``ray_address`` set, Ray joins that cluster with the environment's auth settings.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Settings
from .store import JobRecord, Store
from .worker import INTERNAL_ERROR, JobOutcome, remote_run_job

log = logging.getLogger("service.dispatcher")

_GPU_CHECK_EVERY_S = 10.0


def _ray_auth_env(settings: Settings) -> None:
    """Token auth for the embedded Ray, with the token in the data folder (see module doc)."""
    if any(k in os.environ for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        return
    path = Path(settings.data_dir) / "ray-auth-token"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    # Only the path: with RAY_AUTH_MODE unset, ray.init() of a new local cluster turns token mode on
    # itself (and re-reads its cached config, which setting RAY_AUTH_MODE here after `import ray` would miss).
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)


# Ray is imported inside the functions that use it, on purpose: importing it takes seconds and configures its
# own loggers, and the processes that import this module without running jobs (``voxeldose token``, an
# API-only ``create_app``, the tests of the web layer) should not pay for that.


def shutdown_ray() -> None:
    """Stop the Ray this process started or joined (nothing when none runs; a failure is logged)."""
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:
        log.warning("ray.shutdown failed", exc_info=True)


def init_ray(settings: Settings, **extra: Any) -> bool:
    """Start (or join) Ray unless it is running in this process already; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    t0 = time.monotonic()
    if settings.ray_address:
        ray.init(address=settings.ray_address, **extra)
        log.info("joined the Ray cluster in %.1f s", time.monotonic() - t0)
    else:
        _ray_auth_env(settings)
        kwargs: dict[str, Any] = dict(num_cpus=settings.ray_num_cpus, include_dashboard=False)
        if settings.ray_object_store_mb:
            kwargs["object_store_memory"] = settings.ray_object_store_mb * 2**20
        kwargs.update(extra)
        ray.init(**kwargs)
        log.info("started a local Ray in %.1f s", time.monotonic() - t0)
    return True


@dataclass
class _Flight:
    job_id: str
    ref: Any
    submitted: float  # time.monotonic()


class Dispatcher:
    """``Dispatcher(store, settings)``; ``.start()`` / ``.stop()``.  ``task`` replaces the worker
    function (same signature as :func:`service.worker.run_job`) — for tests."""

    def __init__(self, store: Store, settings: Settings, *, task: Callable[..., Any] | None = None) -> None:
        self.store = store
        self.settings = settings
        self._task_fn = task
        self._remote: Any = None
        self._flights: dict[str, _Flight] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_ray = False
        self._gpu: tuple[float, bool] | None = None  # (checked at, has GPUs)
        self.recovered = 0
        self.last_error: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self.settings.ensure_dirs()
        self._started_ray = init_ray(self.settings)
        self.recovered = self.store.recover_after_restart()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="voxeldose-dispatcher", daemon=True)
        self._thread.start()
        log.info(
            "dispatcher started (device %s, %d job(s) in flight at most)", self.device(), self.settings.jobs_in_flight
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; running tasks are cancelled and their jobs queued again (the attempt is
        not counted: an orderly shutdown is not the job's fault)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            flights = list(self._flights.values())
            self._flights.clear()
        for f in flights:
            self._cancel_ref(f.ref)
            self.store.requeue(f.job_id, "the service was stopped", count_attempt=False)
        log.info("dispatcher stopped")

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ state for the API
    def in_flight(self) -> int:
        with self._lock:
            return len(self._flights)

    def ray_ok(self) -> bool:
        try:
            import ray

            if not ray.is_initialized():
                return False
            res: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]  # ray leaves it unannotated
            return res.get("CPU", 0) + res.get("GPU", 0) > 0
        except Exception:  # noqa: BLE001
            return False

    def device(self) -> str:
        """``"gpu"`` when the cluster has GPUs (dose tasks then ask for one), else ``"cpu"``."""
        return "gpu" if self._has_gpu() else "cpu"

    def _has_gpu(self) -> bool:
        now = time.monotonic()
        if self._gpu is None or now - self._gpu[0] > _GPU_CHECK_EVERY_S:
            try:
                import ray

                resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]  # as above
                has = ray.is_initialized() and resources.get("GPU", 0) > 0
            except Exception:  # noqa: BLE001
                has = False
            self._gpu = (now, bool(has))
        return self._gpu[1]

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
                self.last_error = None
            except Exception as exc:
                self.last_error = type(exc).__name__
                log.exception("dispatcher tick failed")
            self._stop.wait(self.settings.dispatch_interval_s)

    def tick(self) -> None:
        """One round: collect, enforce cancel/timeout, submit."""
        self._collect()
        self._enforce()
        self._submit()

    def _collect(self) -> None:
        import ray

        with self._lock:
            flights = list(self._flights.values())
        if not flights:
            return
        by_ref = {f.ref: f for f in flights}
        ready, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0)
        for ref in ready:
            f = by_ref[ref]
            with self._lock:
                self._flights.pop(f.job_id, None)
            self._record(f.job_id, ref)

    def _record(self, job_id: str, ref: Any) -> None:
        import ray
        from ray import exceptions as rex

        lost = (
            rex.WorkerCrashedError,
            rex.NodeDiedError,
            rex.LocalRayletDiedError,
            rex.ObjectLostError,
            rex.RaySystemError,
            rex.OutOfMemoryError,
            rex.TaskUnschedulableError,
        )
        try:
            out = ray.get(ref, timeout=0)
        except rex.TaskCancelledError:
            job = self.store.get_job(job_id)
            if job is not None and job.cancel_requested:
                self.store.mark_cancelled(job_id)
            else:
                self.store.requeue(job_id, "the task was cancelled by Ray")
            return
        except lost as exc:
            self.store.requeue(job_id, f"worker lost: {type(exc).__name__}")
            return
        except rex.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, (SystemExit, KeyboardInterrupt, *lost)):
                self.store.requeue(job_id, f"worker exited: {type(cause).__name__}")
            else:  # the task function itself raised (it should return failures): a bug
                log.error("job %s: task raised %s", job_id, type(cause).__name__, exc_info=exc)
                self.store.fail(job_id, INTERNAL_ERROR.format(job_id=job_id))
            return
        except Exception as exc:
            log.error("job %s: unexpected %s from Ray", job_id, type(exc).__name__, exc_info=exc)
            self.store.requeue(job_id, f"unexpected {type(exc).__name__}")
            return
        if isinstance(out, JobOutcome) and out.error is not None:
            self.store.fail(job_id, out.error)
        elif isinstance(out, JobOutcome) and out.result_dir is not None:
            self.store.finish(job_id, out.result_dir, out.patient_id, out.output_series)
        else:  # neither a result nor a failure: a bug in the task function
            log.error("job %s: task returned %s", job_id, type(out).__name__)
            self.store.fail(job_id, INTERNAL_ERROR.format(job_id=job_id))

    def _enforce(self) -> None:
        with self._lock:
            flights = list(self._flights.values())
        if not flights:
            return
        cancel = self.store.cancel_requested_ids([f.job_id for f in flights])
        now = time.monotonic()
        for f in flights:
            if f.job_id in cancel:
                self._drop(f)
                self.store.mark_cancelled(f.job_id)
            elif now - f.submitted > self.settings.job_timeout_s:
                self._drop(f)
                log.warning("job %s: time limit of %g s reached", f.job_id, self.settings.job_timeout_s)
                self.store.fail(
                    f.job_id,
                    f"the job ran longer than the time limit ({self.settings.job_timeout_s:g} s) and was stopped",
                )

    def _drop(self, f: _Flight) -> None:
        with self._lock:
            self._flights.pop(f.job_id, None)
        self._cancel_ref(f.ref)

    @staticmethod
    def _cancel_ref(ref: Any) -> None:
        try:
            import ray

            ray.cancel(ref, force=True)
        except Exception:
            log.debug("ray.cancel failed", exc_info=True)

    def _task(self) -> Any:
        if self._remote is None:
            if self._task_fn is None:
                self._remote = remote_run_job()
            else:
                import ray

                self._remote = ray.remote(max_retries=0)(self._task_fn)
        return self._remote

    def _submit(self) -> None:
        free = self.settings.jobs_in_flight - self.in_flight()
        if free <= 0 or self._stop.is_set():
            return
        for job in self.store.claim_queued(free):
            self._submit_one(job)

    def _submit_one(self, job: JobRecord) -> None:
        resources = {"num_gpus": 1} if self._has_gpu() else {"num_cpus": 1}
        out_dir = str(self.settings.job_out_dir(job.id))
        try:
            ref = (
                self._task()
                .options(name=f"voxeldose-job-{job.id}", **resources)
                .remote(job.id, job.spec, out_dir, self.store.url)
            )
        except Exception:
            log.exception("job %s: could not submit to Ray", job.id)
            self.store.requeue(job.id, "could not submit to Ray", count_attempt=False)
            raise
        with self._lock:
            self._flights[job.id] = _Flight(job.id, ref, time.monotonic())
        log.info("job %s submitted (%s, attempt %d)", job.id, "gpu" if "num_gpus" in resources else "cpu", job.attempts)
