"""What a run produced: :class:`Result` (the typed ``summary.json`` plus the volumes the writers need).

A module of its own so that the writers (:mod:`voxeldose.outputs`, :mod:`voxeldose.sr`) can name the
type without importing :mod:`voxeldose.pipeline`, which imports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .geometry import Volume
from .ingest import Cycle, TimePoint
from .spec import JobSpec
from .summary import Summary, TimeActivity
from .timeactivity import FitResult
from .voi import VOI

#: A VOI's time-activity: the fit, or (one time point) the single-time-point record.
VoiFit = FitResult | TimeActivity


@dataclass
class Result:
    """Everything a run produced.  Volumes are on the reference SPECT grid (the dose grid)."""

    spec: JobSpec
    summary: Summary
    dose: Volume  # Gy
    tia: Volume  # Bq·s per voxel
    activity: list[Volume]  # Bq per voxel at each time point, aligned to the reference grid
    vois: dict[str, VOI]
    ct: Volume | None  # reference CT (HU)
    cycle: Cycle
    reference: TimePoint
    fits: dict[str, VoiFit] = field(default_factory=dict)
    tia_quality: np.ndarray | None = None  # fraction of each voxel's TIA in the extrapolated tail
    dose_uncertainty: Volume | None = None  # standard uncertainty (k = 1) of the dose, Gy, on the dose grid

    @property
    def warnings(self) -> list[str]:
        """What a physicist must look at (a copy of ``summary.warnings``)."""
        return list(self.summary.warnings)
