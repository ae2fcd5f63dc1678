"""Log lines of the service processes (``voxeldose serve``, ``voxeldose dicom-node``): plain text, or one JSON
object per line when ``VOXELDOSE_LOG_JSON=true``.

Plain::

    2026-11-27 19:16:35,940 INFO    service.dispatcher: job 0d9ad4efc2bd45eebb66adc73d3d3ea3 submitted (cpu, attempt 1)

JSON (keys in this order; ``job_id`` only when the record has one, ``exc`` only with a traceback)::

    {"ts": "2026-11-27T19:16:35.940Z", "level": "INFO", "logger": "service.dispatcher",
     "msg": "job 0d9ad4efc2bd45eebb66adc73d3d3ea3 submitted (cpu, attempt 1)", "job_id": "0d9ad4efc2bd45eebb66adc73d3d3ea3"}

Where ``job_id`` comes from, first found wins: ``log.info(..., extra={"job_id": id})``; the context variable set by
:func:`job_context`; a message of the form the service's modules write, ``"job <32 hex digits>…"``.

No patient data: the service's own messages name job ids, states, stages, counts and route templates, never
patient names or ids.  As a safety net for text that comes from elsewhere (an exception message quoting a DICOM
attribute), DICOM UIDs and person names in DICOM form (``FAMILY^GIVEN``) are replaced by ``<uid>`` and ``<name>``
in both formats, in the message and in the traceback.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

_JOB_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("voxeldose_job_id", default=None)

#: "job <uuid4 hex>" at the start of a message, as service.store / dispatcher / worker write them
_JOB_IN_MESSAGE = re.compile(r"^job ([0-9a-f]{32})\b")
#: DICOM UIDs: digits and dots, a root arc 0-2, at least five components ("1.2.840.10008.5.1.4")
_UID = re.compile(r"(?<![\w.])[012](?:\.(?:0|[1-9][0-9]*)){4,}(?![\w.])")
#: DICOM person names: FAMILY^GIVEN[^MIDDLE^PREFIX^SUFFIX] with letters on both sides of the first caret
_PERSON_NAME = re.compile(r"(?<![\w^])[^\W\d_][\w'\-]*\^[^\W\d_][\w'\-]*(?:\^[\w'\-]*)*")

PLAIN_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


@contextlib.contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Records logged inside the block (same thread or task) carry ``job_id``."""
    token = _JOB_ID.set(job_id)
    try:
        yield
    finally:
        _JOB_ID.reset(token)


def redact(text: str) -> str:
    """``text`` with DICOM UIDs and DICOM-style person names replaced (a safety net, see the module doc)."""
    return _PERSON_NAME.sub("<name>", _UID.sub("<uid>", text))


def record_job_id(record: logging.LogRecord) -> str | None:
    """The job id a record belongs to, or None (see the module doc)."""
    jid = getattr(record, "job_id", None) or _JOB_ID.get()
    if jid:
        return str(jid)
    msg = record.msg if isinstance(record.msg, str) else ""
    if msg.startswith("job %s") and record.args and isinstance(record.args, tuple):
        first = str(record.args[0])
        return first if re.fullmatch(r"[0-9a-f]{32}", first) else None
    m = _JOB_IN_MESSAGE.match(msg)
    return m.group(1) if m else None


class ContextFilter(logging.Filter):
    """Sets ``record.job_id`` (or None) and redacts the message; installed on the service's handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = record_job_id(record)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: let the formatter report it as logging does
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class PlainFormatter(logging.Formatter):
    """The plain line (``PLAIN_FORMAT``), with the traceback redacted."""

    def __init__(self) -> None:
        super().__init__(PLAIN_FORMAT)

    def formatException(self, ei: Any) -> str:
        return redact(super().formatException(ei))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, [``job_id``], [``exc``]."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        jid = getattr(record, "job_id", None)
        if jid is None:
            jid = record_job_id(record)
        if jid:
            out["job_id"] = jid
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            out["exc"] = redact(record.exc_text)
        if record.stack_info:
            out["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(out, ensure_ascii=False, default=str)


def make_handler(json_lines: bool, stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler (stderr by default) with the service's formatter and filter."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else PlainFormatter())
    handler.addFilter(ContextFilter())
    handler._voxeldose = True  # type: ignore[attr-defined]  # ours: replaced by the next setup_logging()
    return handler


def setup_logging(json_lines: bool, *, level: int = logging.INFO, stream: IO[str] | None = None) -> logging.Handler:
    """Configure the root logger of this process: one handler (ours; an earlier one of ours is replaced), INFO,
    alembic's chatter at WARNING.  In JSON mode Ray's own driver-side logger is routed through the same handler,
    so every line the process writes through ``logging`` is JSON.  Returns the handler."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_voxeldose", False):
            root.removeHandler(h)
            h.close()
    handler = make_handler(json_lines, stream)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if json_lines:
        _adopt_ray_logger()
    return handler


def _adopt_ray_logger() -> None:
    """Ray gives its ``ray`` logger a plain handler of its own when it is imported; import it now (the service
    imports it anyway) and let its records propagate to ours instead."""
    if importlib.util.find_spec("ray") is None:
        return
    try:
        import ray  # noqa: F401  (configures the "ray" logger on import)
    except Exception:  # noqa: BLE001 - a broken Ray install is reported where Ray is used
        return
    ray_logger = logging.getLogger("ray")
    for h in list(ray_logger.handlers):
        ray_logger.removeHandler(h)
    ray_logger.propagate = True
