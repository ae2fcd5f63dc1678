"""Reading ``multipart/*`` request bodies as they arrive (python-multipart), each file part straight to disk.

:func:`receive_multipart` reads an upload (``multipart/form-data``: field ``files``, optional ``spec``) into a
new temporary folder of the intake (:func:`service.intake.new_temp_dir`); :func:`stream_multipart` is the
streaming loop that STOW-RS (``multipart/related``) shares.  Nothing is held in memory; more than
``max_upload_mb`` received is refused as too large, a full disk as no storage, an unreadable body as a bad request.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol, cast

import python_multipart
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from python_multipart.multipart import parse_options_header

from ..config import Settings
from ..errors import ServiceError
from ..intake import (
    MAX_FILES,
    MAX_SPEC_BYTES,
    MB,
    Received,
    invalid,
    invalid_spec,
    new_temp_dir,
    no_storage,
    safe_relpath,
    too_large,
    unique_path,
)
from .problems import ProblemError

if TYPE_CHECKING:  # python-multipart declares its callback types for type checkers only
    from python_multipart.multipart import MultipartCallbacks


class Sink(Protocol):
    """python-multipart callbacks (by name) plus ``close()``, which ends the file being written."""

    def close(self) -> None: ...


class _FormSink:
    """python-multipart callbacks that write the ``files`` parts straight to disk and keep the ``spec`` text."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.files: list[Path] = []
        self.spec = bytearray()
        self.spec_parts = 0
        self._hname = b""
        self._hvalue = b""
        self._disposition = b""
        self._fh: IO[bytes] | None = None
        self._field: str | None = None
        self._filename: str | None = None

    def on_part_begin(self) -> None:
        self._disposition, self._field, self._filename = b"", None, None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def on_header_end(self) -> None:
        if self._hname.strip().lower() == b"content-disposition":
            self._disposition = self._hvalue
        self._hname, self._hvalue = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        self._field = name.decode("utf-8", "replace") if name is not None else None
        fn = options.get(b"filename")
        self._filename = fn.decode("utf-8", "replace") if fn is not None else None
        if self._field == "files":
            if len(self.files) >= MAX_FILES:
                raise invalid(f"too many files in one upload (at most {MAX_FILES}); send a .zip")
            target = unique_path(self.tmp, safe_relpath(self._filename or f"file{len(self.files) + 1}"))
            target.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(target, "wb")  # noqa: SIM115 - closed in on_part_end / close()
            self.files.append(target)
        elif self._field == "spec":
            self.spec_parts += 1

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._fh is not None:
            self._fh.write(data[start:end])
        elif self._field == "spec":
            if len(self.spec) + (end - start) > MAX_SPEC_BYTES:
                raise invalid_spec("the 'spec' field is larger than 1 MB")
            self.spec.extend(data[start:end])
        # other fields are ignored

    def on_part_end(self) -> None:
        self.close()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def bad_request(detail: str) -> ProblemError:
    return ProblemError(400, "Bad request", detail, slug="bad-request")


async def receive_multipart(request: Request, settings: Settings) -> Received:
    """Stream a ``multipart/form-data`` body into a new temp folder under ``incoming/``.

    The caller owns ``Received.tmp`` (and must remove it when the upload is rejected); on an error raised
    here the folder is already removed."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise bad_request("multipart/form-data without a boundary")
    tmp = new_temp_dir(settings)
    sink = _FormSink(tmp)
    try:
        received = await stream_multipart(
            request,
            settings,
            boundary,
            sink,
            body="the upload",
            kind="multipart",
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    spec_text = bytes(sink.spec).decode("utf-8", "replace") if sink.spec_parts else None
    return Received(tmp, sink.files, spec_text, received)


#: python-multipart's parser callbacks; a sink handles those it defines as methods of the same name.
CALLBACKS = (
    "on_part_begin",
    "on_part_data",
    "on_part_end",
    "on_header_field",
    "on_header_value",
    "on_header_end",
    "on_headers_finished",
    "on_end",
)


async def stream_multipart(
    request: Request,
    settings: Settings,
    boundary: bytes,
    sink: Sink,
    *,
    body: str,
    kind: str,
) -> int:
    """Feed the request body, as it arrives, to a python-multipart parser calling the :data:`CALLBACKS` that
    ``sink`` defines; returns the bytes received and always closes the sink.  Refused: over ``max_upload_mb`` (naming
    ``body``), the disk filling up, a ``kind`` body that cannot be parsed (400)."""
    limit = int(settings.max_upload_mb) * MB
    received = 0
    try:
        handlers = cast("MultipartCallbacks", {k: getattr(sink, k) for k in CALLBACKS if hasattr(sink, k)})
        parser = python_multipart.MultipartParser(boundary, handlers)
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise too_large(settings, body)
            if chunk:
                await run_in_threadpool(parser.write, chunk)
        parser.finalize()
    except (ProblemError, ServiceError):
        raise
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise no_storage(f"the disk filled up while receiving {body}") from None
        raise
    except Exception as exc:  # noqa: BLE001 - malformed multipart, client went away
        raise bad_request(f"the {kind} body could not be read ({type(exc).__name__})") from None
    finally:
        sink.close()
    return received
