"""The synthetic patient through ingest: what ingest reads equals what the phantom put in."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from voxeldose.ingest import load_cycle, read_ct, read_spect
from voxeldose.phantom import PhantomSettings, write_phantom
from voxeldose.voi import load_vois


@pytest.fixture(scope="module", params=["counts", "bqml"])
def written(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp(f"ph-{request.param}")
    write_phantom(out, replace(PhantomSettings.small(), pixel_mode=request.param, seed=5))
    return out, json.loads((out / "truth" / "truth.json").read_text())


def test_hours_injection_and_geometry(written):
    out, truth = written
    cycle = load_cycle(out / "dicom")
    assert [tp.hours_after_injection for tp in cycle.timepoints] == pytest.approx([4, 24, 96, 168])
    assert cycle.injection.activity_bq == pytest.approx(truth["injection"]["activity_bq"])
    ref = read_spect(cycle.timepoints[0].spect).volume
    assert np.allclose(ref.affine, np.array(truth["reference_spect_grid"]["affine"]), atol=1e-6)
    ct = read_ct(cycle.timepoints[0].ct)
    assert np.allclose(ct.affine, np.array(truth["reference_ct_grid"]["affine"]), atol=1e-6)
    # the CT shows air outside and soft tissue in the torso's centre region
    assert ct.array.min() < -900 and -200 < np.median(ct.array[ct.array > -500]) < 300


def test_activity_read_back_equals_truth(written):
    """Σ image → activity, by the imaging model stated in truth.json, within Poisson statistics."""
    out, truth = written
    cycle = load_cycle(out / "dicom")
    cf = truth["calibration_cps_per_mbq"]
    for tp, ttp in zip(cycle.timepoints, truth["timepoints"]):
        img = read_spect(tp.spect)
        expected_counts = ttp["expected_total_counts"]
        if img.pixel_mode == "counts":
            assert img.acquisition_duration_s == pytest.approx(ttp["acquisition_duration_s"])
            counts = img.total_counts
        else:
            assert img.pixel_mode == "bqml-rwvm" and img.volume.units == "Bq/ml"
            activity_bq = float(img.volume.array.sum()) * img.volume.voxel_volume_ml
            counts = activity_bq / 1e6 * cf * ttp["acquisition_duration_s"] * ttp["decay_during_acquisition_factor"]
        # Poisson: σ = √N; 5σ, plus the bqml variant's 16-bit rescaling (≤ 1e-4 of max per voxel)
        tol = 5 * math.sqrt(expected_counts) + (0.0 if img.pixel_mode == "counts" else 1e-4 * counts)
        assert counts == pytest.approx(expected_counts, abs=tol)
        # and the expected counts are the torso activity through the stated model
        model = (
            ttp["torso_activity_bq"] / 1e6 * cf * ttp["acquisition_duration_s"] * ttp["decay_during_acquisition_factor"]
        )
        assert expected_counts == pytest.approx(model, rel=1e-3)


def test_seg_and_rtstruct_give_the_same_vois(written):
    out, truth = written
    cycle = load_cycle(out / "dicom")
    grid = read_spect(cycle.timepoints[0].spect).volume.grid
    by_kind = {s.kind: load_vois(s, grid) for s in cycle.vois}
    rt, seg = by_kind["rtstruct"], by_kind["seg"]
    assert set(rt) == set(seg)
    for name in rt:
        if truth["voi"][name]["volume_ml"] < 9.0:
            continue  # a handful of CT voxels: nearest-voxel vs contour sampling differ by design
        # The SEG is the CT-grid mask itself; the RTSTRUCT contour runs half-way between inside and outside
        # voxel centres and cuts the staircase's corners (marching squares), losing up to ~⅛ pixel² per
        # boundary corner: a few per cent for a 12–15 mm semi-axis on the small phantom's 3.6 mm pixels.
        assert rt[name].volume_ml == pytest.approx(seg[name].volume_ml, rel=0.06), name
        overlap = np.minimum(rt[name].fraction, seg[name].fraction).sum() / seg[name].fraction.sum()
        assert overlap > 0.93, name
