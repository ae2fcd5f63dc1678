"""``voxeldose serve`` and ``voxeldose token`` (found by ``voxeldose`` through the entry-point group
``voxeldose.commands``).  Each takes the argv after its name and returns an exit status.

    voxeldose serve [--host 127.0.0.1] [--port 8000] [--data-dir DIR]
    voxeldose token create --name NAME --role submitter|physicist|admin
    voxeldose token list
    voxeldose token revoke --name NAME
    voxeldose dicom-node [--host 127.0.0.1] [--port 11112] [--ae-title VOXELDOSE] [--allow-aet AET ...]

Settings come from ``VOXELDOSE_*`` environment variables (see :mod:`service.config`); the options
override them.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import uvicorn
from pydantic import ValidationError

from .app import create_app
from .auth import ROLES
from .config import Settings
from .dispatcher import Dispatcher, shutdown_ray
from .logs import setup_logging
from .node_runtime import NodeRuntime, start_node
from .store import Store

log = logging.getLogger("service")


def _settings(**overrides: object) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]  # names checked by pydantic


def _setup_logging(json_lines: bool) -> None:
    """Plain or JSON lines with the job id, never patient data (:mod:`service.logs`)."""
    setup_logging(json_lines)


class _Terminated(Exception):
    pass


def serve(argv: Sequence[str]) -> int:
    """Run the HTTP service with its job dispatcher and Ray (Ctrl-C or SIGTERM stops it cleanly)."""
    p = argparse.ArgumentParser(prog="voxeldose serve", description=serve.__doc__)
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--data-dir", type=Path, default=None, help="data folder (default ./voxeldose-data)")
    args = p.parse_args(list(argv))
    try:
        settings = _settings(host=args.host, port=args.port, data_dir=args.data_dir)
    except ValidationError as exc:
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return 2
    _setup_logging(settings.log_json)

    # Until uvicorn installs its own handlers, SIGTERM unwinds like Ctrl-C (so Ray is shut down).
    def _term(_sig: int, _frame: FrameType | None) -> None:
        raise _Terminated()

    old_term = signal.signal(signal.SIGTERM, _term)
    store: Store | None = None
    dispatcher: Dispatcher | None = None
    runtime: NodeRuntime | None = None
    try:
        settings.ensure_dirs()
        store = Store(settings.db_url, max_attempts=settings.max_attempts)
        store.migrate()
        if settings.dicom_enabled:
            try:
                runtime = start_node(settings, store)
            except OSError as exc:
                print(
                    f"error: the DICOM node cannot listen on {settings.dicom_host}:{settings.dicom_port}: {exc} "
                    "(VOXELDOSE_DICOM_PORT, or VOXELDOSE_DICOM_ENABLED=false)",
                    file=sys.stderr,
                )
                return 3
        dispatcher = Dispatcher(store, settings)
        try:
            dispatcher.start()
        except (ConnectionError, TimeoutError, RuntimeError) as exc:  # ray.init: cluster unreachable
            where = settings.ray_address or "(a local Ray started here)"
            print(
                f"error: cannot start or join the Ray cluster {where}: {type(exc).__name__}: {exc} "
                "(RAY_ADDRESS: host:6379 on a Ray node, or ray://host:10001)",
                file=sys.stderr,
            )
            dispatcher = None
            return 3
        # STOW-RS stores through the running node (and its trigger) when there is one
        app = create_app(settings, store, dispatcher, node=runtime.node if runtime is not None else None)
        # ray.init() installed a SIGTERM handler of its own (sys.exit(15)); uvicorn restores and
        # re-raises whatever handler it finds, so put ours back: SIGTERM ends with status 0.
        signal.signal(signal.SIGTERM, _term)
        log.info("serving on http://%s:%d (data in %s)", settings.host, settings.port, settings.data_dir)
        server = uvicorn.Server(
            uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False)
        )
        server.run()  # returns on SIGINT/SIGTERM (uvicorn's handlers, restored afterwards)
        return 0
    except (KeyboardInterrupt, _Terminated):
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
        if runtime is not None:
            runtime.stop()
        if dispatcher is not None:
            dispatcher.stop()
        shutdown_ray()
        if store is not None:
            store.dispose()
        signal.signal(signal.SIGTERM, old_term)
        log.info("stopped")


def token(argv: Sequence[str]) -> int:
    """Create, list and revoke API tokens (the plain token is printed once, at creation)."""
    p = argparse.ArgumentParser(prog="voxeldose token", description=token.__doc__)
    p.add_argument("--data-dir", type=Path, default=None, help="data folder (default ./voxeldose-data)")
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("create", help="create a token and print it once")
    c.add_argument("--name", required=True, help="who or what uses it (unique among active tokens)")
    c.add_argument("--role", required=True, choices=ROLES)
    sub.add_parser("list", help="list tokens (names, roles, dates; never the tokens)")
    r = sub.add_parser("revoke", help="revoke the active token of this name")
    r.add_argument("--name", required=True)
    args = p.parse_args(list(argv))
    try:
        settings = _settings(data_dir=args.data_dir)
    except ValidationError as exc:
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return 2
    store = Store(settings.db_url)
    try:
        store.migrate()
        if args.action == "create":
            try:
                plain = store.create_token(args.name, args.role)
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            print(plain)
            print(f"token for {args.name!r} ({args.role}); it is shown only now: store it safely", file=sys.stderr)
            return 0
        if args.action == "list":
            rows = store.list_tokens()
            if not rows:
                print("no tokens")
            for t in rows:
                last = t["last_used_at"].isoformat(timespec="seconds") if t["last_used_at"] else "never used"
                revoked = t["revoked_at"]
                state = "active" if revoked is None else f"revoked {revoked.isoformat(timespec='seconds')}"
                print(
                    f"{t['name']:<24} {t['role']:<10} created {t['created_at'].isoformat(timespec='seconds')}  {last}  {state}"
                )
            return 0
        if store.revoke_token(args.name):
            print(f"revoked {args.name!r}")
            return 0
        print(f"error: no active token named {args.name!r}", file=sys.stderr)
        return 1
    finally:
        store.dispose()


def dicom_node(argv: Sequence[str]) -> int:
    """Run the DICOM node (Storage SCP) with its job trigger and result sender, without the HTTP API
    (jobs it starts wait in the database for a `voxeldose serve` with VOXELDOSE_DICOM_ENABLED=false);
    Ctrl-C or SIGTERM stops it cleanly."""
    p = argparse.ArgumentParser(prog="voxeldose dicom-node", description=dicom_node.__doc__)
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="DICOM port (default 11112)")
    p.add_argument("--ae-title", default=None, help="our AE title (default VOXELDOSE)")
    p.add_argument(
        "--allow-aet",
        action="append",
        default=None,
        metavar="AET",
        help="calling AE title allowed to send (repeat; default from VOXELDOSE_DICOM_ALLOWED_AETS)",
    )
    p.add_argument("--data-dir", type=Path, default=None, help="data folder (default ./voxeldose-data)")
    args = p.parse_args(list(argv))
    try:
        settings = _settings(
            dicom_host=args.host,
            dicom_port=args.port,
            dicom_ae_title=args.ae_title,
            dicom_allowed_aets=args.allow_aet,
            data_dir=args.data_dir,
        )
    except ValidationError as exc:
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return 2
    _setup_logging(settings.log_json)
    stop = threading.Event()

    def _stop(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    old = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    store: Store | None = None
    node: NodeRuntime | None = None
    try:
        settings.ensure_dirs()
        store = Store(settings.db_url, max_attempts=settings.max_attempts)
        store.migrate()
        try:
            node = start_node(settings, store)
        except OSError as exc:
            print(f"error: cannot listen on {settings.dicom_host}:{settings.dicom_port}: {exc}", file=sys.stderr)
            return 3
        while not stop.wait(1.0):
            pass
        return 0
    finally:
        if node is not None:
            node.stop()
        if store is not None:
            store.dispose()
        for s, h in old.items():
            signal.signal(s, h)
        log.info("stopped")
