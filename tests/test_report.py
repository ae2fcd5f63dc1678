"""Tests of voxeldose.report: one self-contained HTML file, escaped text, robust to every optional part of the
summary being absent (and to non-finite numbers)."""

from __future__ import annotations

import copy
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from voxeldose.geometry import Volume
from voxeldose.report import console_table, render_report
from voxeldose.summary import Summary, VoiMetrics

SHAPE = (12, 20, 24)  # (k, j, i)
AFFINE = np.diag([4.8, 4.8, 4.8, 1.0])
AFFINE[:3, 3] = [-57.6, -48.0, -28.8]
EVIL = "<script>alert('x')</script>"


def _masks() -> dict[str, np.ndarray]:
    k, j, i = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    m = {
        "Kidney_L": (i - 17) ** 2 / 9 + (j - 10) ** 2 / 16 + (k - 6) ** 2 / 9 <= 1,
        "Kidney_R": (i - 6) ** 2 / 9 + (j - 10) ** 2 / 16 + (k - 6) ** 2 / 9 <= 1,
        "Tumor_1": (i - 12) ** 2 + (j - 5) ** 2 + (k - 4) ** 2 <= 4,
        EVIL: (i - 12) ** 2 + (j - 15) ** 2 + (k - 8) ** 2 <= 2,
        "Bone_marrow": (abs(i - 12) <= 1) & (j >= 14) & (j <= 17),
    }
    return m


def _dose() -> Volume:
    k, j, i = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    d = 2.0 + 6.0 * np.exp(-((i - 12) ** 2 + (j - 5) ** 2 + (k - 4) ** 2) / 8.0) + 0.1 * i
    return Volume(d, AFFINE, "1.2.3", "Gy")


def _ct() -> Volume:
    k, j, i = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    body = (i - 12) ** 2 / 121 + (j - 10) ** 2 / 90 <= 1
    return Volume(np.where(body, 40.0, -1000.0), AFFINE, "1.2.3", "HU")


def _voi(role: str, mean: float, **extra) -> dict:
    x = np.linspace(0, mean * 1.5, 30)
    return {
        "role": role,
        "source": "RTSTRUCT",
        "volume_ml": 152.34,
        "mass_g": 158.1,
        "mean_gy": mean,
        "mean_weighting": "volume",
        "min_gy": mean * 0.4,
        "max_gy": mean * 1.5,
        "min_max_over": "fraction>=0.5",
        "D2_gy": mean * 1.35,
        "D50_gy": mean * 0.98,
        "D98_gy": mean * 0.6,
        "D2cc_gy": mean * 1.3,
        "injected_activity_bq": 7.4e9,
        "gy_per_gbq": mean / 7.4,
        "dvh": {
            "dose_gy": x.tolist(),
            "volume_fraction": np.clip(1 - (x / (mean * 1.5)) ** 3, 0, 1).tolist(),
            "total_volume_ml": 152.34,
            "bin_gy": 0.05,
            "downsampled": False,
            "definition": "cumulative",
        },
        "notes": [],
        "tia_bqs": 1.234e14,
        "time_activity": {
            "model": "biexponential",
            "curve": {
                "times_h": np.linspace(0, 150, 40).tolist(),
                "activity_mbq": (130 * np.exp(-np.linspace(0, 150, 40) / 90)).tolist(),
            },
            "times_h": [4.0, 24.0, 96.0],
            "activity_mbq": [120.0, 95.0, 40.0],
        },
        **extra,
    }


def _timepoint(hours: float, when: str, uid: str, registration: dict) -> dict:
    return {
        "hours": hours,
        "acquisition_datetime": when,
        "acquisition_time_source": "AcquisitionDateTime (0008,002A)",
        "spect_series_uid": uid,
        "ct_series_uid": None,
        "quantification": {
            "series_instance_uid": uid,
            "pixel_mode": "counts",
            "calibration_cps_per_mbq": 9.8,
            "calibration_source": "NEMA phantom",
            "acquisition_duration_s": 1800.0,
            "decay_during_acquisition_factor": 0.999,
            "decay_correction": "none",
            "total_activity_mbq": 3000.0,
        },
        "registration": registration,
    }


