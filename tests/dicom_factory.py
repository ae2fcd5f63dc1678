"""Small hand-built DICOM objects for ingest tests, independent of voxeldose's own writers.

They carry just what ingest reads; they are not meant to pass dciodvfy (the writers' tests do that).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

NM = "1.2.840.10008.5.1.4.1.1.20"
CT = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _base(sop_class: str, patient_id: str, study_uid: str, series_uid: str, for_uid: str, modality: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.PatientName = f"TEST^{patient_id}"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = for_uid
    ds.Modality = modality
    return ds


def _pixels(ds: Dataset, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    ds.Rows, ds.Columns = arr.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if arr.dtype == np.int16 else 0
    ds.PixelData = arr.tobytes()


def secondary_capture(patient_id: str = "SC1", size: int = 8) -> Dataset:
    """A valid PS3.10 Secondary Capture image (a SOP class voxeldose neither reads nor accepts)."""
    ds = _base(SECONDARY_CAPTURE, patient_id, generate_uid(), generate_uid(), generate_uid(), "OT")
    _pixels(ds, np.zeros((size, size), np.uint16))
    return ds


def nm_tomo(
    path: Path,
    counts: np.ndarray,
    *,
    ipp=(-100.0, -80.0, -50.0),
    iop=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    spacing=(4.0, 4.0),
    slice_spacing=5.0,
    patient_id="P1",
    study_uid=None,
    series_uid=None,
    for_uid=None,
    acquisition: datetime | None = datetime(2026, 1, 6, 10, 0, 0),
    acquisition_as_datetime=False,
    injection: datetime | None = datetime(2026, 1, 5, 9, 30, 0),
    injection_time_only=False,
    activity_mbq: float | None = 7400.0,
    nuclide_meaning: str | None = "^177^Lutetium",
    rwvm_slope: float | None = None,
    units: str | None = None,
    rescale_slope: float | None = None,
    frame_ms=40000,
    frames_in_rotation=60,
    with_orientation=True,
    slice_vector=None,
) -> Dataset:
    """A multi-frame NM RECON TOMO object (``counts`` is [frame, j, i] uint16).

    ``slice_vector`` (default 1..N) is written as SliceVector (0054,0080): frame f holds slice
    ``slice_vector[f]``; the slice order along the normal is the slice number's, not the frame's."""
    ds = _base(
        NM, patient_id, study_uid or generate_uid(), series_uid or generate_uid(), for_uid or generate_uid(), "NM"
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY", "RECON TOMO", "EMISSION"]
    ds.SeriesDescription = "SPECT"
    ds.NumberOfFrames = counts.shape[0]
    ds.NumberOfSlices = counts.shape[0]
    ds.SliceVector = list(range(1, counts.shape[0] + 1)) if slice_vector is None else list(slice_vector)
    ds.PixelSpacing = list(spacing)
    ds.SpacingBetweenSlices = slice_spacing
    det = Dataset()
    det.ImagePositionPatient = list(ipp)
    if with_orientation:
        det.ImageOrientationPatient = list(iop)
    ds.DetectorInformationSequence = Sequence([det])
    rot = Dataset()
    rot.ActualFrameDuration = frame_ms
    rot.NumberOfFramesInRotation = frames_in_rotation
    ds.RotationInformationSequence = Sequence([rot])
    if acquisition is not None:
        if acquisition_as_datetime:
            ds.AcquisitionDateTime = acquisition.strftime("%Y%m%d%H%M%S")
        else:
            ds.AcquisitionDate = acquisition.strftime("%Y%m%d")
            ds.AcquisitionTime = acquisition.strftime("%H%M%S")
    rp = Dataset()
    rp.Radiopharmaceutical = "Lu-177-DOTATATE"
    if injection is not None:
        if injection_time_only:
            rp.RadiopharmaceuticalStartTime = injection.strftime("%H%M%S")
        else:
            rp.RadiopharmaceuticalStartDateTime = injection.strftime("%Y%m%d%H%M%S")
    if activity_mbq is not None:
        rp.RadionuclideTotalDose = activity_mbq
    if nuclide_meaning is not None:
        code = Dataset()
        code.CodeValue = "C-145A4"  # placeholder code: ingest reads the meaning
        code.CodingSchemeDesignator = "SRT"
        code.CodeMeaning = nuclide_meaning
        rp.RadionuclideCodeSequence = Sequence([code])
    ds.RadiopharmaceuticalInformationSequence = Sequence([rp])
    if rwvm_slope is not None:
        item = Dataset()
        item.RealWorldValueSlope = rwvm_slope
        item.RealWorldValueIntercept = 0.0
        item.LUTLabel = "BQML"
        unit = Dataset()
        unit.CodeValue = "Bq/ml"
        unit.CodingSchemeDesignator = "UCUM"
        unit.CodeMeaning = "Becquerels/milliliter"
        item.MeasurementUnitsCodeSequence = Sequence([unit])
        ds.RealWorldValueMappingSequence = Sequence([item])
    if units is not None:
        ds.Units = units
    if rescale_slope is not None:
        ds.RescaleSlope = rescale_slope
        ds.RescaleIntercept = 0
    _pixels(ds, counts.astype(np.uint16))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def ct_series(
    folder: Path,
    hu: np.ndarray,
    *,
    ipp0=(-100.0, -80.0, -50.0),
    spacing=(2.0, 2.0),
    slice_vector=(0.0, 0.0, 2.5),
    iop=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    patient_id="P1",
    study_uid=None,
    for_uid=None,
    acquisition: datetime | None = datetime(2026, 1, 6, 9, 55, 0),
    z_positions: list[float] | None = None,
) -> list[Dataset]:
    """A CT series, one file per slice, written in reverse order to test sorting."""
    series_uid = generate_uid()
    study_uid = study_uid or generate_uid()
    for_uid = for_uid or generate_uid()
    out = []
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(hu.shape[0]):
        ds = _base(CT, patient_id, study_uid, series_uid, for_uid, "CT")
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesDescription = "CT"
        pos = np.asarray(ipp0, dtype=float) + k * np.asarray(slice_vector, dtype=float)
        if z_positions is not None:
            pos[2] = z_positions[k]
        ds.ImagePositionPatient = [float(v) for v in pos]
        ds.ImageOrientationPatient = list(iop)
        ds.PixelSpacing = list(spacing)
        ds.SliceThickness = float(np.linalg.norm(slice_vector))
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        if acquisition is not None:
            ds.AcquisitionDate = acquisition.strftime("%Y%m%d")
            ds.AcquisitionTime = acquisition.strftime("%H%M%S")
        ds.InstanceNumber = k + 1
        _pixels(ds, (hu[k] + 1024).astype(np.uint16))
        ds.save_as(folder / f"ct_{hu.shape[0] - k:04d}.dcm", enforce_file_format=True)
        out.append(ds)
    return out


def timepoint(root: Path, hours: float, *, patient_id="P1", injection=datetime(2026, 1, 5, 9, 30), seed=0, **nm_kwargs):
    """A SPECT + CT sharing a frame of reference, acquired ``hours`` after ``injection``."""
    from datetime import timedelta

    rng = np.random.default_rng(seed)
    for_uid, study_uid = generate_uid(), generate_uid()
    acq = injection + timedelta(hours=hours)
    counts = rng.poisson(50, size=(6, 8, 10))
    nm = nm_tomo(
        root / "NM" / "spect.dcm",
        counts,
        patient_id=patient_id,
        study_uid=study_uid,
        for_uid=for_uid,
        acquisition=acq,
        injection=injection,
        **nm_kwargs,
    )
    ct = ct_series(
        root / "CT",
        rng.integers(-1000, 1000, size=(12, 16, 20)).astype(np.int16),
        patient_id=patient_id,
        study_uid=study_uid,
        for_uid=for_uid,
        acquisition=acq,
    )
    return nm, ct, counts
