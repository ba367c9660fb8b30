"""Write the requested output formats of one study into a folder.

Formats: ``json`` (report.json, written by the caller), ``csv`` (lesions.csv), ``nifti``
(segmentation.nii.gz), ``seg`` (seg.dcm, DICOM SEG), ``sr`` (sr.dcm, TID 1500 SR that references
seg.dcm), ``html`` (report.html + key_lesion<N>_{axial,sagittal}.png). Each format is timed as
``write_<fmt>`` in ``report["timings_s"]``. What cannot be written (SEG/SR without DICOM
source, or when de-identifying) is skipped with a line in ``report["warnings"]``. A failure in
one of the derived DICOM/HTML writers is logged with its traceback and reported as a warning;
the other outputs are still written.

The SEG's source headers can be read ahead (``start_source_prefetch``, while the model runs).
With ``PARALLEL_NIFTI_MIN_CPUS`` usable CPUs or more the NIfTI is compressed in a thread beside
the SEG and SR; otherwise, and for the other writers, they run one after the other (HTML/NIfTI
in a thread beside the SEG was measured slower on 2 cores: the SEG holds the GIL; since the NIfTI
is gzipped in large GIL-free chunks, session 9, the thread no longer loses time, but on 2 cores
the write stage as a whole did not get faster, BENCHMARKS.md).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.report import csv_out
from pipeline.report.background import BackgroundCall, usable_cpus
from pipeline.types import CanalSummary, Lesion, Recommendation, Segmentation, Volume

if TYPE_CHECKING:
    from pipeline.report.seg import SourcePrefetch

log = logging.getLogger("osteoplan.report")

KNOWN_FORMATS = ("json", "csv", "nifti", "seg", "sr", "html")
# With this many CPUs or more, the NIfTI is compressed in a thread while the SEG and SR are built
# (zlib releases the GIL). On 2 cores overlapping them was slower (BENCHMARKS.md), so not there.
PARALLEL_NIFTI_MIN_CPUS = 4


class _Timer(Protocol):
    def stage(self, name: str) -> Any: ...


def write_all(outdir: Path, volume: Volume, seg: Segmentation, lesions: list[Lesion],
              recs: list[Recommendation], canal: CanalSummary, report: dict[str, Any], *,
              formats: tuple[str, ...], deidentify: bool, timer: _Timer,
              sources: SourcePrefetch | None = None) -> None:
    """Write every format in ``formats`` (see module docstring) into ``outdir``.

    ``sources``: the SEG's source headers, already being read (``start_source_prefetch``).
    Python's cyclic garbage collector is paused meanwhile (see ``cyclic_gc_paused``).
    """
    with cyclic_gc_paused():
        _write_all(outdir, volume, seg, lesions, recs, canal, report, formats=formats, deidentify=deidentify,
                   timer=timer, sources=sources)


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector (reference counting still frees memory).

    Building the SEG and SR creates ~100k small pydicom objects; each allocation burst sets off
    collections that walk every object of the process (PyTorch, MONAI: ~0.5M), ~10-18 % of
    the SEG+SR time. The writers make no reference cycles worth collecting mid-way; the
    collector runs again as usual afterwards.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _write_all(outdir: Path, volume: Volume, seg: Segmentation, lesions: list[Lesion],
               recs: list[Recommendation], canal: CanalSummary, report: dict[str, Any], *,
               formats: tuple[str, ...], deidentify: bool, timer: _Timer,
               sources: SourcePrefetch | None) -> None:
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    fmts = [f for f in KNOWN_FORMATS if f in formats]
    unknown = sorted(set(formats) - set(KNOWN_FORMATS))
    if unknown:
        report["warnings"].append(f"unknown output format(s) ignored: {', '.join(unknown)}")
    warnings: list[str] = report["warnings"]

    dicom_ok = _dicom_allowed(volume, deidentify, fmts, warnings)
    seg_ds = None
    headers = None

    if "csv" in fmts:
        with timer.stage("write_csv"):
            csv_out.write_csv(outdir / "lesions.csv", csv_out.lesion_rows(report))

    nifti = None
    if "nifti" in fmts:
        nifti = BackgroundCall(_write_nifti, seg, outdir, timer)
        if usable_cpus() >= PARALLEL_NIFTI_MIN_CPUS:
            nifti.start()
        else:
            nifti.run()

    if dicom_ok and ("seg" in fmts or "sr" in fmts):
        with timer.stage("write_seg"):
            try:
                from pipeline.report.seg import aligned_to_grid, read_source_headers, write_seg
                from pipeline.report.warmup import wait_for_warmup

                headers = sources.result(volume) if sources is not None else read_source_headers(volume)
                if not aligned_to_grid(headers, volume.geometry):
                    warnings.append("seg.dcm frames are placed by position only: the analysed grid was "
                                    "resampled from the source images")
                wait_for_warmup()  # rather than parse highdicom's tables a second time
                seg_ds = write_seg(outdir / "seg.dcm", volume, seg, headers, preview=bool(report.get("fast")))
                if "seg" not in fmts:
                    warnings.append("seg.dcm written because sr.dcm references its segments")
            except Exception as exc:  # noqa: BLE001 - one failed writer must not lose the others
                _failed("seg.dcm", exc, warnings)

    if dicom_ok and "sr" in fmts:
        with timer.stage("write_sr"):
            if seg_ds is None or headers is None:
                warnings.append("sr.dcm not written: it needs seg.dcm, which could not be written")
            else:
                try:
                    from pipeline.report.sr import write_sr

                    write_sr(outdir / "sr.dcm", volume, seg, seg_ds, report, headers)
                except Exception as exc:  # noqa: BLE001
                    _failed("sr.dcm", exc, warnings)

    if "html" in fmts:
        with timer.stage("write_html"):
            try:
                from pipeline.report.html import write_html

                write_html(outdir, volume, seg, report)
            except Exception as exc:  # noqa: BLE001
                _failed("report.html", exc, warnings)

    if nifti is not None:
        nifti.result()  # a failed NIfTI fails the study, as it did when written inline


def _write_nifti(seg: Segmentation, outdir: Path, timer: _Timer) -> None:
    from pipeline.io.nifti import write_label_nifti

    with timer.stage("write_nifti"):
        write_label_nifti(seg.labels, seg.geometry, outdir / "segmentation.nii.gz")


def start_source_prefetch(volume: Volume, formats: tuple[str, ...], deidentify: bool) -> SourcePrefetch | None:
    """Start the SEG's slow preparations in the background, when seg.dcm will be written.

    Reads the source headers (``SourcePrefetch``) and, on the first study of a process, loads
    highdicom's standard tables (``warmup.warm_dicom_writers``). Call it once the volume is
    loaded (before inference) and pass the result to ``write_all``.
    """
    fmts = [f for f in KNOWN_FORMATS if f in formats]
    if not _dicom_allowed(volume, deidentify, fmts, []):
        return None
    from pipeline.report.seg import SourcePrefetch
    from pipeline.report.warmup import warm_dicom_writers

    warm_dicom_writers(fmts, deidentify)
    return SourcePrefetch(volume)


def _dicom_allowed(volume: Volume, deidentify: bool, fmts: list[str], warnings: list[str]) -> bool:
    wanted = [f for f in ("seg", "sr") if f in fmts]
    if not wanted:
        return False
    names = " and ".join(f"{f}.dcm" for f in wanted)
    if deidentify:
        warnings.append(f"{names} not written: DICOM SEG/SR carry patient identity and --deidentify is set")
        return False
    if volume.dicom is None or not volume.dicom.files:
        warnings.append(f"{names} not written: the input is not DICOM (no source images to reference)")
        return False
    resampled = (volume.selection.get("chosen") or {}).get("resampled")
    if resampled:
        warnings.append(f"{names} not written: the analysed grid was resampled from the source images "
                        f"({resampled}), so segments cannot be stored frame by frame on them")
        return False
    if not all(volume.dicom.sop_instance_uids):
        warnings.append(f"{names} not written: the source images have no SOPInstanceUID to reference")
        return False
    return True


def _failed(name: str, exc: Exception, warnings: list[str]) -> None:
    log.error("writing %s failed: %s", name, exc, exc_info=True, extra={"file_only": True})
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    log.warning("writing %s failed (%s); details in the log", name, type(exc).__name__)
    warnings.append(f"{name} not written: {type(exc).__name__}: {first}")
