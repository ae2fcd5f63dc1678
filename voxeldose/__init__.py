"""voxeldose: patient-specific absorbed-dose maps after 177Lu radionuclide therapy.

Units inside the library: activity Bq, time s, time-integrated activity Bq·s, dose Gy, lengths mm,
density g/cm³.  Geometry is DICOM patient coordinates (LPS, mm); see :mod:`voxeldose.geometry`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Unpack

from .errors import VoxeldoseError
from .geometry import Grid, Volume, resample

if TYPE_CHECKING:
    from .dose import DoseOptions


def absorbed_dose(
    tia: Volume,
    nuclide: str = "Lu-177",
    method: str = "dvk",
    density: Volume | None = None,
    **kwargs: Unpack[DoseOptions],
) -> Volume:
    """Absorbed dose (Gy) from a time-integrated activity Volume (Bq·s); see :func:`voxeldose.dose.absorbed_dose`."""
    from .dose import absorbed_dose as _absorbed_dose

    return _absorbed_dose(tia, nuclide=nuclide, method=method, density=density, **kwargs)


try:
    __version__ = version("voxeldose")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["Grid", "Volume", "VoxeldoseError", "absorbed_dose", "resample", "__version__"]