def _cycle_row(number: int, date: str | None, kidney: float, kidney_bed: float | None, marrow: float | None) -> dict:
    return {
        "number": number,
        "date": date,
        "activity_MBq": 7400,
        "kidney_gy": kidney,
        "kidney_bed_gy": kidney_bed,
        "marrow_gy": marrow,
    }


def _limit_row(name: str, limit: float, current: float, per_cycle: float, left: int) -> dict:
    return {
        "limit": name,
        "quantity": "absorbed dose",
        "limit_gy": limit,
        "source": "a reference",
        "current_gy": current,
        "per_cycle_gy": per_cycle,
        "cycles_left": left,
        "after_cycles_gy": current + left * per_cycle,
        "after_next_cycle_gy": current + (left + 1) * per_cycle,
        "exceeded": current > limit,
        "message": f"{name}: {left} more cycle(s)",
    }


def _summary_dict() -> dict:
    """A valid ``voxeldose.summary/3`` document with hand-chosen values (as summary.json holds it)."""
    return {
        "schema": "voxeldose.summary/3",
        "patient": {"id": "VXD-0042", "name": "DOE^JANE"},
        "cycle": {
            "number": 3,
            "injection": {
                "datetime": "2024-05-02T10:15:00",
                "datetime_source": "caller",
                "activity_MBq": 7400.0,
                "activity_source": "caller",
                "nuclide": "Lu-177",
                "nuclide_source": "caller",
                "radiopharmaceutical": "Lu-177-DOTATATE",
                "radiopharmaceutical_source": "Radiopharmaceutical (0018,0031)",
            },
        },
        "reference_timepoint": 0,
        "timepoints": [
            _timepoint(
                4.1,
                "2024-05-02T14:21:00",
                "1.2.826.0.1.9.1",
                {"quality": "good", "message": "", "translation_mm": [0, 0, 0], "rotation_deg": [0, 0, 0]},
            ),
            _timepoint(
                96.0,
                "2024-05-06T10:20:00",
                "1.2.826.0.1.9.2",
                {
                    "quality": "poor",
                    "message": "mutual information dropped after registration",
                    "translation_mm": [12.5, -3.0, 40.2],
                    "rotation_deg": [1.0, 0.5, 7.9],
                },
            ),
        ],
        "methods": {
            "quantification": "counts → Bq/ml with 9.8 cps/MBq (MIRD 26)",
            "fit": "biexponential (AICc)",
            "voxel_tia": "voxel-wise exponential",
            "dose": "dvk",
            "medium": "soft-tissue",
            "kernel_id": "Lu-177_soft-tissue_4.8mm_51_473ede",
            "kernel_density_g_cm3": 1.0,
            "dose_grid": "reference SPECT grid",
            "voi_source": "RTSTRUCT 1.2.3.4",
        },
        "vois": {
            "Kidney_L": _voi("kidney", 21.5, bed_gy=24.3, eqd2_gy=14.6),  # 93 % of 23 Gy: close
            "Kidney_R": _voi("kidney", 4.1234, bed_gy=4.5, eqd2_gy=2.7),
            "Tumor_1": _voi("tumour", 38.76),
            EVIL: _voi("tumour", 12.0),
            "Bone_marrow": _voi("marrow", 2.4),  # over the 2 Gy limit in one cycle
        },
        "marrow": {"image_based": None, "blood_based": None},
        "cumulative": {
            "cycles": [
                _cycle_row(1, "2024-01-10", 4.0, 4.4, 0.3),
                _cycle_row(2, "2024-03-06", 4.2, 4.6, 0.35),
                _cycle_row(3, "2024-05-02", 5.1, 5.7, 0.4),
            ],
            "total": {"dose_gy": {"kidney": 13.3, "marrow": 1.05}, "bed_gy": {"kidney": 14.7}, "activity_MBq": 22200},
            "limits": {
                "kidney_gy": 23.0,
                "kidney_bed_gy": 28.0,
                "kidney_risk_factors": True,
                "marrow_gy": 2.0,
                "sources": {"kidney_dose_gy": "Garske-Román et al. 2018"},
            },
            "planned_activity_MBq": 7400.0,
            "cycles_left": {
                "cycles_left": 1,
                "binding_limit": "kidney absorbed dose",
                "activity_per_cycle_bq": 7.4e9,
                "limits": [_limit_row("kidney absorbed dose", 23.0, 13.3, 5.1, 1)],
                "message": "1 further cycle at 7.4 GBq; binding limit: kidney absorbed dose",
                "assumption": "future cycles repeat this one",
                "notes": [],
            },
            "notes": [],
            "kidney_figure": "the higher of the kidneys' mean absorbed doses",
            "estimated_earlier_cycles": [],
        },
        "warnings": ["Kidney_R: partial-volume recovery uncertain (VOI < 60 ml) & check"],
        "provenance": {
            "software": {"voxeldose": "0.1.0", "numpy": "2.1.0"},
            "kernel_id": "Lu-177_soft-tissue_4.8mm_51_473ede",
            "nuclide": {"name": "Lu-177", "half_life_s": 574300.8, "data": "ICRP-107"},
            "calibration": {"cps_per_mbq": 9.8, "source": "NEMA phantom 2024-01-03", "applied": True},
            "inputs": {
                "series": [{"kind": "ct", "series_instance_uid": "1.2.826.0.1.9.9", "instances": 3}],
                "sop_instances": 3,
                "sop_instance_uids_sha256": "0" * 64,
            },
            "spec": {"inputs": ["study/"]},
            "created_utc": "2024-05-09T08:00:00+00:00",
            "timings_s": {"dose": 1.5},
            "total_s": 12.0,
        },
    }


