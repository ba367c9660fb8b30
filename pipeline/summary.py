"""The short human summary `osteoplan run` prints: where the report is, and a lesion table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from pipeline import DISCLAIMER


def print_study_summary(result, console: Console | None = None) -> None:
    import sys

    console = console or Console(width=None if sys.stdout.isatty() else 150)  # no wrapping in logs/pipes
    rep = result.report
    console.print(f"[bold]Report:[/bold] {result.study_dir / 'report.json'}")
    if (result.study_dir / "report.html").exists():
        console.print(f"[bold]HTML:[/bold]   {result.study_dir / 'report.html'}")
    canal = rep.get("canal", {})
    console.print(f"Canal found: {canal.get('found')}  ({canal.get('volume_ml', 0):.1f} mL); "
                  f"lesions: {len(rep.get('lesions', []))}; device: {rep.get('device')}; "
                  f"total {rep.get('timings_s', {}).get('total', 0):.1f} s")
    if rep.get("lesions"):
        table = Table(show_lines=False)
        for col in ("id", "type", "location", "vol mL", "diam mm", "dist canal mm", "primary", "flags"):
            table.add_column(col)
        for les in rep["lesions"]:
            rec = les.get("recommendation", {})
            d = les.get("min_distance_to_canal_mm")
            border = " (borderline)" if rec.get("borderline", {}).get("value") else ""
            table.add_row(str(les["id"]), les.get("type", ""), les.get("location", ""), f"{les['volume_ml']:.2f}",
                          f"{les['max_diameter_mm']:.1f}", "n/a" if d is None else f"{d:.1f}",
                          rec.get("primary", "") + border, ", ".join(rec.get("flags", [])))
        console.print(table)
    for w in rep.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {w}")
    console.print(f"[dim]{DISCLAIMER}[/dim]")
