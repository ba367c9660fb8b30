"""Get the DICOM writers' one-time start-up cost out of the first study's write stage.

The first SEG of a process pays for importing highdicom (~0.5 s) and for parsing its DICOM
standard tables (highdicom's ``_standard_utils``: a 22 MB JSON module/attribute table and two
small ones, ~0.6-0.9 s). ``warm_dicom_writers`` imports highdicom on the calling thread (two
threads importing the same packages at once can dead-lock on the import locks) and parses the
tables in a daemon thread. ``writers.start_source_prefetch`` calls it once a DICOM series is
loaded and SEG/SR will be written, so the parse overlaps with inference (a NIfTI input or a
de-identified run never pays for it). Batch, Ray and PACS workers pay it once per process.

The JSON parse holds the GIL while it runs (it is one C call), so the overlap is with whatever
the main thread does without the GIL (file reads, PyTorch kernels), not with Python code.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

log = logging.getLogger("osteoplan.report.warmup")

_lock = threading.Lock()
_thread: threading.Thread | None = None


def warm_dicom_writers(formats: Iterable[str], deidentify: bool) -> threading.Thread | None:
    """Start loading highdicom's tables in the background when SEG/SR may be written (once per process)."""
    global _thread
    if deidentify or not {"seg", "sr"} & set(formats):
        return None
    with _lock:
        if _thread is None:
            import pipeline.report.seg  # noqa: F401  (imports highdicom, here on the calling thread)
            import pipeline.report.sr  # noqa: F401

            _thread = threading.Thread(target=_load_tables, name="osteoplan-highdicom-tables", daemon=True)
            _thread.start()
        return _thread


def wait_for_warmup(timeout: float | None = None) -> None:
    """Wait for a running warm-up (the writers would otherwise parse the same tables a second time)."""
    thread = _thread
    if thread is not None and thread.is_alive():
        thread.join(timeout)


def _load_tables() -> None:
    try:
        from highdicom import _standard_utils as su

        su.get_sop_class_iod_map()
        su.get_iod_module_map()
        su.get_module_attribute_map()
    except Exception as exc:  # noqa: BLE001 - a private hook: if highdicom changes, only speed is lost
        log.debug("highdicom tables not pre-loaded: %s", exc)