def _summary() -> Summary:
    return Summary.model_validate(_summary_dict())


def _render(tmp_path: Path, summary: Summary, ct: Volume | None = None, name: str = "report.html") -> str:
    p = render_report(summary, dose=_dose(), ct=ct, vois=_masks(), path=tmp_path / name)
    assert p == tmp_path / name and p.exists()
    return p.read_text(encoding="utf-8")


def test_full_report(tmp_path: Path) -> None:
    html_text = _render(tmp_path, _summary(), ct=_ct())
    assert list(tmp_path.iterdir()) == [tmp_path / "report.html"]  # one file, nothing beside it
    # self-contained: no scripts, links, external sources or CSS imports
    low = html_text.lower()
    assert "<script" not in low and "<link" not in low and "@import" not in low
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", low)
    assert "url(" not in low
    srcs = re.findall(r"<img[^>]*\ssrc=\"([^\"]+)\"", html_text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    # one <img> per plot: DVH + 5 time-activity curves + kidneys + 2 tumours
    assert len(re.findall(r"<img\b", html_text)) == 1 + 5 + 1 + 2
    # content: names and formatted numbers
    for text in [
        "VXD-0042",
        "DOE JANE",
        "Lu-177-DOTATATE",
        "7\u202f400 MBq",
        "Kidney_L",
        "Kidney_R",
        "Tumor_1",
        "Bone_marrow",
        "21.50",
        "4.12",
        "38.76",
        "152.3",
        "158.1",
        "24.30",
        "14.60",
        "93 % of 23 Gy",
        "biexponential",
        "Lu-177_soft-tissue_4.8mm_51_473ede",
        "1.2.826.0.1.9.2",
        "9.8",
    ]:
        assert text in html_text, text
    # colour flags: the left kidney is close to its limit, the marrow over it; cumulative kidney 13.3 Gy
    assert re.search(r"<tr class='close'><td class='name'>Kidney_L", html_text)
    assert re.search(r"<tr class='over'><td class='name'>Bone_marrow", html_text)
    assert "13.30" in html_text and "1 further cycle" in html_text
    # warnings: prominent, first after the header, with the poor registration and its numbers
    warn = html_text[html_text.index("id='warnings'") :]
    warn = warn[: warn.index("</section>")]
    assert "Poor registration" in warn and "mutual information dropped" in warn and "12.5, -3.0, 40.2" in warn
    assert "partial-volume recovery uncertain (VOI &lt; 60 ml) &amp; check" in warn
    assert "Bone_marrow" in warn  # over its limit
    assert html_text.index("id='warnings'") < html_text.index("Absorbed dose per VOI")


def test_malicious_names_are_escaped(tmp_path: Path) -> None:
    html_text = _render(tmp_path, _summary())
    assert EVIL not in html_text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html_text
    assert "<script" not in html_text.lower()


_OPTIONAL_VOI_FIELDS = [n for n, f in VoiMetrics.model_fields.items() if not f.is_required()]
_NULLABLE_VOI_FIELDS = ["mass_g", "min_gy", "max_gy", "D2_gy", "D50_gy", "D98_gy", "D2cc_gy", "gy_per_gbq"]


def _bare() -> dict:
    """The least a valid summary holds: no VOIs, time points, cycles, marrow or warnings."""
    s = _summary_dict()
    s.update(vois={}, timepoints=[], warnings=[])
    s["cumulative"].update(cycles=[], cycles_left=None, notes=[], estimated_earlier_cycles=[])
    s["cumulative"]["total"].update(dose_gy={}, bed_gy={})
    s["cumulative"]["limits"]["sources"] = {}
    s["cycle"]["injection"].update(radiopharmaceutical=None, radiopharmaceutical_source=None)
    return s


def _missing_key_cases() -> list[Summary]:
    """The bare summary; each optional VOI field absent; each nullable VOI number null; non-finite and
    inconsistent values the types allow (NaN doses, a DVH of mismatched lengths, an unparseable date)."""
    full = _summary_dict()
    cases = [_bare()]
    names = list(full["vois"])
    for start in range(0, len(_OPTIONAL_VOI_FIELDS), len(names)):  # a different field absent in each VOI
        s = copy.deepcopy(full)
        for name, key in zip(names, _OPTIONAL_VOI_FIELDS[start:]):
            s["vois"][name].pop(key, None)
        cases.append(s)
    s = copy.deepcopy(full)
    for name in names:
        for key in _OPTIONAL_VOI_FIELDS:
            s["vois"][name].pop(key, None)
        for key in _NULLABLE_VOI_FIELDS:
            s["vois"][name][key] = None
    cases.append(s)
    s = copy.deepcopy(full)
    s["vois"]["Kidney_L"]["mean_gy"] = float("nan")
    s["vois"]["Kidney_R"]["dvh"].update(dose_gy=[1, 2, 3], volume_fraction=[1.0])
    s["vois"]["Tumor_1"]["time_activity"] = {"model": "monoexponential", "times_h": [1, 2], "activity_mbq": [3.0]}
    s["vois"]["Bone_marrow"]["time_activity"] = {"model": "stp", "activity_mbq": [float("inf")]}
    s["cumulative"]["cycles"] = [_cycle_row(1, None, float("nan"), None, None)]
    s["timepoints"][1]["registration"] = {"quality": "poor", "message": ""}
    s["cycle"]["injection"].update(datetime="not a date", activity_MBq=float("nan"))
    s["patient"]["name"] = ""
    cases.append(s)
    return [Summary.model_validate(c) for c in cases]


def test_missing_keys_do_not_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from voxeldose import report

    cases = _missing_key_cases()
    drawn = {0, len(cases) - 1}  # these are rendered in full; the others skip the PNG encoding (speed)
    real_png = report._png
    for n, case in enumerate(cases):
        monkeypatch.setattr(report, "_png", real_png if n in drawn else (lambda fig, alt: "<img alt='' src=''>"))
        text = _render(tmp_path, case, name=f"r{n}.html")
        assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
        assert "could not be drawn" not in text, (n, text[:3000])
        assert isinstance(console_table(case), str)
    # no CT and no masks at all
    p = render_report(cases[0], dose=_dose(), ct=None, vois={}, path=tmp_path / "bare.html")
    assert "the dose alone" in p.read_text()


def test_the_model_refuses_what_the_report_cannot_read() -> None:
    """What the report once had to survive (nonsense values, missing parts) is now refused where the
    summary is made or loaded, naming the field."""
    for path, value in (
        (("vois", "Bone_marrow"), "nonsense"),
        (("vois", "Kidney_L", "mean_gy"), "a lot"),
        (("cumulative", "cycles"), [{"number": 1}, "x"]),
        (("timepoints",), [{"registration": None}]),
        (("cycle", "injection", "activity_MBq"), "n/a"),
    ):
        s = _summary_dict()
        parent = s
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = value
        with pytest.raises(ValidationError) as err:
            Summary.model_validate(s)
        assert err.value.errors()[0]["loc"][: len(path)] == path, path
    s = _summary_dict()
    del s["provenance"]
    with pytest.raises(ValidationError, match="provenance"):
        Summary.model_validate(s)


def test_without_ct_and_actual_pipeline_shapes(tmp_path: Path) -> None:
    """The pipeline's own shapes: time_activity with times_s/activities_bq, cycles_left with rows."""
    s = _summary_dict()
    ta = s["vois"]["Kidney_R"]["time_activity"]
    s["vois"]["Kidney_R"]["time_activity"] = {
        "model": "monoexponential",
        "times_s": [h * 3600 for h in ta["times_h"]],
        "activities_bq": [a * 1e6 for a in ta["activity_mbq"]],
        "tia_bqs": 2e13,
    }
    row = _limit_row("red marrow absorbed dose", 2.0, 2.05, 0.4, 0)
    row["message"] = "exceeds the 2 Gy limit"
    s["cumulative"]["cycles_left"].update(
        cycles_left=0, binding_limit="red marrow absorbed dose", message="no further cycle at 7.4 GBq", limits=[row]
    )
    text = _render(tmp_path, Summary.model_validate(s), ct=None)
    assert "no further cycle at 7.4 GBq" in text and "exceeds the 2 Gy limit" in text
    assert "the dose alone (no CT given)" in text
    assert len(re.findall(r"<img\b", text)) == 9


def test_console_table() -> None:
    t = console_table(_summary())
    lines = t.splitlines()
    assert lines[0].split() == ["VOI", "role", "mean", "Gy", "Gy/GBq", "D2", "Gy", "BED", "Gy", "vs", "limit"]
    row = next(ln for ln in lines if ln.startswith("Kidney_L"))
    assert "21.50" in row and "2.905" in row and "29.03" in row and "24.30" in row and "93% of 23 Gy  CLOSE" in row
    assert "OVER" in next(ln for ln in lines if ln.startswith("Bone_marrow"))
    assert "cycles left: 1 further cycle" in t
    bare = _bare()
    assert console_table(Summary.model_validate(bare)) == "no VOI results"
    bare["vois"] = {"x": {k: v for k, v in _voi("organ", 1.0).items() if k not in _OPTIONAL_VOI_FIELDS}}
    assert console_table(Summary.model_validate(bare)).splitlines()[2].split()[:3] == ["x", "organ", "1.00"]


@pytest.mark.slow
def test_report_as_a_browser_shows_it(tmp_path: Path, chromium: Any) -> None:
    """Headless Chromium opens the report file: the dose table has a row per VOI with its numbers, every plot is
    a decoded image, the flagged rows are coloured, nothing runs (no alert from the hostile name, no console
    error), and a screenshot of the table is not blank."""
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    summary = _summary()
    _render(tmp_path, summary, ct=_ct())
    chromium.get((tmp_path / "report.html").as_uri())
    with pytest.raises(NoAlertPresentException):  # the <script> in a VOI name was escaped, not run
        chromium.switch_to.alert  # noqa: B018  # the property access is the check

    table = chromium.find_element(
        By.XPATH, "//section[h2[starts-with(normalize-space(.), 'Absorbed dose per VOI')]]//table"
    )
    assert table.is_displayed() and table.size["width"] > 300, table.size
    rows = {r.find_element(By.CSS_SELECTOR, "td.name").text: r for r in table.find_elements(By.XPATH, ".//tr[td]")}
    assert set(rows) == set(summary.vois), list(rows)  # the hostile name shows as text
    activity_gbq = summary.cycle.injection.activity_MBq / 1000.0
    for name, voi in summary.vois.items():
        cells = [c.text for c in rows[name].find_elements(By.TAG_NAME, "td")]
        assert cells[1] == voi.role, (name, cells)
        assert cells[4] == f"{voi.mean_gy:.2f}", (name, cells)  # mean absorbed dose, Gy
        assert cells[9] == f"{voi.mean_gy / activity_gbq:.3f}", (name, cells)  # Gy per GBq injected
        assert all(cells[:10]), (name, cells)
    # 93 % of the kidney limit: amber; over the marrow limit: red; a row far from its limit: no colour
    bg = {n: rows[n].find_element(By.CSS_SELECTOR, "td.name").value_of_css_property("background-color") for n in rows}
    assert len({bg["Kidney_L"], bg["Bone_marrow"], bg["Tumor_1"]}) == 3, bg

    images = chromium.execute_script(
        "return Array.from(document.images, i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);"
    )
    assert len(images) == 1 + 5 + 1 + 2, images  # DVH + 5 time-activity curves + kidneys + 2 tumours (as above)
    assert all(complete and w > 0 and h > 0 for _, complete, w, h in images), images  # every PNG decoded
    errors = [e for e in chromium.get_log("browser") if e.get("level") == "SEVERE"]
    assert errors == [], errors

    png = table.screenshot_as_png
    (tmp_path / "dose-table.png").write_bytes(png)
    with Image.open(io.BytesIO(png)) as shot:
        lo, hi = shot.convert("L").getextrema()
    assert hi - lo > 100, (lo, hi)  # dark text on a light page, not a blank capture


def test_cumulative_uncertainty_and_cycles_left_at_the_upper_bound(tmp_path: Path) -> None:
    """Issue 13 part 2: cumulative doses as value ± U with U = 2u, 'not stated' for a cycle without u (never a
    number), and the cycles left at the 95 % upper bound with the organ and the bound that binds."""
    s = _summary_dict()
    cum = s["cumulative"]
    not_stated = {"u_gy": None, "components_gy": {}, "source": "not stated: an older summary"}
    marrow_ns = {"u_gy": None, "components_gy": {}, "source": "not stated: no marrow model"}
    cum["cycles"][0].update(kidney_u=not_stated, marrow_u=marrow_ns)
    cum["cycles"][1].update(kidney_u={"u_gy": 0.2, "components_gy": {"calibration": 0.2}, "source": "own"})
    cum["cycles"][2].update(kidney_u={"u_gy": 0.3, "components_gy": {"calibration": 0.3}, "source": "own"})
    cum["uncertainty"] = {
        "method": "first-order",
        "correlation_model": "calibration linear",
        "coverage_factor": 2.0,
        "dose_gy": {
            "kidney": {"value": 13.3, "u": 0.5, "lower_95": 12.3, "upper_95": 14.3},
            "marrow": {"value": 1.05, "u": None, "lower_95": None, "upper_95": None},
        },
        "bed_gy": {},
        "not_stated": {"kidney": [1], "marrow": [1, 2, 3]},
        "notes": ["kidney: cycle(s) [1] have no stated uncertainty — a lower bound"],
    }
    upper = _limit_row("kidney absorbed dose", 23.0, 14.3, 6.12, 1)
    cum["cycles_left"]["upper_95"] = {
        "cycles_left": 1,
        "binding_limit": "kidney absorbed dose",
        "activity_per_cycle_bq": 7.4e9,
        "limits": [upper],
        "message": "at the 95 % upper bound",
        "assumption": "value + k·u",
        "notes": ["red marrow absorbed dose: not checked at the 95 % upper bound (not stated)"],
    }
    cum["cycles_left"]["upper_95"]["cycles_left"] = 0
    cum["cycles_left"]["upper_95"]["limits"][0]["cycles_left"] = 0
    html_text = _render(tmp_path, Summary.model_validate(s))
    sec = html_text[html_text.index("id='cumulative-uncertainty'") :]
    sec = sec[: sec.index("</section>")]
    assert "13.30 ± 1.00 Gy" in sec and "(k = 2)" in sec and "12.30–14.30 Gy" in sec  # U = 2 × 0.5
    assert "4.00 ± not stated" in sec and "4.20 ± 0.40" in sec and "5.10 ± 0.60" in sec
    assert "1.05 ± not stated" in sec  # the marrow: no model, said
    assert "<b>0</b> further cycle(s) — binding: <b>kidney</b>, kidney absorbed dose" in sec
    assert "At the central estimate 1 further cycle(s), bound by kidney" in sec
    assert "14.30" in sec and "6.12" in sec and "not checked at the 95 % upper bound" in sec
    assert "cycles left at the 95 % upper bound" in console_table(Summary.model_validate(s))
