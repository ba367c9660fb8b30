"""Write CT Image Storage series (phantoms, tests, fuzzing) and a CT localizer.

Conventions: the array is (i, j, k) as everywhere in the project; slice k is written as pixel
data ``hu[:, :, k].T`` (rows x columns), ImageOrientationPatient = direction[:, 0], direction[:, 1],
ImagePositionPatient = ``geometry.index_to_lps([0, 0, k])``, PixelSpacing = [spacing[1],
spacing[0]] (row spacing first). Stored value = round((HU - intercept) / slope) as signed 16-bit.

The k axis may point anywhere that is not in the slice plane: a direction[:, 2] that is not
perpendicular to the slices writes a sheared stack, exactly what a gantry-tilted CT looks like.
All type 1 and type 2 attributes of the modules of the CT Image IOD are written (Patient,
General Study, Patient Study, General Series, Frame of Reference, General Equipment, General
Acquisition, General Image, Image Plane, Image Pixel, CT Image, VOI LUT, SOP Common).
"""

from __future__ import annotations

import datetime as _dt
import random
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    PYDICOM_IMPLEMENTATION_UID,
    RLELossless,
    generate_uid,
)

from pipeline.types import DicomSource, Geometry

TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "jpeg2000": JPEG2000Lossless,
    "rle": RLELossless,
}
MANUFACTURER = "osteoplan"


def _fmt(v: float) -> str:
    """A DS value (at most 16 characters)."""
    s = f"{v:.10g}"
    if len(s) > 16:
        s = f"{v:.6e}" if abs(v) >= 1e10 or (abs(v) < 1e-4 and v != 0) else f"{v:.8f}"[:16]
    return s


def _base_dataset(study_uid: str, series_uid: str, for_uid: str, sop_uid: str, *, series_number: int,
                  series_description: str, patient_position: str, patient_name: str, patient_id: str,
                  study_date: str, image_type: list[str], instance_number: int) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = image_type
    # Patient / General Study / Patient Study
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = study_date
    ds.StudyTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = "osteoplan synthetic CT"
    # General Series
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = int(series_number)
    ds.SeriesDescription = series_description
    ds.SeriesDate = study_date
    ds.SeriesTime = "120000"
    ds.PatientPosition = patient_position
    ds.BodyPartExamined = "SPINE"
    # Frame of Reference / Equipment
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "osteoplan phantom writer"
    ds.SoftwareVersions = "1"
    ds.InstitutionName = ""
    # General Acquisition / General Image
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = int(instance_number)
    ds.ContentDate = study_date
    ds.ContentTime = "120000"
    ds.AcquisitionDate = study_date
    ds.AcquisitionTime = "120000"
    ds.BurnedInAnnotation = "NO"
    # CT Image
    ds.KVP = "120"
    ds.ConvolutionKernel = "STANDARD"
    ds.RescaleType = "HU"
    return ds


def _pixel_module(ds: Dataset, stored: np.ndarray, slope: float, intercept: float) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = _fmt(intercept)
    ds.RescaleSlope = _fmt(slope)
    ds.WindowCenter = "400"
    ds.WindowWidth = "1800"
    ds.PixelData = np.ascontiguousarray(stored, dtype="<i2").tobytes()


def _save(ds: Dataset, path: Path, transfer_syntax: str) -> None:
    ts = TRANSFER_SYNTAXES[transfer_syntax]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if ts.is_compressed else ts
    ds.file_meta = meta
    if ts.is_compressed:
        ds.compress(ts, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True, implicit_vr=ts.is_implicit_VR, little_endian=True)


