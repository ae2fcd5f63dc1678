"""A deterministic DICOM mutation corpus built from the synthetic patient (issue 14, "Also": the attack campaign).

Shared by tests/service/test_campaign.py (a bounded corpus in CI) and benchmarks/bench_campaign.py (the
500-instance run).  Each :class:`Mutant` is one *fresh patient* (its own PatientID, study, series and SOP instance
UIDs, so no two cases mix): a valid SPECT of the phantom (the *carrier*, the time point the RTSTRUCT is drawn on)
and one instance of that patient damaged in one way — the SPECT itself, a CT slice of the same frame of reference
or the RTSTRUCT.  ``bad`` says what a hostile or careless sender did, decided here from the DICOM standard
(PS3.3/PS3.5/PS3.10), not from what voxeldose does with it:

- ``BAD``: a value a dose depends on is missing, unreadable, of the wrong VR or multiplicity, not finite or
  implausible (geometry, pixel data and its size, rescale, acquisition and injection times, activity, the
  structure set), or the file is damaged (a length running into the next element, cut short): the receiver
  must refuse the instance (C-STORE failure status, STOW-RS FailedSOPSequence) or its patient's cycle must be
  an error in ``GET /v1/dicom/cycles``;
- ``GOOD``: valid, or odd in a way the standard allows (private tags, long free text, the ``none`` controls):
  stored, and its patient is not an error;
- ``EITHER``: the standard is broken in an attribute no dose depends on (Modality, which the SOP class
  already says; SliceThickness of a stack whose positions give the spacing; a character set for text nobody
  reads; a file meta naming implicit VR over an explicit body, which a reader detects): refused or stored,
  both acceptable — but never a crash;
- ``ORPHAN`` (PatientID missing, Type 2 in the Patient Module): the instance belongs to no patient; it may be
  refused, or stored and listed in ``/v1/dicom/series`` without a patient — no cycle can show it.

``stow_only`` mutants damage the PS3.10 file meta (transfer syntax), which a C-STORE does not carry: they are
sent through STOW-RS only.  The seed makes the corpus the same on every run (UIDs included).
"""

from __future__ import annotations

import copy
import random
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Literal

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config

#: PatientID prefix of every case (the log and /tmp scans of the campaign look for it).
PATIENT_PREFIX = "FUZZ"

Mutation = Callable[[Dataset, random.Random], Dataset | bytes]
#: What the receiver must do with a case's damaged instance (see the module docstring).
Expect = Literal["bad", "good", "either", "orphan"]
BAD: Expect = "bad"
GOOD: Expect = "good"
EITHER: Expect = "either"
ORPHAN: Expect = "orphan"


@dataclass(frozen=True)
class Mutant:
    """One case: ``carrier`` (valid Part 10 bytes, sent first) and ``data`` (the damaged instance)."""

    index: int
    kind: str
    target: str  # "NM" | "CT" | "RTSTRUCT"
    patient_id: str
    sop_instance_uid: str  # the damaged instance's (as set before the damage; a deleted one is gone from ``data``)
    series_instance_uid: str
    carrier: bytes
    data: bytes
    expect: Expect
    stow_only: bool = False

    @property
    def label(self) -> str:
        return f"#{self.index} {self.kind} on {self.target} ({self.patient_id})"


# ------------------------------------------------------------------------------------ byte level
def _encode(ds: Dataset) -> bytes:
    """``ds`` as a PS3.10 file, explicit VR little endian, without pydicom's validation of odd values."""
    buf = BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _element_offset(raw: bytes, tag: int, vr: bytes) -> int:
    """Offset of the first explicit-VR little-endian element ``tag`` with ``vr`` after the file meta."""
    needle = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    start = raw.index(b"DICM") + 4
    meta_len = struct.unpack("<I", raw[start + 8 : start + 12])[0]  # (0002,0000) UL, the group length
    off = raw.index(needle, start + 12 + meta_len)
    return off


def _set_short_length(raw: bytes, tag: int, vr: bytes, length: int) -> bytes:
    """Rewrite the 16-bit length field of an element (a short-VR element: UI, LO, CS, DS, DA, …)."""
    off = _element_offset(raw, tag, vr)
    return raw[: off + 6] + struct.pack("<H", length) + raw[off + 8 :]


# ------------------------------------------------------------------------------------ mutations
def _replace(tag: int, vr: str, value: object) -> Mutation:
    def m(ds: Dataset, rng: random.Random) -> Dataset:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds[tag] = DataElement(tag, vr, value)
        return ds

    return m


