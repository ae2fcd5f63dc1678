"""Fuzzed headers that the campaign of issue 14 (tests/fuzzcorpus.py) found reaching past ingest's checks: each
is now a :class:`voxeldose.ingest.Problem` of the file naming the tag, where it was an exception (a traceback in
the trigger), or nothing at all (a cycle waiting, or a job failing later).  Built with tests/dicom_factory.py."""

from __future__ import annotations

import copy
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import ct_series, nm_tomo, timepoint
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info

from voxeldose.ingest import group_cycles, scan
from voxeldose.spec import MAX_SCAN_DAYS_AFTER_INJECTION


def _errors(folder: Path) -> list[str]:
    """Error problems of scan + group_cycles on ``folder`` (messages with their tags)."""
    index = scan(folder)
    _, problems = group_cycles(index)
    return [f"{p.message} [{p.tag}]" for p in index.errors + problems if p.severity == "error"]


def _rewrite(path: Path, change) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)


def _nm(tmp_path: Path) -> Path:
    timepoint(tmp_path, 24.0)
    return tmp_path / "NM" / "spect.dcm"


def _one_ct(tmp_path: Path) -> Path:
    return sorted((tmp_path / "CT").glob("*.dcm"))[0]


def test_an_unknown_transfer_syntax_is_a_problem_of_the_file(tmp_path: Path) -> None:
    """PS3.10: (0002,0010) names a transfer syntax; ``1.2.3.4`` is none (pydicom raised ValueError in scan)."""
    nm = _nm(tmp_path)
    ds = pydicom.dcmread(nm)
    raw = nm.read_bytes()
    start = raw.index(b"DICM") + 4
    meta_len = int.from_bytes(raw[start + 8 : start + 12], "little")
    meta = copy.deepcopy(ds.file_meta)
    meta.TransferSyntaxUID = "1.2.3.4"
    with nm.open("wb") as f:
        f.write(raw[:start])
        write_file_meta_info(f, meta, enforce_standard=True)
        f.write(raw[start + 12 + meta_len :])
    errors = _errors(tmp_path)
    assert any("TransferSyntaxUID (0002,0010)" in e and "transfer syntax" in e for e in errors), errors


@pytest.mark.parametrize("keyword", ["Rows", "Columns"])
def test_an_image_without_rows_or_columns_is_a_problem_of_the_file(tmp_path: Path, keyword: str) -> None:
    """Rows and Columns are Type 1 (PS3.3 C.7.6.3); their absence raised AttributeError in group_cycles."""
    timepoint(tmp_path, 24.0)
    for ct in sorted((tmp_path / "CT").glob("*.dcm")):
        _rewrite(ct, lambda ds: delattr(ds, "PixelData") or delattr(ds, keyword))
    errors = _errors(tmp_path)
    assert any(f"{keyword} (0028," in e for e in errors), errors


@pytest.mark.parametrize(("value", "why"), [("Inf", "wrong number"), ("wide", "not numeric")])
def test_a_spect_slice_spacing_that_is_no_finite_number_is_a_problem(tmp_path: Path, value: str, why: str) -> None:
    """SpacingBetweenSlices 'Inf' gave a volume of infinite extent; text raised ValueError in group_cycles."""
    nm = _nm(tmp_path)
    raw = nm.read_bytes()
    ds = pydicom.dcmread(nm)
    old = f"{float(ds.SpacingBetweenSlices):g}".encode()
    tag = b"\x18\x00\x88\x00DS"
    off = raw.index(tag)
    length = int.from_bytes(raw[off + 6 : off + 8], "little")
    assert raw[off + 8 : off + 8 + length].strip().startswith(old[:1])
    nm.write_bytes(raw[: off + 8] + value.encode().ljust(length, b" ")[:length] + raw[off + 8 + length :])
    errors = _errors(tmp_path)
    assert any("SpacingBetweenSlices (0018,0088)" in e and why in e for e in errors), errors


def test_negative_pixel_spacing_is_a_problem(tmp_path: Path) -> None:
    """PixelSpacing is a distance in mm (PS3.3 10.7.1.3): a negative one mirrors the image silently."""
    timepoint(tmp_path, 24.0)
    for ct in sorted((tmp_path / "CT").glob("*.dcm")):
        _rewrite(ct, lambda ds: setattr(ds, "PixelSpacing", [-2.0, 2.0]))
    errors = _errors(tmp_path)
    assert any("PixelSpacing (0028,0030)" in e and "positive" in e for e in errors), errors


