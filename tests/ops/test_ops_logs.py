"""service/logs.py: plain and JSON lines, the job id, no patient data — in this process (formatter and filter) and
in a fresh interpreter configured the way ``voxeldose serve`` configures itself (``service.cli._setup_logging``)."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from datetime import datetime

import pytest

from service import logs

JOB = "0d9ad4efc2bd45eebb66adc73d3d3ea3"


@pytest.fixture
def capture():
    """``emit(json_lines, logger, level, msg, *args, **kw) -> str`` through the service's handler only."""

    def emit(json_lines: bool, name: str, level: int, msg: str, *args, **kw) -> str:
        buf = io.StringIO()
        handler = logs.make_handler(json_lines, buf)
        lg = logging.getLogger(name)
        old = (lg.handlers[:], lg.propagate, lg.level)
        lg.handlers, lg.propagate = [handler], False
        lg.setLevel(logging.DEBUG)
        try:
            lg.log(level, msg, *args, **kw)
        finally:
            lg.handlers, lg.propagate = old[0], old[1]
            lg.setLevel(old[2])
        return buf.getvalue()

    return emit


def test_json_line_fields_and_job_id_from_the_message(capture) -> None:
    out = capture(True, "service.dispatcher", logging.INFO, "job %s submitted (%s, attempt %d)", JOB, "gpu", 1)
    assert out.endswith("\n") and out.count("\n") == 1
    rec = json.loads(out)
    assert list(rec) == ["ts", "level", "logger", "msg", "job_id"]
    assert rec["level"] == "INFO" and rec["logger"] == "service.dispatcher"
    assert rec["msg"] == f"job {JOB} submitted (gpu, attempt 1)" and rec["job_id"] == JOB
    assert rec["ts"].endswith("Z") and len(rec["ts"]) == len("2026-11-27T19:16:35.940Z")


def test_job_id_from_extra_and_from_the_context(capture) -> None:
    other = "f" * 32
    assert json.loads(capture(True, "x", logging.INFO, "stage %s", "dose", extra={"job_id": other}))["job_id"] == other
    with logs.job_context(JOB):
        assert json.loads(capture(True, "x", logging.WARNING, "fit failed"))["job_id"] == JOB
    assert "job_id" not in json.loads(capture(True, "x", logging.INFO, "dispatcher started"))
    # an id-looking word elsewhere in a message, or a non-id after "job", is not taken for one
    assert "job_id" not in json.loads(capture(True, "x", logging.INFO, "jobs %s", JOB))
    assert "job_id" not in json.loads(capture(True, "x", logging.INFO, "job %s", "not-an-id"))


def test_plain_line(capture) -> None:
    out = capture(False, "service.store", logging.INFO, "job %s succeeded", JOB)
    assert out.rstrip().endswith(f"INFO    service.store: job {JOB} succeeded")
    assert out[:4].isdigit()


def test_exceptions_are_one_json_line_with_the_traceback(capture) -> None:
    try:
        raise ValueError("bad value")
    except ValueError:
        out = capture(True, "service.worker", logging.ERROR, "job %s: internal error", JOB, exc_info=True)
    assert out.count("\n") == 1
    rec = json.loads(out)
    assert rec["job_id"] == JOB and "Traceback" in rec["exc"] and "ValueError: bad value" in rec["exc"]


@pytest.mark.parametrize("json_lines", [True, False])
def test_dicom_uids_and_person_names_are_redacted(capture, json_lines) -> None:
    uid = "1.2.826.0.1.3680043.8.498.12345678901234567890"
    try:
        raise KeyError(f"SOPInstanceUID {uid} of DOE^JANE")
    except KeyError:
        out = capture(
            json_lines,
            "service.dicom_node",
            logging.ERROR,
            "store of %s for %s failed",
            uid,
            "Doe^Jane^M",
            exc_info=True,
        )
    assert uid not in out and "DOE^JANE" not in out and "Doe^Jane" not in out
    assert "<uid>" in out and "<name>" in out
    # what must stay: versions, addresses, nuclide names, ids
    kept = capture(
        json_lines, "x", logging.INFO, "ray %s at 10.0.0.12:6379, %s, job %s", "2.60.0", "^177^Lutetium", JOB
    )
    assert "2.60.0" in kept and "10.0.0.12:6379" in kept and "^177^Lutetium" in kept and JOB in kept


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)


def test_serve_logging_setup_json_in_a_fresh_process() -> None:
    """``_setup_logging(True)`` (what serve and dicom-node call with VOXELDOSE_LOG_JSON=true): every line on stderr
    is JSON — ours, alembic's warnings, and Ray's own driver-side logger, which Ray gives a plain handler on import."""
    code = f"""
import logging
from service.cli import _setup_logging
_setup_logging(True)
_setup_logging(True)  # twice: one handler, not two
logging.getLogger("service.store").info("job %s queued", "{JOB}")
logging.getLogger("alembic.runtime.migration").info("alembic chatter is not shown")
logging.getLogger("ray").info("ray driver line")
logging.getLogger("uvicorn.error").info("Uvicorn running on http://0.0.0.0:8000")
"""
    res = _run(code)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    recs = [json.loads(ln) for ln in lines]  # every line parses
    assert [r["logger"] for r in recs] == ["service.store", "ray", "uvicorn.error"], recs
    assert recs[0]["job_id"] == JOB and "job_id" not in recs[2]


