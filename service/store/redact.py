"""Texts for people without the server's paths: what the store keeps in its message columns (a job's ``error``, a
trigger cycle's ``reason``, a delivery's ``last_error``) never names a folder on the server (issue 14).

The writers name what the reader knows first (a file relative to the job's inputs, ``series <UID>``); this is
the net under them: any absolute POSIX path left in a message becomes its last component, the file's name.
"""

from __future__ import annotations

import re

# A quoted absolute path (as OSError and repr() write one; it may hold blanks), or a "/" that starts a path (not
# inside a word, a number or a URL: "cps/MBq", "1/2", "http://h/x" stay) followed by two or more components of
# characters that are not blanks, quotes, brackets or the punctuation messages put after a path (":" ";" ",").
# An unquoted path with a blank in a folder name loses only the part before the last blank: the writers replace
# the paths they know first (a job's inputs, the received files).
_ABSOLUTE_PATH = re.compile(
    r"(?<=[\x22\x27])/[^\x22\x27\n]*/[^\x22\x27\n]*(?=[\x22\x27])"
    r"|(?<![\w.:/~\\-])/+(?:[^\s/\x22\x27`()\[\]{}<>|,;:]+/)+[^\s/\x22\x27`()\[\]{}<>|,;:]*"
)


def _last_component(m: re.Match[str]) -> str:
    parts = [p for p in m.group(0).split("/") if p]
    return parts[-1]


def without_paths(text: str) -> str:
    """``text`` with every absolute path of two or more components replaced by its last component
    (``/srv/voxeldose/dicom/1.2/3.4/5.6.dcm: not DICOM`` → ``5.6.dcm: not DICOM``)."""
    return _ABSOLUTE_PATH.sub(_last_component, text)


def message_without_paths(text: str | None) -> str | None:
    """:func:`without_paths` of a message column's value (None stays None)."""
    return None if text is None else without_paths(text)
