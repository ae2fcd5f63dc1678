"""Log lines of the service processes (``voxeldose serve``, ``voxeldose dicom-node``): plain text, or one JSON
object per line when ``VOXELDOSE_LOG_JSON=true``.

Plain::

    2026-11-27 19:16:35,940 INFO    service.dispatcher: job 0d9ad4efc2bd45eebb66adc73d3d3ea3 submitted (cpu, attempt 1)

JSON (keys in this order; ``job_id`` only when the record has one, ``exc`` only with a traceback)::

    {"ts": "2026-11-27T19:16:35.940Z", "level": "INFO", "logger": "service.dispatcher",
     "msg": "job 0d9ad4efc2bd45eebb66adc73d3d3ea3 submitted (cpu, attempt 1)", "job_id": "0d9ad4efc2bd45eebb66adc73d3d3ea3"}

Where ``job_id`` comes from, first found wins: ``log.info(..., extra={"job_id": id})``; the context variable set by
:func:`job_context`; a message of the form the service's modules write, ``"job <32 hex digits>…"``.

No patient data (issue 14): the service's own messages (loggers ``service.*`` and the library's ``voxeldose.*``)
name job ids, states, stages, counts and route templates, never patient names, ids, dates or accession numbers.
Text that comes from elsewhere cannot be vetted message by message — pydicom's validation warnings quote the raw
element value (``Invalid value for VR DA: '1958-03-12'``; a UID whose length runs into the patient module quotes
the patient's name and ID), and so do Python's own exception messages (``time data '…' does not match``).  So the
handler treats it as unsafe and applies one rule rather than a list of patterns:

- **quoted text is dropped** — every ``'…'`` / ``"…"`` (Python's ``repr``, and the way pydicom, pynetdicom and
  the standard library quote a value; an unclosed quote runs to the end of the line) becomes ``<value>`` in
  records of every other logger (``pydicom``, ``pynetdicom``, ``py.warnings``, ``ray``, ``uvicorn``, …), in an
  exception passed as an argument of one of our own messages (``log.warning("…: %s", exc)``), and in every
  traceback and stack (except its ``File "…", line N`` lines).  What stays says what went wrong and where (the
  VR, the tag, the module and line) without the value;
- **warnings go through logging**: :func:`setup_logging` turns on :func:`logging.captureWarnings`, so a
  :func:`warnings.warn` (pydicom calls it beside its logger for each validation warning) becomes a record of
  ``py.warnings`` filtered like the rest, instead of a second, unfiltered copy on stderr;
- **every process we run is configured**: ``voxeldose serve`` and ``voxeldose dicom-node`` (:func:`setup_logging`)
  and each Ray worker (:func:`setup_worker_logging`, called by :func:`service.worker.run_job_in_worker` before any
  DICOM is read: Ray copies a worker's stderr into ``<ray temp dir>/session_*/logs/worker-*.err`` and into the
  driver's output);
- **no data set dumps**: pynetdicom's loggers stay at INFO or above (at DEBUG it dumps PDUs and data sets in hex),
  and the node turns off its identifier logging (:mod:`service.dicom_node`);
- as before, DICOM UIDs and person names in DICOM form (``FAMILY^GIVEN``) are replaced by ``<uid>`` and ``<name>``
  everywhere, our own messages included;
- a message whose arguments do not fit its format string is written with the arguments withheld (logging's own
  error report would print them raw on stderr); a traceback is scrubbed once and cached on the record
  (``exc_text``), so that a handler some library put beside ours formats the scrubbed text too.

Why not switch pydicom's validation off (``pydicom.config.settings.reading_validation_mode = IGNORE``): the
warnings are the only hint that an instance is malformed, the library would behave differently in the service than
in the ``voxeldose`` command, and pydicom's exception messages quote values as well — the rule above covers all of
them.  Why not a list of patterns (dates, IDs): an ID has no recognisable form, a pattern list only catches what
someone thought of.  The cost of the rule: an apostrophe in third-party prose (``can't``) hides the text up to the
next quote; and pydicom's logger and its :func:`warnings.warn` give two records per validation warning.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import json
import logging
import os
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

#: A quoted value as Python's ``repr``, pydicom and pynetdicom write one: ``'…'`` or ``"…"`` with backslash escapes
#: inside; without its closing quote it runs to the end of the line (see the module doc)
_QUOTED = re.compile(r"""(['"])(?:\\.?|(?!\1)[^\\\n])*(?:\1|$)""", re.MULTILINE)
#: The location lines of a traceback (``  File "/path/x.py", line 12, in f``): kept as they are
_TRACEBACK_FILE_LINE = re.compile(r'^\s*File "[^"\n]*", line \d+(?:, in \S+)?$')
#: Loggers whose messages are the service's own (vetted) text; every other logger's are third-party text
OWN_LOGGERS = ("service", "voxeldose")
#: Replaces a quoted value
VALUE = "<value>"

PLAIN_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
#: Formats a traceback before it is scrubbed
_PLAIN_TRACEBACK = logging.Formatter()
#: Set on a record whose ``exc_text`` is scrubbed already
_SCRUBBED = "_voxeldose_scrubbed"


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


def drop_quoted(text: str) -> str:
    """``text`` with every quoted value (``'…'``, ``"…"``) replaced by ``<value>`` (see the module doc)."""
    return _QUOTED.sub(VALUE, text)


def scrub_traceback(text: str) -> str:
    """A formatted traceback or stack with quoted values dropped (:func:`drop_quoted`) on every line except the
    ``File "…", line N, in f`` lines, and UIDs and person names redacted (:func:`redact`)."""
    lines = text.split("\n")
    return redact("\n".join(ln if _TRACEBACK_FILE_LINE.match(ln) else drop_quoted(ln) for ln in lines))


def is_own_logger(name: str) -> bool:
    """True for the service's and the library's loggers (``service``, ``service.*``, ``voxeldose``, …)."""
    return any(name == own or name.startswith(own + ".") for own in OWN_LOGGERS)


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
    """Sets ``record.job_id`` (or None) and makes the message safe (see the module doc): quoted values dropped from
    third-party records and from exceptions passed as arguments, UIDs and person names redacted.  Installed on the
    service's handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = record_job_id(record)
        third_party = not is_own_logger(record.name)
        if (
            not third_party
            and isinstance(record.args, tuple)
            and any(isinstance(a, BaseException) for a in record.args)
        ):
            record.args = tuple(drop_quoted(str(a)) if isinstance(a, BaseException) else a for a in record.args)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string (logging's own report would print the arguments)
            text = redact(drop_quoted(str(record.msg)))
            record.msg, record.args = f"{text} (arguments withheld: the message could not be formatted)", None
        else:
            clean = redact(drop_quoted(message) if third_party else message)
            if clean != message:
                record.msg, record.args = clean, None
        # the traceback, scrubbed once and cached where every logging.Formatter looks first (``exc_text``), so that
        # another handler of the same record (one a library installed) never formats it from ``exc_info`` itself
        if record.exc_info and not getattr(record, _SCRUBBED, False):
            record.exc_text = scrub_traceback(_PLAIN_TRACEBACK.formatException(record.exc_info))
            setattr(record, _SCRUBBED, True)
        return True


class PlainFormatter(logging.Formatter):
    """The plain line (``PLAIN_FORMAT``), with the traceback and stack scrubbed (:func:`scrub_traceback`)."""

    def __init__(self) -> None:
        super().__init__(PLAIN_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_text and not getattr(record, _SCRUBBED, False):
            record.exc_text = scrub_traceback(record.exc_text)  # cached by a formatter that does not scrub
            setattr(record, _SCRUBBED, True)
        return super().format(record)

    def formatException(self, ei: Any) -> str:
        return scrub_traceback(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return scrub_traceback(super().formatStack(stack_info))


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
            out["exc"] = scrub_traceback(self.formatException(record.exc_info))
        elif record.exc_text:  # (scrubbing twice changes nothing)
            out["exc"] = scrub_traceback(record.exc_text)
        if record.stack_info:
            out["stack"] = scrub_traceback(self.formatStack(record.stack_info))
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
    alembic's chatter at WARNING, pynetdicom never below INFO, and :func:`warnings.warn` routed through logging
    (:func:`logging.captureWarnings`).  In JSON mode Ray's own driver-side logger is routed through the same
    handler, so every line the process writes through ``logging`` is JSON.  Returns the handler."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_voxeldose", False):
            root.removeHandler(h)
            h.close()
    handler = make_handler(json_lines, stream)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # at DEBUG pynetdicom dumps every PDU (data sets in hex): never
    logging.getLogger("pynetdicom").setLevel(max(level, logging.INFO))
    logging.captureWarnings(True)
    if json_lines:
        _adopt_ray_logger()
    return handler


#: ``VOXELDOSE_LOG_JSON`` values read as true (as pydantic reads a bool setting)
_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})


def setup_worker_logging(*, level: int = logging.WARNING) -> None:
    """Configure a Ray worker process (or any process the service starts without :func:`setup_logging`): the
    service's handler on stderr (JSON when ``VOXELDOSE_LOG_JSON`` is true in its environment), WARNING — a worker
    reports problems, the driver reports progress — and warnings through logging; a handler that Ray (or another
    library) put on the root logger before gets the service's filter too.  Idempotent: a second call (the next task
    in the same worker) changes nothing."""
    root = logging.getLogger()
    if any(getattr(h, "_voxeldose", False) for h in root.handlers):
        return
    for h in root.handlers:
        h.addFilter(ContextFilter())
    json_lines = os.environ.get("VOXELDOSE_LOG_JSON", "").strip().lower() in _TRUE
    root.addHandler(make_handler(json_lines))
    root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(max(level, logging.INFO))
    logging.captureWarnings(True)


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
