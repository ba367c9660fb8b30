"""report.html: one self-contained, offline page for people (no external CSS, JS or fonts).

Shows the disclaimer first, then study/series/model, the lesion table, and per lesion the key
image (``key_lesion<N>.png`` beside the page, referenced by relative path), recommendation,
options, flags, rationale (rule id + source) and borderline notes; then warnings and timings.
Every value comes from report.json (so a de-identified report gives a de-identified page);
every string is HTML-escaped.
"""

from __future__ import annotations

import html
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.report import codes
from pipeline.report.background import usable_cpus as _usable_cpus
from pipeline.report.keyimages import LINE_RGB, key_image
from pipeline.types import BONE, CANAL, LESION, Segmentation, Volume

# zlib level of the key-image PNGs: 3 encodes a 726x360 panel pair in ~16 ms instead of ~38 ms
# (default 6) for files ~12 % larger (~108 KB instead of ~96 KB); the pixels are the same.
PNG_COMPRESS_LEVEL = 3
# Key images of different lesions are made in parallel threads: sampling (scipy), outlines and
# PNG encoding release the GIL. 7 lesions, 512x512x300, shared 2 cores: 0.57-0.75 -> 0.36-0.63 s.
MAX_KEY_IMAGE_THREADS = 4

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;margin:24px;color:#1d2430;
background:#fff;max-width:1100px}
h1{font-size:22px;margin:0 0 8px}h2{font-size:18px;margin:26px 0 8px;border-bottom:1px solid #d0d5dd}
h3{font-size:16px;margin:18px 0 6px}
.disclaimer{border:3px solid #c62828;background:#fdecea;color:#8e1b1b;padding:12px 16px;font-weight:600;
font-size:15px;border-radius:6px}
table{border-collapse:collapse;font-size:14px;margin:6px 0}
th,td{border:1px solid #d0d5dd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
.kv th{width:210px}
.primary{font-weight:700;color:#0b4f9c}
.flag{display:inline-block;background:#fff3cd;border:1px solid #e0b100;border-radius:4px;padding:1px 6px;
margin:1px 3px 1px 0;font-size:13px}
.borderline{background:#fff8e1;border-left:4px solid #f0a500;padding:6px 10px;margin:6px 0}
.lesion{border:1px solid #d0d5dd;border-radius:6px;padding:10px 14px;margin:14px 0}
.keyimg{max-width:100%;height:auto;image-rendering:auto;border:1px solid #333}
.warn li{color:#8a5300}.muted{color:#5b6472;font-size:13px}
"""


def write_html(outdir: Path, volume: Volume, seg: Segmentation, report: dict[str, Any]) -> Path:
    """Write key_lesion<N>.png for every lesion and report.html; returns the page's path."""
    outdir = Path(outdir)
    hu = np.asarray(volume.array)
    lesions = report.get("lesions", [])

    def write_key_image(les: dict[str, Any]) -> str:
        name = f"key_lesion{int(les['id'])}.png"
        key_image(hu, seg.labels, seg.geometry, les, seg.label_meta).save(
            outdir / name, optimize=False, compress_level=PNG_COMPRESS_LEVEL)
        return name

    threads = min(len(lesions), MAX_KEY_IMAGE_THREADS, _usable_cpus())
    if threads > 1:
        with ThreadPoolExecutor(threads, thread_name_prefix="osteoplan-keyimage") as pool:
            names = list(pool.map(write_key_image, lesions))
    else:
        names = [write_key_image(les) for les in lesions]
    images = {int(les["id"]): name for les, name in zip(lesions, names)}
    page = outdir / "report.html"
    tmp = outdir / f".report.html.{uuid.uuid4().hex}.tmp"
    tmp.write_text(render_html(report, images, seg.label_meta), encoding="utf-8")
    os.replace(tmp, page)
    return page


def _e(value: Any) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return html.escape(str(value))


def _num(value: Any, unit: str = "") -> str:
    if value is None:
        return "&ndash;"
    return f"{_e(value)}{(' ' + unit) if unit else ''}"


def _refine_text(refine: dict[str, Any] | None) -> str:
    """What the lytic refinement did, in words ("" when the report has no such entry)."""
    if not refine:
        return ""
    if not refine.get("enabled"):
        return "as segmented (lytic refinement off)"
    grown = int(refine.get("lesions_grown", 0))
    if not grown:
        return "as segmented (no lytic lesion grew)"
    return (f"{grown} lytic lesion(s) grown into adjacent bone as dark as they are, "
            f"{int(refine.get('voxels_added', 0))} voxel(s) added (MODEL_CARD.md, 'Lytic lesion refinement')")


def render_html(report: dict[str, Any], images: dict[int, str],
                label_meta: dict[int, dict[str, Any]] | None = None) -> str:
    """The page's HTML for a report.json dict; ``images`` maps lesion id -> PNG file name."""
    legend = _legend(codes.label_meta(label_meta))
    s = report.get("series") or {}
    m = report.get("model") or {}
    canal = report.get("canal") or {}
    lesions = report.get("lesions") or []
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>osteoplan report</title><style>{CSS}</style></head><body>",
        "<h1>osteoplan: bone metastases and distance to the spinal canal</h1>",
        f"<p class='disclaimer' id='disclaimer'>{_e(report.get('disclaimer'))}</p>",
        "<h2>Study</h2><table class='kv'>",
        _row("Study", s.get("study_instance_uid") or (report.get("input") or {}).get("path")),
        _row("De-identified", bool(report.get("deidentified"))),
        _row("Input", f"{(report.get('input') or {}).get('path', '')} ({(report.get('input') or {}).get('kind', '')})"),
        _row("Series", s.get("series_instance_uid")),
        _row("Series description", s.get("series_description")),
        _row("Grid (voxels)", " x ".join(str(v) for v in s.get("size", []))),
        _row("Spacing (mm)", " x ".join(str(v) for v in s.get("spacing_mm", []))),
        _row("Series selection", _selection_text(s.get("selection"))),
        _row("Model", f"{m.get('name', '')} {m.get('version', '')} (sha256 {str(m.get('sha256', ''))[:12]}...)"),
        _row("Device / mode", f"{report.get('device', '')}{' / fast' if report.get('fast') else ''}"),
        _row("Lesion edges", _refine_text((report.get("postprocess") or {}).get("lesion_refine"))),
        _row("Intent", report.get("intent")),
        _row("Spinal canal", (f"found, {canal.get('volume_ml')} ml" if canal.get("found") else "NOT found")),
        "</table>",
        f"<h2>Lesions ({len(lesions)})</h2>",
    ]
    if lesions:
        parts.append(_lesion_table(lesions))
        for les in lesions:
            parts.append(_lesion_section(les, images.get(int(les["id"])), legend))
    else:
        parts.append("<p>No metastasis was segmented.</p>")
    warnings = report.get("warnings") or []
    parts.append("<h2>Warnings</h2>")
    parts.append("<ul class='warn'>" + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul>" if warnings
                 else "<p class='muted'>none</p>")
    timings = report.get("timings_s") or {}
    if timings:
        parts.append("<h2>Timings</h2><table>" + "".join(
            f"<tr><th>{_e(k)}</th><td class='num'>{_e(v)} s</td></tr>" for k, v in timings.items()) + "</table>")
    parts.append(f"<p class='muted'>report schema {_e(report.get('schema_version'))}. "
                 f"{_e(report.get('disclaimer'))}</p></body></html>")
    return "\n".join(parts)


def _row(key: str, value: Any) -> str:
    return f"<tr><th>{_e(key)}</th><td>{_e(value)}</td></tr>"


def _selection_text(sel: Any) -> str:
    """Which series was analysed and why, and each series passed over with its reason."""
    if not sel:
        return ""
    if not isinstance(sel, dict):
        return str(sel)
    parts = []
    chosen = sel.get("chosen")
    if isinstance(chosen, dict):
        what = f"series {chosen.get('series_number', '?')}"
        if chosen.get("series_description"):
            what += f" ({chosen['series_description']})"
        detail = ", ".join(x for x in (
            f"{chosen['n_slices']} slices" if chosen.get("n_slices") else "",
            f"{chosen['slice_spacing_mm']} mm apart" if chosen.get("slice_spacing_mm") else "",
            str(chosen.get("orientation") or ""),
            f"resampled: {chosen['resampled']}" if chosen.get("resampled") else "") if x)
        parts.append(f"chosen {what}{f' [{detail}]' if detail else ''}: {chosen.get('reason', '')}")
    passed = sel.get("passed_over") or []
    for other in passed if isinstance(passed, list) else []:
        if isinstance(other, dict):
            n = other.get("n_files")
            files = f" ({n} file{'' if n == 1 else 's'})" if n else ""
            parts.append(f"passed over a {other.get('modality', '')} series{files}: {other.get('reason', '')}")
    rest = [f"{k}: {v}" for k, v in sel.items() if k not in ("chosen", "passed_over")
            and not isinstance(v, (list, dict))]
    return "; ".join(parts + rest)


def _lesion_table(lesions: list[dict[str, Any]]) -> str:
    head = ("<table><tr><th>#</th><th>volume</th><th>max diameter</th><th>mean HU</th><th>type</th>"
            "<th>location</th><th>distance to canal</th><th>canal contact</th><th>recommendation</th>"
            "<th>flags</th></tr>")
    rows = []
    for les in lesions:
        rec = les.get("recommendation") or {}
        dist = les.get("min_distance_to_canal_mm")
        dist_s = (f"{_e(dist)} &plusmn; {_e(les.get('distance_uncertainty_mm'))} mm" if dist is not None
                  else "&ndash;")
        rows.append(
            f"<tr><td>{_e(les['id'])}</td><td class='num'>{_num(les.get('volume_ml'), 'ml')}</td>"
            f"<td class='num'>{_num(les.get('max_diameter_mm'), 'mm')}</td>"
            f"<td class='num'>{_num(les.get('mean_hu'))}</td><td>{_e(les.get('type'))}</td>"
            f"<td>{_e(les.get('location'))}</td><td class='num'>{dist_s}</td>"
            f"<td>{_e(les.get('canal_contact'))}</td><td class='primary'>{_e(rec.get('primary'))}</td>"
            f"<td>{' '.join(_e(f) for f in rec.get('flags', []))}</td></tr>")
    return head + "".join(rows) + "</table>"


def _legend(meta: dict[int, dict[str, Any]]) -> str:
    items = []
    for label in (CANAL, LESION, BONE):
        r, g, b = codes.rgb(meta[label])
        items.append(f"<span style='display:inline-block;width:10px;height:10px;background:rgb({r},{g},{b});"
                     f"border:1px solid #333'></span> {_e(meta[label]['name'])}")
    r, g, b = LINE_RGB
    items.append(f"<span style='display:inline-block;width:14px;height:3px;background:rgb({r},{g},{b});"
                 "vertical-align:middle'></span> shortest 3-D distance to the canal (projected on the plane)")
    return " &nbsp; ".join(items)


def _lesion_section(les: dict[str, Any], image: str | None, legend: str) -> str:
    rec = les.get("recommendation") or {}
    out = [f"<div class='lesion' id='lesion{int(les['id'])}'><h3>Lesion {_e(les['id'])}: "
           f"{_e(les.get('type'))}, {_e(les.get('location'))}</h3>"]
    if image:
        out.append(f"<img class='keyimg' src='{html.escape(image)}' alt='lesion {_e(les['id'])}: axial and "
                   f"sagittal planes through the closest point to the canal'>")
        out.append("<p class='muted'>Left: axial (patient right on image left, anterior up). Right: sagittal "
                   f"(anterior left, head up). Bone window. Outlines: {legend}</p>")
    out.append(f"<p>Recommendation: <span class='primary'>{_e(rec.get('primary'))}</span>")
    if rec.get("options"):
        out.append(f" &middot; options: {', '.join(_e(o) for o in rec['options'])}")
    out.append("</p>")
    if rec.get("flags"):
        out.append("<p>Flags: " + "".join(f"<span class='flag'>{_e(f)}</span>" for f in rec["flags"]) + "</p>")
    centroid = les.get("centroid_lps_mm")
    out.append(f"<p class='muted'>Centroid (LPS mm): {_e(centroid)}; closest lesion point: "
               f"{_e(les.get('closest_point_lesion_lps_mm'))}; closest canal point: "
               f"{_e(les.get('closest_point_canal_lps_mm'))}</p>")
    rationale = rec.get("rationale") or []
    if rationale:
        out.append("<table><tr><th>rule</th><th>why</th><th>source</th></tr>" + "".join(
            f"<tr><td><b>{_e(r.get('rule'))}</b></td><td>{_e(r.get('text'))}</td><td>{_e(r.get('source'))}</td></tr>"
            for r in rationale) + "</table>")
    out.append(_borderline(rec.get("borderline")))
    out.append("</div>")
    return "".join(out)


def _borderline(b: Any) -> str:
    """Borderline note: which threshold the measurement straddles and what each side gives."""
    if isinstance(b, dict):
        if not b.get("value"):
            return ""
        rules = ", ".join(str(r) for r in b.get("rules") or [])
        out = [f"<div class='borderline'><b>Borderline</b>: a measured value lies within its uncertainty of a "
               f"threshold ({_e(rules)}); the recommendation could go either way."]
        alts = [a for a in b.get("alternatives") or [] if isinstance(a, dict)]
        if alts:
            out.append("<table><tr><th>rule</th><th>quantity</th><th>threshold</th><th>if below</th>"
                       "<th>if above</th></tr>")
            for a in alts:
                out.append(f"<tr><td>{_e(a.get('rule'))}</td><td>{_e(a.get('quantity'))}</td>"
                           f"<td class='num'>{_e(a.get('threshold'))}</td>"
                           f"<td>{_side(a, 'below')}</td><td>{_side(a, 'above')}</td></tr>")
            out.append("</table>")
        out.append("</div>")
        return "".join(out)
    if b:
        return ("<div class='borderline'><b>Borderline</b>: a measured value lies within its uncertainty "
                "of a threshold.</div>")
    return ""


def _side(a: dict[str, Any], side: str) -> str:
    text = f"<b>{_e(a.get(f'if_{side}'))}</b>"
    options = a.get(f"options_if_{side}") or []
    flags = a.get(f"flags_if_{side}") or []
    if options:
        text += f"; options: {_e(', '.join(map(str, options)))}"
    if flags:
        text += f"; flags: {_e(', '.join(map(str, flags)))}"
    return text