def test_a_scan_years_after_the_injection_is_an_error_when_the_cycle_is_formed(tmp_path: Path) -> None:
    """An injection date of 0001-01-01 in the header gave scans 17.7 million hours after it and a cycle that
    the trigger started a job for; now group_cycles says so (the pipeline's limit)."""
    hours = (MAX_SCAN_DAYS_AFTER_INJECTION + 1) * 24.0
    timepoint(tmp_path, hours, injection=datetime(2026, 1, 5, 9, 30))
    errors = _errors(tmp_path)
    assert any("days after the injection" in e for e in errors), errors
    # the limit itself is a scan that is still read
    ok = tmp_path / "ok"
    timepoint(ok, MAX_SCAN_DAYS_AFTER_INJECTION * 24.0 - 1.0)
    assert _errors(ok) == []


@pytest.mark.parametrize(
    ("change", "tag"),
    [
        (lambda ds: ds.__setitem__(0x00281053, DataElement(0x00281053, "DS", "NaN")), "RescaleSlope (0028,1053)"),
        (lambda ds: setattr(ds, "RescaleSlope", 0), "RescaleSlope (0028,1053)"),
        (lambda ds: ds.__setitem__(0x00281052, DataElement(0x00281052, "DS", "-Inf")), "RescaleIntercept (0028,1052)"),
        (lambda ds: delattr(ds, "RescaleSlope"), "RescaleSlope (0028,1053)"),
        (lambda ds: delattr(ds, "FrameOfReferenceUID"), "FrameOfReferenceUID (0020,0052)"),
        (lambda ds: setattr(ds, "BitsAllocated", 12), "BitsAllocated (0028,0100)"),
        (lambda ds: setattr(ds, "BitsAllocated", 0), "BitsAllocated (0028,0100)"),
    ],
    ids=["slope-nan", "slope-zero", "intercept-inf", "no-slope", "no-frame-of-reference", "bits-12", "bits-0"],
)
def test_a_ct_slice_with_an_unusable_value_is_a_problem_of_the_file(tmp_path: Path, change, tag: str) -> None:
    """CT Image IOD (PS3.3 A.3, C.8.2.1): Frame of Reference, Rescale Slope/Intercept are Type 1, and numbers
    (PS3.5 Table 6.2-1, DS: no NaN/Inf); BitsAllocated is 1 or a multiple of 8 (PS3.5 §8.1.1).  Scan read
    these files without a word: a job would have failed on them, or computed HU from NaN."""
    timepoint(tmp_path, 24.0)
    ct = _one_ct(tmp_path)
    _rewrite(ct, change)
    index = scan(tmp_path)
    found = [f"{p.message} [{p.tag}] {p.path}" for p in index.errors]
    assert any(tag in e and str(ct) in e for e in found), found


@pytest.mark.parametrize("keyword", ["StructureSetROISequence", "ROIContourSequence"])
def test_an_rtstruct_without_its_type_1_sequences_is_a_problem(tmp_path: Path, keyword: str) -> None:
    """RT Structure Set IOD (PS3.3 C.8.8.5, C.8.8.6): both sequences are Type 1."""
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientID = "P1"
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.Modality = "RTSTRUCT"
    roi = Dataset()
    roi.ROINumber = 1
    roi.ROIName = "kidney"
    ds.StructureSetROISequence = [roi]
    contour = Dataset()
    contour.ReferencedROINumber = 1
    ds.ROIContourSequence = [contour]
    delattr(ds, keyword)
    path = tmp_path / "rs.dcm"
    ds.save_as(path, enforce_file_format=True)
    index = scan(path)
    assert any(keyword in (p.tag or "") for p in index.errors), [p.message for p in index.problems]


def test_a_valid_timepoint_has_no_problem(tmp_path: Path) -> None:
    """The checks above do not refuse the hand-built reference objects (CT + NM of tests/dicom_factory.py)."""
    timepoint(tmp_path, 24.0)
    assert _errors(tmp_path) == []
    # a single-slice CT and an NM built on their own too
    ct_series(tmp_path / "one", np.zeros((1, 4, 4), np.int16))
    nm_tomo(tmp_path / "nm" / "x.dcm", np.ones((2, 4, 4), np.uint16))
    assert scan(tmp_path / "one").errors == [] and scan(tmp_path / "nm").errors == []
