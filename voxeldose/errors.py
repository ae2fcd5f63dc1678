"""The one exception type that bad input raises.

A physicist must be able to act on the message alone: it names the file, the DICOM tag (keyword and
(gggg,eeee) number) or field, what was expected and what was found.  The service turns this into a
4xx answer or a failed job with the same text; the CLI prints it without a traceback.
"""

from __future__ import annotations

from os import PathLike


class VoxeldoseError(Exception):
    """Bad or incomplete input, described for a person.

    Parameters
    ----------
    message:
        What is wrong, in words a medical physicist understands.
    path:
        The file (or folder, or series) the problem was found in, if any.
    tag:
        The DICOM attribute, e.g. ``"RadionuclideTotalDose (0018,1074)"``, or a job field name.
    expected:
        What was expected there.
    found:
        What was found instead (``None`` to omit).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | PathLike[str] | None = None,
        tag: str | None = None,
        expected: str | None = None,
        found: object = None,
    ) -> None:
        self.reason = message
        self.path = str(path) if path is not None else None
        self.tag = tag
        self.expected = expected
        self.found = found
        super().__init__(self._compose())

    def _compose(self) -> str:
        parts = []
        if self.path:
            parts.append(f"{self.path}:")
        parts.append(self.reason)
        details = []
        if self.tag:
            details.append(f"tag {self.tag}")
        if self.expected:
            details.append(f"expected {self.expected}")
        if self.found is not None:
            details.append(f"found {self.found!r}")
        if details:
            parts.append("(" + "; ".join(details) + ")")
        return " ".join(parts)

    def to_dict(self) -> dict[str, str | None]:
        """JSON-friendly form, for ``inspect --json`` and the service's problem+json."""
        return {
            "message": str(self),
            "path": self.path,
            "tag": self.tag,
            "expected": self.expected,
            "found": None if self.found is None else str(self.found),
        }
