"""Label names, display colours and SNOMED CT codes for the label map (DICOM SEG segments).

Structure (the model bundle's ``metadata.json`` ``labels`` block uses exactly this shape, and
``Segmentation.label_meta`` carries it; the training export copies ``DEFAULT_LABELS``)::

    {
      1: {"name": "spinal_canal",
          "color": [r, g, b],                      # 0-255 sRGB, display colour
          "category": {"code": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"},
          "type":     {"code": "61853006", "scheme": "SCT", "meaning": "Spinal canal"}},
      2: {...}, 3: {...}
    }

Keys may be ints or their string form (JSON object keys are strings). Any label missing from
the bundle's block, or any field missing from a label, falls back to the defaults below.

Codes (SNOMED CT, as used by DICOM CID 7150 / 7151 segmentation property categories/types):
- 1 spinal canal: category 91723000 "Anatomical Structure", type 61853006 "Spinal canal"
  (SCT "Spinal canal structure (body structure)", DICOM meaning "Vertebral canal").
- 2 metastasis: category 49755003 "Morphologically Altered Structure", type 14799000
  "Neoplasm, metastatic" (a morphologic abnormality, as CID 7159/7194 expect).
- 3 vertebra/bone: category 91723000 "Anatomical Structure", type 272673000 "Bone"
  (SCT "Bone structure (body structure)": the label covers vertebrae and other bone).
"""

from __future__ import annotations

import copy
from typing import Any

from pipeline.types import BONE, CANAL, LESION

DEFAULT_LABELS: dict[int, dict[str, Any]] = {
    CANAL: {
        "name": "spinal_canal",
        "color": [255, 215, 0],
        "category": {"code": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"},
        "type": {"code": "61853006", "scheme": "SCT", "meaning": "Spinal canal"},
    },
    LESION: {
        "name": "metastasis",
        "color": [230, 25, 75],
        "category": {"code": "49755003", "scheme": "SCT", "meaning": "Morphologically Altered Structure"},
        "type": {"code": "14799000", "scheme": "SCT", "meaning": "Neoplasm, metastatic"},
    },
    BONE: {
        "name": "vertebra_bone",
        "color": [70, 140, 240],
        "category": {"code": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"},
        "type": {"code": "272673000", "scheme": "SCT", "meaning": "Bone"},
    },
}


def label_meta(override: dict[Any, dict[str, Any]] | None = None) -> dict[int, dict[str, Any]]:
    """Defaults merged with a bundle's label block (keys int or str); returns a fresh dict."""
    out = copy.deepcopy(DEFAULT_LABELS)
    for key, meta in (override or {}).items():
        try:
            label = int(key)
        except (TypeError, ValueError):
            continue
        if label <= 0 or not isinstance(meta, dict):
            continue
        base = out.setdefault(label, {"name": f"label_{label}", "color": [200, 200, 200],
                                      "category": dict(DEFAULT_LABELS[LESION]["category"]),
                                      "type": dict(DEFAULT_LABELS[LESION]["type"])})
        for field in ("name", "color"):
            if meta.get(field) is not None:
                base[field] = copy.deepcopy(meta[field])
        for field in ("category", "type"):
            code = meta.get(field)
            if isinstance(code, dict) and all(code.get(k) for k in ("code", "scheme", "meaning")):
                base[field] = {k: str(code[k]) for k in ("code", "scheme", "meaning")}
    return out


def rgb(meta: dict[str, Any]) -> tuple[int, int, int]:
    """The label's display colour as an (r, g, b) tuple of 0-255 ints."""
    c = list(meta.get("color") or [200, 200, 200])[:3]
    return tuple(int(max(0, min(255, round(float(v))))) for v in c)  # type: ignore[return-value]
