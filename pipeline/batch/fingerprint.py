"""Input fingerprints: how ``--resume`` recognises a study it has already finished.

A fingerprint depends on the input's content, never on where it lies or what its folder is
called, so moving or renaming inputs does not redo them, and changed input is redone.

* DICOM: sha256 over the sorted (SOPInstanceUID, file size in bytes) pairs of the study's
  instances (all series). Cheap: both come from the header pass of discovery.
* NIfTI / zip: sha256 over the file size and the sha256 of its bytes.
* unreadable: sha256 over the sorted (relative path, size) pairs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.batch.discover import Study

CHUNK = 1 << 20


def fingerprint(study: Study) -> str:
    """A hex digest prefixed with the kind, e.g. ``dicom:9f2c...``."""
    h = hashlib.sha256()
    if study.kind in ("dicom", "unreadable"):
        for uid, size in study.sop_sizes:
            h.update(f"{uid}\t{size}\n".encode())
    else:
        path = Path(study.input_path)
        h.update(f"{path.stat().st_size}\n".encode())
        h.update(file_sha256(path).encode())
    return f"{study.kind}:{h.hexdigest()}"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def options_digest(settings: dict[str, Any]) -> str:
    """A short digest of the run options that change results (model, fast, intent, formats...).

    Config files given by path are hashed by content, so editing rules.yaml redoes studies.
    """
    norm: dict[str, Any] = {}
    for key, value in sorted(settings.items()):
        if isinstance(value, Path):
            value = file_sha256(value) if value.is_file() else str(value)
        elif isinstance(value, (tuple, list)):
            value = sorted(str(v) for v in value)
        norm[key] = value
    return hashlib.sha256(json.dumps(norm, sort_keys=True, default=str).encode()).hexdigest()[:16]
