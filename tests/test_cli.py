"""The command line as a new user meets it: real subprocesses, the small phantom, broken inputs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import dciodvfy_errors

VOXELDOSE = [sys.executable, "-m", "voxeldose.cli"]


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "VOXELDOSE_DEBUG"}
    return subprocess.run([*VOXELDOSE, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def small_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    res = run("phantom", "--out", str(out), "--small", "--seed", "3")
    assert res.returncode == 0, res.stderr
    return out


def test_inspect_json_reports_the_cycle(small_phantom: Path) -> None:
    res = run("inspect", str(small_phantom), "--json")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["ok"] is True
    [cycle] = rep["cycles"]
    assert [tp["hours_after_injection"] for tp in cycle["timepoints"]] == [4.0, 24.0, 96.0, 168.0]
    assert all(tp["spect"]["kind"] == "spect" and tp["ct"]["kind"] == "ct" for tp in cycle["timepoints"])
    assert cycle["injection"]["activity_MBq"] == pytest.approx(7400.0)
    assert cycle["injection"]["nuclide"] == "Lu-177"
    expected = {
        "Lung_L",
        "Lung_R",
        "Liver",
        "Spleen",
        "Kidney_L",
        "Kidney_R",
        "Marrow_L2L4",
        "Bladder",
        "Tumor_1",
        "Tumor_2",
        "Tumor_3",
        "Tumor_4",
        "Tumor_5",
    }
    for voi in cycle["vois"]:
        assert expected <= set(voi["roi_names"])
    assert {v["kind"] for v in cycle["vois"]} == {"rtstruct", "seg"}


def test_inspect_text_is_readable(small_phantom: Path) -> None:
    res = run("inspect", str(small_phantom))
    assert res.returncode == 0
    assert "time point 4: 168.0 h after injection" in res.stdout
    assert "7400 MBq" in res.stdout


@pytest.mark.dciodvfy
def test_every_written_file_passes_dciodvfy(small_phantom: Path, dciodvfy_exe: str) -> None:
    files = sorted((small_phantom / "dicom").rglob("*.dcm"))
    nm = [f for f in files if f.parent.name == "NM"]
    ct = [f for f in files if f.parent.name == "CT"]
    other = [f for f in files if f.parent.name not in ("NM", "CT")]
    assert len(nm) == 4 and len(other) == 2
    # every NM, RTSTRUCT and SEG; CT: first, middle and last slice of each series (same writer, same attributes)
    chosen = (
        nm + other + [s for tp in {f.parent for f in ct} for s in (sorted(tp.glob("*.dcm"))[i] for i in (0, 29, -1))]
    )
    bad = {str(f): e for f in chosen if (e := dciodvfy_errors(dciodvfy_exe, f))}
    assert not bad


def _truncate(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.mark.parametrize("case", ["truncated", "random", "text", "missing"])
def test_broken_input_gives_one_clear_error(small_phantom: Path, tmp_path: Path, case: str) -> None:
    nm = next((small_phantom / "dicom").rglob("SPECT.dcm"))
    if case == "truncated":
        path = _truncate(nm, tmp_path / "cut.dcm")
    elif case == "random":
        path = tmp_path / "noise.dcm"
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    elif case == "text":
        path = tmp_path / "notes.txt"
        path.write_text("hello")
    else:
        path = tmp_path / "nowhere"
    res = run("inspect", str(path))
    assert res.returncode in (1, 2)
    out = res.stdout + res.stderr
    assert "Traceback" not in out
    assert str(path) in out
    assert "[error]" in out or out.startswith("error:") or "error:" in res.stderr


def test_mixed_patients_in_one_folder(small_phantom: Path, tmp_path: Path) -> None:
    import pydicom

    tp = next((small_phantom / "dicom").glob("tp1_*"))
    ds = pydicom.dcmread(tp / "NM" / "SPECT.dcm")
    ds.PatientID = "SOMEONE-ELSE"
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(tmp_path / "other.dcm")
    res = run("inspect", str(small_phantom / "dicom"), str(tmp_path / "other.dcm"))
    assert res.returncode == 1
    assert "mixed patients" in res.stdout and "Traceback" not in res.stdout + res.stderr


def test_series_mixing_patients_is_an_error(small_phantom: Path, tmp_path: Path) -> None:
    import pydicom

    ct = sorted(next((small_phantom / "dicom").glob("tp1_*")).glob("CT/*.dcm"))
    ds = pydicom.dcmread(ct[0])
    ds.PatientID = "SOMEONE-ELSE"
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(tmp_path / "intruder.dcm")
    res = run("inspect", str(ct[0].parent), str(tmp_path / "intruder.dcm"))
    assert res.returncode == 1
    assert "PatientID" in res.stdout and "intruder.dcm" in res.stdout


def test_demo_runs_phantom_and_dosimetry(tmp_path: Path) -> None:
    res = run("demo", "--small", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    results = tmp_path / "results"
    summary = json.loads((results / "summary.json").read_text())
    assert len(summary["timepoints"]) == 4 and (results / "rtdose.dcm").exists() and (results / "report.html").exists()
    assert "Kidney_L" in res.stdout and "cycles left" in res.stdout


def test_run_command_writes_outputs_and_refuses_counts_without_calibration(tmp_path: Path, small_phantom: Path) -> None:
    res = run("run", str(small_phantom / "dicom"), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "calibration" in res.stderr and "Traceback" not in res.stderr
    truth = json.loads((small_phantom / "truth" / "truth.json").read_text())
    res = run(
        "run",
        str(small_phantom / "dicom"),
        "--out",
        str(tmp_path / "o"),
        "--calibration",
        str(truth["calibration_cps_per_mbq"]),
        "--method",
        "led",
        "--fit",
        "monoexp",
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["methods"]["dose"] == "led" and summary["methods"]["fit"] == "monoexp"
    assert summary["vois"]["Kidney_L"]["time_activity"]["model"] == "monoexp"


def test_phantom_cli_rejects_bad_hours(tmp_path: Path) -> None:
    res = run("phantom", "--out", str(tmp_path), "--hours", "4,x")
    assert res.returncode == 2 and "--hours" in res.stderr and "Traceback" not in res.stderr


def test_kernel_command_prints_energy_balance(tmp_path: Path) -> None:
    out = tmp_path / "k.npy"
    res = run(
        "kernel",
        "--nuclide",
        "Lu-177",
        "--voxel-mm",
        "4.8",
        "--medium",
        "soft-tissue",
        "--size",
        "11",
        "--out",
        str(out),
    )
    assert res.returncode == 0, res.stderr
    k = np.load(out)
    assert k.shape == (11, 11, 11) and np.unravel_index(np.argmax(k), k.shape) == (5, 5, 5)
    assert "electrons" in res.stdout and "photons" in res.stdout
    # The self-voxel value lies below the local-deposition limit E_e/(ρV): 147.9 keV per decay (ICRP-107)
    # in 4.8³ mm³ of unit-density tissue → 2.143e-10 Gy/(Bq·s)
    led = 147.92e3 * 1.602176634e-19 / (4.8**3 * 1e-6)
    assert 0.85 * led < k[5, 5, 5] < led


def test_kernel_command_rejects_bad_voxel(tmp_path: Path) -> None:
    res = run("kernel", "--voxel-mm", "4.8,x", "--out", str(tmp_path / "k.npy"))
    assert res.returncode == 2 and "--voxel-mm" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "content", ["[1, 2]", '{"calibration": null, "dose": 3}', '{"fit": {"model": "magic"}}', "{oops"]
)
def test_bad_spec_files_give_one_line_errors(tmp_path: Path, content: str) -> None:
    spec = tmp_path / "job.json"
    spec.write_text(content)
    res = run("run", str(tmp_path), "--out", str(tmp_path / "o"), "--spec", str(spec))
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert str(spec) in res.stderr


def test_injection_datetime_with_utc_offset_is_refused(tmp_path: Path) -> None:
    res = run("inspect", str(tmp_path), "--injection-datetime", "2026-01-05T09:30+01:00")
    assert res.returncode == 2 and "UTC offset" in res.stderr and "Traceback" not in res.stderr


#: The documented form of an error line: ``error: FILE: what is wrong (tag KEYWORD; expected …; found …)``.
ERROR_LINE = re.compile(
    r"^error: (?P<file>[^:]+): (?P<what>.+) \(tag (?P<tag>[^;()]+); expected (?P<expected>[^;]+)(; found (?P<found>.+))?\)$"
)


def _one_error_line(stderr: str) -> re.Match[str]:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    m = ERROR_LINE.match(lines[0])
    assert m is not None, lines[0]
    return m


def test_spec_error_names_the_job_file_and_the_field(tmp_path: Path) -> None:
    spec = tmp_path / "job.json"
    spec.write_text('{"calibration": {"cps_per_mbq": -5.67}}')
    res = run("run", str(tmp_path), "--out", str(tmp_path / "o"), "--spec", str(spec))
    assert res.returncode == 2, res.stderr
    m = _one_error_line(res.stderr)
    assert m["file"] == str(spec) and m["tag"] == "calibration.cps_per_mbq"
    assert m["expected"] == "greater than 0" and m["found"] == "-5.67"


def test_calibration_error_names_the_spect_file_and_the_job_field(tmp_path: Path, small_phantom: Path) -> None:
    res = run("run", str(small_phantom / "dicom"), "--out", str(tmp_path / "o"))
    assert res.returncode == 2, res.stderr
    m = _one_error_line(res.stderr)
    assert m["file"].endswith(".dcm") and Path(m["file"]).is_file()
    assert m["tag"] == "calibration.cps_per_mbq" and "--calibration" in m["expected"]


def test_inspect_and_run_agree_on_a_cycle_without_vois(tmp_path: Path, small_phantom: Path) -> None:
    """Without its RTSTRUCT and SEG the phantom cannot be run; inspect says so (an error, exit 1) with the
    reason that run then gives (exit 2)."""
    src = small_phantom / "dicom"
    dst = tmp_path / "dicom"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("RTSTRUCT.dcm", "SEG.dcm"))
    assert not list(dst.rglob("RTSTRUCT.dcm")) and not list(dst.rglob("SEG.dcm"))
    res = run("inspect", str(dst), "--json")
    assert res.returncode == 1, res.stdout + res.stderr
    rep = json.loads(res.stdout)
    assert rep["ok"] is False
    [err] = [p for p in rep["problems"] if p["severity"] == "error"]
    assert err["tag"] == "RTSTRUCT/SEG FrameOfReferenceUID" and "no VOIs on the reference time point" in err["message"]
    text = run("inspect", str(dst))
    assert text.returncode == 1 and "problems: none" not in text.stdout and "[error]" in text.stdout
    truth = json.loads((small_phantom / "truth" / "truth.json").read_text())
    res = run("run", str(dst), "--out", str(tmp_path / "o"), "--calibration", str(truth["calibration_cps_per_mbq"]))
    assert res.returncode == 2
    m = _one_error_line(res.stderr)
    assert m["tag"] == err["tag"] and "no VOIs on the reference time point" in m["what"]
    assert not (tmp_path / "o" / "summary.json").exists()


def test_inspect_says_a_counts_series_needs_the_calibration(small_phantom: Path) -> None:
    """Not an error (inspect takes no calibration), but said: run needs --calibration for raw counts."""
    res = run("inspect", str(small_phantom / "dicom"), "--json")
    assert res.returncode == 0
    rep = json.loads(res.stdout)
    [info] = [p for p in rep["problems"] if p["tag"] == "calibration.cps_per_mbq"]
    assert info["severity"] == "info" and "voxeldose run" in info["message"]


@pytest.mark.parametrize(
    ("content", "tag"),
    [
        ('{"calibration": {"cps_per_mbq": 5.67, "source": "\\ud800"}}', "calibration.source"),
        ('{"earlier_cycles": [{"number": 1, "activity_mbq": 7400, "date": "\\udfff"}]}', "earlier_cycles.0.date"),
    ],
)
def test_a_lone_surrogate_in_the_spec_file_is_refused(tmp_path: Path, content: str, tag: str) -> None:
    spec = tmp_path / "job.json"
    spec.write_text(content)
    res = run("run", str(tmp_path), "--out", str(tmp_path / "o"), "--spec", str(spec))
    assert res.returncode == 2, res.stderr
    m = _one_error_line(res.stderr)
    assert m["file"] == str(spec) and m["tag"] == tag and m["expected"].startswith("text encodable as UTF-8")


def test_a_deeply_nested_spec_file_is_refused(tmp_path: Path) -> None:
    spec = tmp_path / "job.json"
    spec.write_text('{"calibration": ' + "[" * 100_000 + "]" * 100_000 + "}")
    res = run("run", str(tmp_path), "--out", str(tmp_path / "o"), "--spec", str(spec))
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert str(spec) in res.stderr and "nested too deeply" in res.stderr


def test_an_injection_years_before_the_scans_is_refused(tmp_path: Path, small_phantom: Path) -> None:
    """Injection 0001-01-01: the scans would be ~2000 years after it (Lu-177 T½ 6.65 d: nothing left after
    60 d).  inspect calls it an error, run refuses it before reading any pixel."""
    dicom = small_phantom / "dicom"
    res = run("inspect", str(dicom), "--json", "--injection-datetime", "0001-01-01T00:00:00")
    assert res.returncode == 1, res.stdout + res.stderr
    [err] = [p for p in json.loads(res.stdout)["problems"] if p["tag"] == "injection.datetime"]
    assert err["severity"] == "error" and "days after the injection" in err["message"]
    truth = json.loads((small_phantom / "truth" / "truth.json").read_text())
    res = run(
        "run",
        str(dicom),
        "--out",
        str(tmp_path / "o"),
        "--calibration",
        str(truth["calibration_cps_per_mbq"]),
        "--injection-datetime",
        "0001-01-01T00:00:00",
    )
    assert res.returncode == 2, res.stderr
    m = _one_error_line(res.stderr)
    assert m["tag"] == "injection.datetime" and "within 60 days" in m["expected"]
    assert not (tmp_path / "o" / "summary.json").exists()


def test_an_implausible_dose_is_an_error_not_a_result(tmp_path: Path, small_phantom: Path) -> None:
    """A calibration 1000 times too small (5.67e-3 for the phantom's 5.67 cps/MBq) scales every dose by 1000:
    a kidney of kilograys in one cycle, which no Lu-177 therapy gives (~0.3-0.9 Gy/GBq)."""
    truth = json.loads((small_phantom / "truth" / "truth.json").read_text())
    wrong = truth["calibration_cps_per_mbq"] / 1000.0
    res = run("run", str(small_phantom / "dicom"), "--out", str(tmp_path / "o"), "--calibration", str(wrong))
    assert res.returncode == 2, res.stderr
    m = _one_error_line(res.stderr.strip().splitlines()[-1])
    assert (
        Path(m["file"]).is_file()
        and m["what"].startswith("implausible dose")
        and "check calibration and injection data" in m["what"]
    )
    assert not (tmp_path / "o" / "summary.json").exists()


def test_kernel_command_y90(tmp_path: Path) -> None:
    # issue 16: `voxeldose kernel --nuclide Y-90 …` works as for Lu-177
    out = tmp_path / "y90.npy"
    # 2 × 10⁷ voxel-averaging samples: ≈ 20 s on a quiet machine, 130 s at load 13 on 2 cores
    res = run("kernel", "--nuclide", "Y-90", "--voxel-mm", "4.8", "--size", "9", "--out", str(out), timeout=600)
    assert res.returncode == 0, res.stderr
    k = np.load(out)
    assert k.shape == (9, 9, 9) and np.unravel_index(np.argmax(k), k.shape) == (4, 4, 4)
    # below Y-90's local-deposition limit: 933.7 keV electrons per decay (ICRP-107) in 4.8³ mm³ at 1 g/cm³;
    # its 2.28 MeV β end-point (CSDA range ≈ 11 mm) leaves more than a third of it outside the source voxel
    led = 933.7e3 * 1.602176634e-19 / (4.8**3 * 1e-6)
    assert 0.3 * led < k[4, 4, 4] < 0.66 * led
    assert "Y-90" in res.stdout


def test_kernel_command_rejects_positron_emitter(tmp_path: Path) -> None:
    res = run("kernel", "--nuclide", "F-18", "--voxel-mm", "4.8", "--size", "3", "--out", str(tmp_path / "k.npy"))
    assert res.returncode != 0 and "beta+" in res.stderr and "Traceback" not in res.stderr