def _set(keyword: str, value: object) -> Mutation:
    def m(ds: Dataset, rng: random.Random) -> Dataset:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            setattr(ds, keyword, value)
        return ds

    return m


def _delete(keyword: str) -> Mutation:
    def m(ds: Dataset, rng: random.Random) -> Dataset:
        if keyword in ds:
            delattr(ds, keyword)
        return ds

    return m


def _acq_date(value: str) -> Mutation:
    """AcquisitionDate (0008,0022) set to ``value`` and AcquisitionDateTime (0008,002A), which a reader takes
    first when present (PS3.3 C.7.6.1 / C.8.4.9), removed: the damaged date is the one that must be used."""

    def m(ds: Dataset, rng: random.Random) -> Dataset:
        if "AcquisitionDateTime" in ds:
            del ds.AcquisitionDateTime
        return _set("AcquisitionDate", value)(ds, rng)

    return m


def _acq_time(value: str) -> Mutation:
    """As :func:`_acq_date`, for AcquisitionTime (0008,0032)."""

    def m(ds: Dataset, rng: random.Random) -> Dataset:
        if "AcquisitionDateTime" in ds:
            del ds.AcquisitionDateTime
        return _set("AcquisitionTime", value)(ds, rng)

    return m


def _in_item(sequence: str, keyword: str, value: object | None) -> Mutation:
    """Set (or, with None, delete) an attribute of the first item of ``sequence`` (the Radiopharmaceutical
    Information Sequence, the NM Detector Information Sequence…)."""

    def m(ds: Dataset, rng: random.Random) -> Dataset:
        item = getattr(ds, sequence)[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if value is None:
                if keyword in item:
                    delattr(item, keyword)
            else:
                setattr(item, keyword, value)
        return ds

    return m


def _in_radiopharmaceutical(keyword: str, value: object | None) -> Mutation:
    return _in_item("RadiopharmaceuticalInformationSequence", keyword, value)


def _in_detector(keyword: str, value: object | None) -> Mutation:
    return _in_item("DetectorInformationSequence", keyword, value)


def _huge_matrix(ds: Dataset, rng: random.Random) -> Dataset:
    ds.Rows = ds.Columns = 65535
    return ds


def _frames_beyond_pixels(ds: Dataset, rng: random.Random) -> Dataset:
    ds.NumberOfFrames = int(ds.get("NumberOfFrames", 1) or 1) * 50
    return ds


def _private_block(ds: Dataset, rng: random.Random) -> Dataset:
    block = ds.private_block(0x0099, "FUZZ CAMPAIGN", create=True)
    block.add_new(0x01, "OB", rng.randbytes(512))
    block.add_new(0x02, "LO", "private text")
    block.add_new(0x03, "UN", rng.randbytes(64))
    return ds


def _truncate_header(ds: Dataset, rng: random.Random) -> bytes:
    raw = _encode(ds)
    start = raw.index(b"DICM") + 4
    meta_len = struct.unpack("<I", raw[start + 8 : start + 12])[0]
    body = start + 12 + meta_len
    return raw[: body + rng.randrange(8, 400)]


def _truncate_pixels(ds: Dataset, rng: random.Random) -> bytes:
    raw = _encode(ds)
    return raw[: len(raw) - rng.randrange(2, 4000)]


def _garbage_tail(ds: Dataset, rng: random.Random) -> bytes:
    return _encode(ds) + b"\xe0\x7f\x10\x00OW" + rng.randbytes(300)


def _length_into_next(tag: int, vr: bytes, extra: int) -> Mutation:
    """The element's length field runs ``extra`` bytes past its value, into the elements that follow."""

    def m(ds: Dataset, rng: random.Random) -> bytes:
        raw = _encode(ds)
        off = _element_offset(raw, tag, vr)
        length = struct.unpack("<H", raw[off + 6 : off + 8])[0]
        return _set_short_length(raw, tag, vr, min(0xFFFF, length + extra))

    return m


def _letters(tag: int, vr: bytes) -> Mutation:
    """The element's value bytes overwritten with letters (a number's place holding text), length kept."""

    def m(ds: Dataset, rng: random.Random) -> bytes:
        raw = _encode(ds)
        off = _element_offset(raw, tag, vr)
        length = struct.unpack("<H", raw[off + 6 : off + 8])[0]
        return raw[: off + 8] + b"x" * length + raw[off + 8 + length :]

    return m


def _odd_length(tag: int, vr: bytes) -> Mutation:
    def m(ds: Dataset, rng: random.Random) -> bytes:
        raw = _encode(ds)
        off = _element_offset(raw, tag, vr)
        length = struct.unpack("<H", raw[off + 6 : off + 8])[0]
        return _set_short_length(raw, tag, vr, length - 1)

    return m


def _transfer_syntax(uid: str) -> Mutation:
    """The file meta names transfer syntax ``uid``; the data set stays explicit VR little endian (a lying or
    broken sender: a UID nobody knows, a compressed syntax over raw pixels, big endian, implicit VR)."""

    def m(ds: Dataset, rng: random.Random) -> bytes:
        raw = _encode(ds)
        start = raw.index(b"DICM") + 4
        meta_len = struct.unpack("<I", raw[start + 8 : start + 12])[0]
        meta = copy.deepcopy(ds.file_meta)
        meta.TransferSyntaxUID = uid
        buf = BytesIO()
        buf.write(raw[:start])
        write_file_meta_info(buf, meta, enforce_standard=True)
        return buf.getvalue() + raw[start + 12 + meta_len :]

    return m


#: (kind, target, mutation, expect, stow_only); the corpus cycles through this list with a seeded shuffle.
KINDS: list[tuple[str, str, Mutation, Expect, bool]] = [
    # controls: nothing wrong (a failing control means the campaign's verdicts mean nothing)
    ("none", "NM", lambda ds, rng: ds, GOOD, False),
    ("none", "CT", lambda ds, rng: ds, GOOD, False),
    ("none", "RTSTRUCT", lambda ds, rng: ds, GOOD, False),
    # wrong VR
    ("ImageType as US integer", "NM", _replace(0x00080008, "US", 7), BAD, False),
    ("ImageType as US integer", "CT", _replace(0x00080008, "US", 7), BAD, False),
    ("PixelSpacing as LO text", "NM", _replace(0x00280030, "LO", "four\\four"), BAD, False),
    ("SliceThickness as UL", "CT", _replace(0x00180050, "UL", 3), EITHER, False),
    ("FrameOfReferenceUID as US", "NM", _replace(0x00200052, "US", 1), BAD, False),
    ("Rows as DS", "NM", _replace(0x00280010, "DS", "64.5"), BAD, False),
    ("Modality as US", "NM", _replace(0x00080060, "US", 5), BAD, False),
    ("SeriesInstanceUID as SQ", "NM", _replace(0x0020000E, "SQ", []), BAD, False),
    # wrong value multiplicity
    ("PixelSpacing VM 1", "NM", _set("PixelSpacing", [4.0]), BAD, False),
    ("PixelSpacing VM 3", "CT", _set("PixelSpacing", [1.0, 1.0, 1.0]), BAD, False),
    ("ImageOrientationPatient VM 5", "CT", _set("ImageOrientationPatient", [1, 0, 0, 0, 1]), BAD, False),
    ("ImagePositionPatient VM 2", "NM", _in_detector("ImagePositionPatient", [0.0, 0.0]), BAD, False),
    ("Modality VM 2", "NM", _set("Modality", ["NM", "CT"]), EITHER, False),
    ("SliceVector too short", "NM", _set("SliceVector", [1, 2]), BAD, False),
    # lengths
    ("SOPInstanceUID length runs into the next elements", "NM", _length_into_next(0x00080018, b"UI", 40), BAD, False),
    ("SeriesDescription length 0xFFFF", "NM", _length_into_next(0x0008103E, b"LO", 0xFFFF), BAD, False),
    ("Modality odd length", "CT", _odd_length(0x00080060, b"CS"), BAD, False),
    ("StudyInstanceUID odd length", "NM", _odd_length(0x0020000D, b"UI"), BAD, False),
    ("truncated in the header", "NM", _truncate_header, BAD, False),
    ("truncated in the header", "CT", _truncate_header, BAD, False),
    ("truncated pixel data", "NM", _truncate_pixels, BAD, False),
    ("truncated pixel data", "CT", _truncate_pixels, BAD, False),
    ("truncated RTSTRUCT", "RTSTRUCT", _truncate_pixels, BAD, False),
    ("bytes after the pixel data", "CT", _garbage_tail, BAD, False),
    ("Rows and Columns 65535, short PixelData", "NM", _huge_matrix, BAD, False),
    ("Rows and Columns 65535, short PixelData", "CT", _huge_matrix, BAD, False),
    ("NumberOfFrames beyond the PixelData", "NM", _frames_beyond_pixels, BAD, False),
    # missing Type 1 attributes
    ("no Modality", "NM", _delete("Modality"), EITHER, False),
    ("no Modality", "CT", _delete("Modality"), EITHER, False),
    ("no StudyInstanceUID", "NM", _delete("StudyInstanceUID"), BAD, False),
    ("no SeriesInstanceUID", "CT", _delete("SeriesInstanceUID"), BAD, False),
    ("no SOPInstanceUID", "NM", _delete("SOPInstanceUID"), BAD, False),
    # the Frame of Reference module is U (user option) in the NM Image IOD (PS3.3 A.5.3): legal, if unusable
    ("no FrameOfReferenceUID", "NM", _delete("FrameOfReferenceUID"), EITHER, False),
    ("no FrameOfReferenceUID", "CT", _delete("FrameOfReferenceUID"), BAD, False),
    ("no PixelData", "NM", _delete("PixelData"), BAD, False),
    ("no PixelData", "CT", _delete("PixelData"), BAD, False),
    ("no RescaleSlope", "CT", _delete("RescaleSlope"), BAD, False),
    ("no PixelSpacing", "NM", _delete("PixelSpacing"), BAD, False),
    ("no ImagePositionPatient", "CT", _delete("ImagePositionPatient"), BAD, False),
    ("no Rows", "CT", _delete("Rows"), BAD, False),
    ("no BitsAllocated", "NM", _delete("BitsAllocated"), BAD, False),
    ("no RadiopharmaceuticalInformationSequence", "NM", _delete("RadiopharmaceuticalInformationSequence"), BAD, False),
    ("no StructureSetROISequence", "RTSTRUCT", _delete("StructureSetROISequence"), BAD, False),
    ("no ROIContourSequence", "RTSTRUCT", _delete("ROIContourSequence"), BAD, False),
    ("no PatientID", "NM", _delete("PatientID"), ORPHAN, False),
    # NaN / Inf in DS
    ("RescaleSlope NaN", "CT", _replace(0x00281053, "DS", "NaN"), BAD, False),
    ("RescaleSlope Inf", "CT", _replace(0x00281053, "DS", "Inf"), BAD, False),
    ("RescaleIntercept -Infinity", "CT", _replace(0x00281052, "DS", "-Infinity"), BAD, False),
    ("PixelSpacing NaN", "NM", _replace(0x00280030, "DS", "NaN\\NaN"), BAD, False),
    ("SpacingBetweenSlices as text", "NM", _letters(0x00180088, b"DS"), BAD, False),
    ("no Columns", "NM", _delete("Columns"), BAD, False),
    ("SpacingBetweenSlices Inf", "NM", _replace(0x00180088, "DS", "Inf"), BAD, False),
    ("SliceThickness NaN", "CT", _replace(0x00180050, "DS", "nan"), EITHER, False),
    ("RadionuclideTotalDose NaN", "NM", _in_radiopharmaceutical("RadionuclideTotalDose", "NaN"), BAD, False),
    ("RadionuclideTotalDose Inf", "NM", _in_radiopharmaceutical("RadionuclideTotalDose", "Inf"), BAD, False),
    ("RadionuclideTotalDose negative", "NM", _in_radiopharmaceutical("RadionuclideTotalDose", "-7400"), BAD, False),
    # absurd dates and times
    ("AcquisitionDate 00000000", "NM", _acq_date("00000000"), BAD, False),
    ("AcquisitionDate month 13", "NM", _acq_date("20261340"), BAD, False),
    ("AcquisitionDate ISO with dashes", "NM", _acq_date("1958-03-12"), BAD, False),
    ("AcquisitionTime 25:61:99", "NM", _acq_time("256199"), BAD, False),
    ("AcquisitionDate year 9999", "NM", _acq_date("99991231"), BAD, False),
    (
        "injection 0001-01-01",
        "NM",
        _in_radiopharmaceutical("RadiopharmaceuticalStartDateTime", "00010101000000"),
        BAD,
        False,
    ),
    (
        "injection after the scan",
        "NM",
        _in_radiopharmaceutical("RadiopharmaceuticalStartDateTime", "20991231235959"),
        BAD,
        False,
    ),
    (
        "injection date-time garbage",
        "NM",
        _in_radiopharmaceutical("RadiopharmaceuticalStartDateTime", "yesterday"),
        BAD,
        False,
    ),
    ("no injection date-time", "NM", _in_radiopharmaceutical("RadiopharmaceuticalStartDateTime", None), BAD, False),
    ("AcquisitionDate garbage", "CT", _set("AcquisitionDate", "notadate"), EITHER, False),
    # other odd values
    ("BitsAllocated 12", "NM", _set("BitsAllocated", 12), BAD, False),
    ("BitsAllocated 0", "CT", _set("BitsAllocated", 0), BAD, False),
    ("RescaleSlope 0", "CT", _set("RescaleSlope", 0), BAD, False),
    ("PixelSpacing 0", "NM", _set("PixelSpacing", [0.0, 0.0]), BAD, False),
    ("negative PixelSpacing", "CT", _set("PixelSpacing", [-1.0, 1.0]), BAD, False),
    ("ImageOrientationPatient all zero", "CT", _set("ImageOrientationPatient", [0, 0, 0, 0, 0, 0]), BAD, False),
    ("SpecificCharacterSet unknown", "NM", _set("SpecificCharacterSet", "ISO_IR 999"), EITHER, False),
    ("private tags", "NM", _private_block, GOOD, False),
    ("private tags", "CT", _private_block, GOOD, False),
    ("SeriesDescription 64 KiB", "NM", _set("SeriesDescription", "x" * 65534), GOOD, False),
    # file meta (STOW-RS only: a C-STORE carries no file meta)
    ("transfer syntax 1.2.3.4", "NM", _transfer_syntax("1.2.3.4"), BAD, True),
    ("transfer syntax JPEG baseline on raw pixels", "CT", _transfer_syntax("1.2.840.10008.1.2.4.50"), BAD, True),
    ("transfer syntax big endian on a little-endian body", "NM", _transfer_syntax("1.2.840.10008.1.2.2"), BAD, True),
    ("file meta implicit VR, body explicit", "CT", _transfer_syntax("1.2.840.10008.1.2"), EITHER, True),
]


def transfer_syntax_mutant(path: Path, uid: str) -> bytes:
    """The PS3.10 file at ``path`` with its file meta naming transfer syntax ``uid`` (body unchanged)."""
    out = _transfer_syntax(uid)(pydicom.dcmread(path), random.Random(0))
    assert isinstance(out, bytes)
    return out


# ------------------------------------------------------------------------------------ the corpus
@dataclass(frozen=True)
class Sources:
    """The phantom files a case starts from: the SPECT the RTSTRUCT is drawn on, one CT slice of the same
    frame of reference, the RTSTRUCT."""

    nm: Path
    ct: Path
    rtstruct: Path


def sources(phantom_dicom: Path) -> Sources:
    """Find the carrier files in the phantom's ``dicom/`` folder (voxeldose.phantom.write_phantom's layout)."""
    rt = pydicom.dcmread(phantom_dicom / "RTSTRUCT.dcm", stop_before_pixels=True)
    rt_for = str(rt.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID)
    for nm in sorted(phantom_dicom.glob("*/NM/*.dcm")):
        if str(pydicom.dcmread(nm, stop_before_pixels=True).FrameOfReferenceUID) == rt_for:
            cts = sorted(nm.parent.parent.glob("CT/*.dcm"))
            return Sources(nm=nm, ct=cts[len(cts) // 2], rtstruct=phantom_dicom / "RTSTRUCT.dcm")
    raise ValueError(f"{phantom_dicom}: no SPECT on the RTSTRUCT's frame of reference")


def _fresh(path: Path, patient_id: str, study: str, series: str, sop: str) -> Dataset:
    """The file as a new patient's instance: PatientID/Name, study, series and SOP instance UIDs replaced."""
    ds = pydicom.dcmread(path)
    ds.PatientID = patient_id
    ds.PatientName = f"{PATIENT_PREFIX}^CASE{patient_id[len(PATIENT_PREFIX) :]}"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    return ds


def corpus(phantom_dicom: Path, n: int, seed: int = 14) -> list[Mutant]:
    """``n`` cases (one fresh patient each): every kind of :data:`KINDS` in turn, in an order shuffled by
    ``seed``; the damage itself (where a file is cut, the private bytes) is drawn from the same seed."""
    src = sources(phantom_dicom)
    rng = random.Random(seed)
    order = list(range(len(KINDS)))
    rng.shuffle(order)
    out: list[Mutant] = []
    for i in range(n):
        kind, target, mutate, expect, stow_only = KINDS[order[i % len(KINDS)]]
        pid = f"{PATIENT_PREFIX}{seed:02d}{i:04d}"

        def uid(what: str, i: int = i) -> str:
            return generate_uid(entropy_srcs=[f"fuzzcorpus {seed} {i} {what}"])

        study, victim_series, victim_sop = uid("study"), uid("victim series"), uid("victim sop")
        carrier = _fresh(src.nm, pid, study, uid("nm series"), uid("nm sop"))
        if target == "NM":
            victim = _fresh(src.nm, pid, study, victim_series, victim_sop)
        else:
            path = src.ct if target == "CT" else src.rtstruct
            victim = _fresh(path, pid, study, victim_series, victim_sop)
        damaged = mutate(victim, rng)
        data = damaged if isinstance(damaged, bytes) else _encode(damaged)
        # an NM case is the damaged SPECT alone (its carrier would be a second reconstruction at the same time)
        carrier_bytes = b"" if target == "NM" else _encode(carrier)
        out.append(Mutant(i, kind, target, pid, victim_sop, victim_series, carrier_bytes, data, expect, stow_only))
    return out


# ------------------------------------------------------------------------------------ sending
#: The SOP classes of the corpus (the presentation contexts an SCU proposes).
SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.20", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.481.3")
VERIFICATION = "1.2.840.10008.1.1"
STOW_BOUNDARY = "campaign-0123456789"
STOW_CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={STOW_BOUNDARY}'
_REFERENCED, _SOP_INSTANCE = "00081199", "00081155"


def associate(port: int, scu: str, aet: str) -> Any:
    """A pynetdicom association to the node on loopback, proposing the corpus' SOP classes (explicit VR little
    endian) and Verification; AssertionError when the node refuses it."""
    ae = AE(ae_title=scu)
    for sop in SOP_CLASSES:
        ae.add_requested_context(sop, ExplicitVRLittleEndian)
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    assert assoc.is_established, "the node refused the association"
    return assoc


def c_store(port: int, m: Mutant, folder: Path, *, scu: str, aet: str) -> tuple[int, int | None]:
    """Carrier then damaged instance in one association, the files' bytes sent as they are (pynetdicom's chunked
    send, so that a damaged encoding reaches the node undecoded): (carrier status, damaged instance status;
    None when the node sent none)."""
    folder.mkdir(parents=True, exist_ok=True)
    victim = folder / f"{m.index}.dcm"
    victim.write_bytes(m.data)
    assoc = associate(port, scu, aet)
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        carrier_status = 0
        if m.carrier:
            carrier = folder / f"{m.index}.carrier.dcm"
            carrier.write_bytes(m.carrier)
            rsp = assoc.send_c_store(carrier)
            carrier_status = int(rsp.Status) if "Status" in rsp else -1
        rsp = assoc.send_c_store(victim)
        status = int(rsp.Status) if "Status" in rsp else None
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        if assoc.is_established:
            assoc.release()
    return carrier_status, status


def echo(port: int, *, scu: str, aet: str) -> bool:
    """C-ECHO answered with Success."""
    ae = AE(ae_title=scu)
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    if not assoc.is_established:
        return False
    try:
        rsp = assoc.send_c_echo()
        return "Status" in rsp and int(rsp.Status) == 0
    finally:
        assoc.release()


def stow_body(m: Mutant) -> bytes:
    """Carrier and damaged instance as a STOW-RS multipart/related body (PS3.18 §8.6.1.2), one part each."""
    out = BytesIO()
    for p in ([m.carrier] if m.carrier else []) + [m.data]:
        out.write(f"--{STOW_BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        out.write(p)
        out.write(b"\r\n")
    out.write(f"--{STOW_BOUNDARY}--\r\n".encode())
    return out.getvalue()


def stow_stored(content_type: str, body: Any) -> set[str]:
    """SOP instance UIDs a STOW-RS response references (ReferencedSOPSequence (0008,1199)); none when the
    response is no Store Instances Response Module."""
    if not content_type.startswith("application/dicom+json") or not isinstance(body, dict):
        return set()
    out: set[str] = set()
    for item in body.get(_REFERENCED, {}).get("Value", []):
        out.update(item.get(_SOP_INSTANCE, {}).get("Value", []))
    return out