def test_serve_logging_setup_plain_in_a_fresh_process() -> None:
    res = _run(f"""
import logging
from service.cli import _setup_logging
_setup_logging(False)
logging.getLogger("service.store").info("job %s queued", "{JOB}")
""")
    assert res.returncode == 0, res.stderr
    (line,) = res.stderr.splitlines()
    assert line.endswith(f"INFO    service.store: job {JOB} queued")


# ------------------------------------------------------------------ issue 14: no element values from other libraries
BIRTH = "1958-03-12"
#: a SOP Instance UID whose length ran into the patient module (what pydicom then quotes)
UID_RUN = "1.2.826.0.1.3680043.8.498.1\x00\x10\x00\x10\x00PN\x0c\x00KOVAC^ILSE\x10\x00\x20\x00LO\x08\x00PRV-8842"


@pytest.mark.parametrize("json_lines", [True, False])
def test_quoted_values_are_dropped_from_other_libraries_and_from_exceptions(capture, json_lines) -> None:
    """Issue 14 defect 2: pydicom's warnings quote the element value; the service's handler drops quoted values from
    every record of another library, from exceptions passed to our messages and from tracebacks."""
    out = capture(json_lines, "pydicom", logging.WARNING, f"Invalid value for VR DA: '{BIRTH}'.")
    assert BIRTH not in out and "Invalid value for VR DA" in out
    out = capture(json_lines, "pydicom", logging.WARNING, "Invalid value for VR UI: %r", UID_RUN)
    assert "KOVAC" not in out and "PRV-8842" not in out and "Invalid value for VR UI" in out
    warned = f"/x/pydicom/valuerep.py:440: UserWarning: Invalid value for VR DA: '{BIRTH}'.\n  warn_and_log(msg)\n"
    out = capture(json_lines, "py.warnings", logging.WARNING, "%s", warned)
    assert BIRTH not in out and "UserWarning: Invalid value for VR DA" in out
    # an unclosed quote (a message cut short) hides the rest of its line
    out = capture(json_lines, "pynetdicom.events", logging.INFO, "value 'KOVAC^ILSE PRV-8842")
    assert "PRV-8842" not in out
    # an exception's text given to one of our messages
    err = ValueError(f"Unable to convert '{BIRTH}' to 'DA' object")
    out = capture(json_lines, "service.trigger", logging.WARNING, "a file could not be read: %s", err)
    assert BIRTH not in out and "a file could not be read: Unable to convert" in out
    # a traceback: the exception's line loses the value, the File lines stay
    try:
        datetime.strptime(BIRTH, "%Y%m%d")
    except ValueError:
        out = capture(json_lines, "service.worker", logging.ERROR, "job %s: internal error", JOB, exc_info=True)
    assert BIRTH not in out and "ValueError: time data" in out and "test_ops_logs.py" in out
    # a message that cannot be formatted: its arguments are withheld (logging's own report would print them)
    out = capture(json_lines, "service.trigger", logging.WARNING, "patient %d", "PRV-8842")
    assert "PRV-8842" not in out and "arguments withheld" in out
    # the service's own messages are its own text: kept as written
    out = capture(json_lines, "service.dicom_node", logging.WARNING, "calling AE %r refused", "INTRUDER")
    assert "'INTRUDER'" in out


_PYDICOM_WARNS = f"""
import logging
from pydicom.dataset import Dataset
ds = Dataset()
ds.PatientBirthDate = "{BIRTH}"  # pydicom: logger "pydicom" and warnings.warn, both quoting the value
ds.SOPInstanceUID = {UID_RUN!r}
try:
    int("PRV-8842")
except ValueError:
    logging.getLogger("service.worker").exception("job %s: internal error", "{JOB}")
logging.getLogger("service.store").warning("done")
"""


@pytest.mark.parametrize(
    ("setup", "json_lines"),
    [
        ("from service.cli import _setup_logging; _setup_logging(True)", True),
        ("from service.logs import setup_worker_logging; setup_worker_logging()", False),
        # a handler some library put on the root logger before (Ray may): it gets the filter, and the scrubbed traceback
        (
            "import logging, sys; logging.getLogger().addHandler(logging.StreamHandler(sys.stderr))\n"
            "from service.logs import setup_worker_logging; setup_worker_logging()",
            False,
        ),
    ],
    ids=["serve-json", "ray-worker", "ray-worker-foreign-handler"],
)
def test_pydicom_warnings_reach_stderr_without_values_in_a_fresh_process(setup: str, json_lines: bool) -> None:
    """Issue 14 defect 2: in a process configured as ``voxeldose serve`` / ``dicom-node`` or as a Ray worker (whose
    stderr Ray copies into its ``worker-*.err`` files), pydicom's validation warnings — its logger and the second
    copy through :mod:`warnings` — are written through the service's handler, without the values."""
    res = _run(setup + "\n" + _PYDICOM_WARNS)
    assert res.returncode == 0, res.stderr
    err = res.stderr
    assert BIRTH not in err and "KOVAC" not in err and "PRV-8842" not in err, err
    assert "Invalid value for VR DA" in err and "Invalid value for VR UI" in err  # the warning itself is kept
    assert "ValueError: invalid literal for int()" in err  # the traceback, without the value
    assert "py.warnings" in err  # warnings.warn went through logging, not straight to stderr
    if json_lines:
        assert all(json.loads(ln) for ln in err.splitlines() if ln.strip())  # one JSON object per line