def _stored(hu: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    stored = np.rint((np.asarray(hu, dtype=np.float64) - intercept) / slope)
    if stored.size and (stored.min() < -32768 or stored.max() > 32767):
        raise ValueError("HU values do not fit in signed 16-bit stored values with this slope/intercept")
    return stored.astype(np.int16)


def write_ct_series(
    hu: np.ndarray,
    geometry: Geometry,
    outdir: Path,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    series_description: str = "osteoplan phantom",
    patient_position: str = "HFS",
    file_names: str = "instance",
    instance_numbers: str = "ordered",
    transfer_syntax: str = "explicit",
    rescale_intercept: float = -1024,
    rescale_slope: float = 1,
    patient_name: str = "PHANTOM^ANON",
    patient_id: str = "PHANTOM",
    study_date: str | None = None,
    seed: int | None = None,
) -> DicomSource:
    """Write ``hu`` (i, j, k) as a CT series, one file per k; returns files/UIDs in k order.

    ``file_names``: "instance" (CT000001.dcm... by InstanceNumber) or "random" (meaningless hex
    names, so a reader that sorts by name fails). ``instance_numbers``: "ordered" (1..n along k) or
    "shuffled". ``transfer_syntax``: explicit | implicit | jpeg2000 (lossless) | rle. ``seed``
    makes the random names and shuffles reproducible.
    """
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax must be one of {sorted(TRANSFER_SYNTAXES)}")
    if file_names not in ("instance", "random") or instance_numbers not in ("ordered", "shuffled"):
        raise ValueError("file_names must be instance|random and instance_numbers ordered|shuffled")
    hu = np.asarray(hu)
    if hu.ndim != 3 or tuple(hu.shape) != geometry.shape:
        raise ValueError(f"array shape {hu.shape} != geometry shape {geometry.shape}")
    d = geometry.direction
    if abs(float(d[:, 0] @ d[:, 1])) > 1e-6 or not np.allclose(np.linalg.norm(d[:, :2], axis=0), 1, atol=1e-6):
        raise ValueError("direction[:, 0] and direction[:, 1] must be orthonormal")
    if abs(float(np.cross(d[:, 0], d[:, 1]) @ d[:, 2])) < 0.1:
        raise ValueError("direction[:, 2] lies (almost) in the slice plane")
    if transfer_syntax == "jpeg2000" and min(hu.shape[0], hu.shape[1]) < 32:
        raise ValueError("jpeg2000 needs slices of at least 32 x 32 pixels (6 wavelet resolutions)")
    rng = random.Random(seed)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    study_date = study_date if study_date is not None else _dt.date.today().strftime("%Y%m%d")
    nk = hu.shape[2]
    numbers = list(range(1, nk + 1))
    if instance_numbers == "shuffled":
        rng.shuffle(numbers)
    stored = _stored(hu, rescale_slope, rescale_intercept)
    normal = np.cross(d[:, 0], d[:, 1])
    iop = [_fmt(v) for v in list(d[:, 0]) + list(d[:, 1])]
    files: list[Path] = []
    sops: list[str] = []
    order = list(range(nk))
    if file_names == "random":
        rng.shuffle(order)  # write in a scrambled order too (file system order means nothing)
    by_k: dict[int, tuple[Path, str]] = {}
    for k in order:
        sop = generate_uid()
        ds = _base_dataset(study_uid, series_uid, for_uid, sop, series_number=series_number,
                           series_description=series_description, patient_position=patient_position,
                           patient_name=patient_name, patient_id=patient_id, study_date=study_date,
                           image_type=["ORIGINAL", "PRIMARY", "AXIAL"], instance_number=numbers[k])
        ipp = geometry.index_to_lps(np.array([[0.0, 0.0, float(k)]]))[0]
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = [_fmt(v) for v in ipp]
        ds.SliceLocation = _fmt(float(ipp @ normal))
        ds.PixelSpacing = [_fmt(geometry.spacing[1]), _fmt(geometry.spacing[0])]
        ds.SliceThickness = _fmt(geometry.spacing[2])
        ds.SpacingBetweenSlices = _fmt(geometry.spacing[2])
        _pixel_module(ds, stored[:, :, k].T, rescale_slope, rescale_intercept)
        name = f"{rng.getrandbits(64):016x}" if file_names == "random" else f"CT{numbers[k]:06d}.dcm"
        path = outdir / name
        _save(ds, path, transfer_syntax)
        by_k[k] = (path, sop)
    for k in range(nk):
        files.append(by_k[k][0])
        sops.append(by_k[k][1])
    return DicomSource(study_instance_uid=study_uid, series_instance_uid=series_uid,
                       frame_of_reference_uid=for_uid, sop_instance_uids=sops, files=files, modality="CT",
                       series_description=series_description, series_number=series_number)


def write_localizer(
    outdir: Path,
    study_uid: str,
    frame_of_reference_uid: str,
    *,
    size: tuple[int, int] = (64, 96),
    spacing_mm: tuple[float, float] = (2.0, 2.0),
    origin: tuple[float, float, float] = (-64.0, 0.0, 96.0),
    series_uid: str | None = None,
    series_number: int = 100,
    patient_name: str = "PHANTOM^ANON",
    patient_id: str = "PHANTOM",
    study_date: str | None = None,
    file_name: str = "localizer.dcm",
) -> Path:
    """Write one coronal CT LOCALIZER image (ImageType ORIGINAL\\PRIMARY\\LOCALIZER) in the study.

    ``size`` is (columns, rows); rows run from head to feet (column vector -S), columns along +L.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    cols, rows = size
    study_date = study_date if study_date is not None else _dt.date.today().strftime("%Y%m%d")
    ds = _base_dataset(study_uid, series_uid or generate_uid(), frame_of_reference_uid, generate_uid(),
                       series_number=series_number, series_description="localizer", patient_position="HFS",
                       patient_name=patient_name, patient_id=patient_id, study_date=study_date,
                       image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"], instance_number=1)
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    ds.ImagePositionPatient = [_fmt(v) for v in origin]
    ds.PixelSpacing = [_fmt(spacing_mm[0]), _fmt(spacing_mm[1])]
    ds.SliceThickness = ""
    del ds.RescaleType  # RescaleType HU is not allowed on an ORIGINAL localizer
    yy, xx = np.mgrid[0:rows, 0:cols]
    hu = -1000 + 1400 * np.exp(-(((xx - cols / 2) / (cols / 6)) ** 2))
    hu = hu + 0 * yy
    _pixel_module(ds, _stored(hu, 1, -1024), 1, -1024)
    path = outdir / file_name
    _save(ds, path, "explicit")
    return path


def write_enhanced_ct(path: Path, hu: np.ndarray, geom: Geometry, *, per_frame_rescale: bool = False) -> Path:
    """A minimal Enhanced CT Image (multi-frame) file: frame k = hu[:, :, k].T.

    Plane orientation, pixel measures and (unless ``per_frame_rescale``) the rescale are shared
    functional groups; plane positions are per frame, stored in reverse k order so a reader must
    sort. With ``per_frame_rescale`` each frame has its own RescaleIntercept (-1024 + 10 k).
    Not a complete IOD (no dimension module): enough for readers and tests.
    """
    nk = hu.shape[2]
    ds = Dataset()
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.SeriesNumber = 7
    ds.InstanceNumber = 1
    ds.PatientName = "PHANTOM^ANON"
    ds.PatientID = "PHANTOM"
    ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
    ds.NumberOfFrames = nk
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    d = geom.direction
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = [float(v) for v in list(d[:, 0]) + list(d[:, 1])]
    shared.PlaneOrientationSequence = [orient]
    meas = Dataset()
    meas.PixelSpacing = [geom.spacing[1], geom.spacing[0]]
    meas.SliceThickness = geom.spacing[2]
    shared.PixelMeasuresSequence = [meas]
    intercepts = [-1024 + (10 * k if per_frame_rescale else 0) for k in range(nk)]
    if not per_frame_rescale:
        pvt = Dataset()
        pvt.RescaleIntercept = -1024
        pvt.RescaleSlope = 1
        pvt.RescaleType = "HU"
        shared.PixelValueTransformationSequence = [pvt]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    stored = []
    order = list(range(nk))[::-1]  # frames stored in reverse k order: the reader must sort
    for k in order:
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [float(v) for v in geom.index_to_lps(np.array([[0, 0, k]]))[0]]
        item.PlanePositionSequence = [pos]
        if per_frame_rescale:
            pvt = Dataset()
            pvt.RescaleIntercept = intercepts[k]
            pvt.RescaleSlope = 1
            pvt.RescaleType = "HU"
            item.PixelValueTransformationSequence = [pvt]
        frames.append(item)
        stored.append((hu[:, :, k].T.astype(np.int32) - intercepts[k]).astype("<i2"))
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = np.stack(stored).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
