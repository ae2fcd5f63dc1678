"""The patient's own kinetics from an earlier cycle, for a later cycle imaged once (``fit.stp_method 'prior'``).

:func:`prior_from_summary` reads each VOI's fitted exponentials from an earlier full result (its
``summary.json``: ``vois[name].time_activity.exponentials``) into a :class:`voxeldose.spec.PriorKinetics`;
the run then scales each curve to the one scan of this cycle (:func:`voxeldose.timeactivity.stp_prior`, whose
docstring has the method, its references and their stated errors).  Only fits with exponentials count: a
trapezoid (no analytic curve) or a single-time-point record of the earlier cycle gives no prior for that VOI.
"""

from __future__ import annotations

from pathlib import Path

from .errors import VoxeldoseError
from .spec import PriorExponential, PriorKinetics, PriorVoi
from .summary import Summary

__all__ = ["prior_from_summary"]


def prior_from_summary(summary: Summary | str | Path, *, job_id: str | None = None) -> PriorKinetics:
    """Each VOI's fitted curve of an earlier full result, with where it comes from (cycle, job, version).

    ``summary``: a loaded :class:`~voxeldose.summary.Summary` or the path of its ``summary.json``.  A VOI whose
    fit has no exponential terms (trapezoid, single time point, failed fit) is left out; none left is an error.
    """
    path = None if isinstance(summary, Summary) else Path(summary)
    s = summary if isinstance(summary, Summary) else Summary.load(summary)
    vois: dict[str, PriorVoi] = {}
    for name, m in s.vois.items():
        ta = m.time_activity
        if ta is None or ta.model == "stp" or not ta.exponentials:
            continue
        terms = [
            PriorExponential(coefficient=e.coefficient_bq, rate_per_s=e.rate_per_s)
            for e in ta.exponentials
            if e.coefficient_bq is not None and e.rate_per_s is not None and e.rate_per_s > 0
        ]
        if len(terms) == len(ta.exponentials):  # a term without finite numbers: no usable curve
            vois[name] = PriorVoi(exponentials=terms, model=ta.model)
    if not vois:
        raise VoxeldoseError(
            "the earlier result has no VOI with a multi-point exponential fit to take the kinetics from",
            path=path,
            tag="vois[*].time_activity.exponentials",
            expected="a full (several time points) result with monoexp/biexp/triexp fits",
        )
    version = s.provenance.software.get("voxeldose")
    source = (
        f"cycle {s.cycle.number}"
        + (f", job {job_id}" if job_id else "")
        + (f", voxeldose {version}" if version else "")
    )
    return PriorKinetics(source=source, cycle_number=s.cycle.number, job_id=job_id, software_version=version, vois=vois)
