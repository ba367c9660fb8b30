"""``osteoplan batch``: registered on the app in pipeline/cli.py."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command(name="batch")(batch)


def batch(
    input_root: Path = typer.Argument(..., help="Folder holding the studies (DICOM any layout, NIfTI, zip)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output root: OUT/<study>/, manifest.jsonl, summary.csv"),
    workers: int = typer.Option(1, "--workers", help="Worker processes on this machine, each loading the model once."),
    shard: Optional[str] = typer.Option(None, "--shard", help="K/N: do only shard K (1..N) of N; no coordination."),
    resume: bool = typer.Option(False, "--resume", help="Skip studies already done (by input fingerprint)."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run on Ray: a cluster ADDRESS, 'auto', or 'local'."),
    quiet: bool = typer.Option(False, "--quiet", help="Plain log lines instead of a progress bar."),
    device: str = typer.Option("auto", help="auto|cpu|cuda|cuda:N|mps"),
    fast: bool = typer.Option(False, "--fast", help="Coarser model spacing: faster, less precise."),
    intent: str = typer.Option("palliative", help="palliative|curative"),
    model: Optional[str] = typer.Option(None, help="Bundle name under models/ or a bundle folder (default: config's)."),
    config: Optional[Path] = typer.Option(None, help="inference.yaml overriding configs/inference.yaml"),
    rules: Optional[Path] = typer.Option(None, help="rules.yaml overriding configs/rules.yaml"),
    formats: str = typer.Option("all", "--format", help="Comma list of json,csv,nifti,seg,sr,html or 'all'."),
    deidentify: bool = typer.Option(False, "--deidentify", help="Write research outputs without identity."),
    prefetch: int = typer.Option(2, "--prefetch", min=1, max=16, help="Studies loaded ahead per worker."),
) -> None:
    """Analyse every study under INPUT_ROOT; exit 0 when all finished, 1 when some failed."""
    from pipeline.batch.run import BatchOptions, run_batch
    from pipeline.batch.shard import parse_shard
    from pipeline.cli import parse_formats
    from pipeline.logs import setup_logging
    from pipeline.study import StudyOptions

    if intent not in ("palliative", "curative"):
        raise typer.BadParameter("--intent must be palliative or curative")
    setup_logging(output)
    options = StudyOptions(device=device, fast=fast, intent=intent, model=model, inference_config=config,
                           rules_config=rules, formats=parse_formats(formats), deidentify=deidentify)
    opts = BatchOptions(workers=workers, shard=parse_shard(shard), resume=resume, ray=ray, quiet=quiet,
                        prefetch=prefetch)
    result = run_batch(input_root, output, options, opts)
    # SystemExit (not typer.Exit): pipeline.cli.main() returns SystemExit's code, while a
    # typer.Exit raised under standalone_mode=False comes back as app()'s return value.
    raise SystemExit(result.exit_code)
