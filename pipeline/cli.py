"""Command-line interface. Thin: parse, call one function, map errors to exit codes.

Exit codes (DESIGN.md): 0 done; 2 bad usage or unreadable/unsuitable input; 3 no CT series;
4 internal error (traceback in the log file, never on screen). ``batch`` returns 0/1.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer

from pipeline.errors import OsteoplanError
from pipeline.logs import setup_logging
from pipeline.study import ALL_FORMATS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="osteoplan: bone-metastasis planning from CT (decision support, not a medical device).",
)
log = logging.getLogger("osteoplan")

def parse_formats(value: str) -> tuple[str, ...]:
    if value.strip().lower() in ("all", ""):
        return ALL_FORMATS
    out = tuple(v.strip().lower() for v in value.split(",") if v.strip())
    bad = [v for v in out if v not in ALL_FORMATS]
    if bad:
        raise typer.BadParameter(f"unknown format(s) {bad}; choose from {', '.join(ALL_FORMATS)} or 'all'")
    if "json" not in out:
        out = ("json",) + out  # report.json is the contract; always written
    return out


@app.command()
def run(
    input: Path = typer.Argument(..., help="Folder of DICOM files (any depth), a NIfTI file, or a zip."),
    output: Path = typer.Option(..., "-o", "--output", help="Output root; results go to OUTDIR/<study>/"),
    device: str = typer.Option("auto", help="auto|cpu|cuda|cuda:N|mps"),
    fast: bool = typer.Option(False, "--fast", help="Coarser model spacing: faster, less precise."),
    intent: str = typer.Option("palliative", help="palliative|curative"),
    model: str = typer.Option("osteoplan-spine", help="Bundle name under models/ or a bundle folder."),
    config: Optional[Path] = typer.Option(None, help="inference.yaml overriding configs/inference.yaml"),
    rules: Optional[Path] = typer.Option(None, help="rules.yaml overriding configs/rules.yaml"),
    series: Optional[str] = typer.Option(None, "--series", help="Force this SeriesInstanceUID."),
    formats: str = typer.Option("all", "--format", help="Comma list of json,csv,nifti,seg,sr,html or 'all'."),
    deidentify: bool = typer.Option(False, "--deidentify", help="Write research outputs without identity."),
    quiet: bool = typer.Option(False, "--quiet", help="No lesion table."),
) -> None:
    """Analyse one study and write report.json, segmentation, DICOM SEG/SR and an HTML report."""
    from pipeline.study import StudyOptions, run_study
    from pipeline.summary import print_study_summary

    if intent not in ("palliative", "curative"):
        raise typer.BadParameter("--intent must be palliative or curative")
    setup_logging(output)
    options = StudyOptions(
        device=device, fast=fast, intent=intent, model=model, inference_config=config, rules_config=rules,
        series_uid=series, formats=parse_formats(formats), deidentify=deidentify,
    )
    result = run_study(input, output, options)
    if not quiet:
        print_study_summary(result)


@app.command()
def samples(
    output: Path = typer.Option(..., "-o", "--output", help="Folder to write phantom studies into."),
    n: int = typer.Option(3, "-n", help="How many phantom studies."),
    seed: int = typer.Option(0, help="Random seed (same seed, same phantoms)."),
    size: str = typer.Option("small", help="small (data_samples size) | full (512x512 slices)"),
) -> None:
    """Write synthetic spine CT phantoms as DICOM series, with their exact label maps and truth."""
    from pipeline.train.samples import write_samples

    setup_logging(None)  # keep the sample folders pure DICOM
    for path in write_samples(output, n=n, seed=seed, size=size):
        typer.echo(str(path))


@app.command()
def train(
    config: Path = typer.Option(Path("configs/train.yaml"), help="Training config (YAML)."),
    resume: bool = typer.Option(True, help="Resume from the newest checkpoint in the run folder."),
    max_steps: Optional[int] = typer.Option(None, help="Override the config's step count."),
    workdir: Optional[Path] = typer.Option(None, help="Override the config's run folder."),
    export: Optional[str] = typer.Option(None, help="Override the bundle name exported under models/."),
    export_only: bool = typer.Option(False, "--export-only", help="Export the run's newest checkpoint, no training."),
) -> None:
    """Train the segmentation network with MONAI and export a model bundle."""
    from pipeline.train.trainer import export_checkpoint, train_from_config

    setup_logging(workdir)
    if export_only:
        typer.echo(str(export_checkpoint(config, workdir=workdir, export_name=export)))
        return
    train_from_config(config, resume=resume, max_steps=max_steps, workdir=workdir, export_name=export)


@app.command()
def evaluate(
    data: Path = typer.Argument(..., help="Labelled set: phantom folder, or nnU-Net/MSD layout (imagesTr/labelsTr)."),
    model: str = typer.Option("osteoplan-spine", help="Bundle name or folder."),
    device: str = typer.Option("auto"),
    fast: bool = typer.Option(False, "--fast"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write metrics.json here."),
) -> None:
    """Dice and HD95 per class, lesion-wise detection, on a labelled set."""
    from pipeline.train.evaluate import evaluate_folder

    setup_logging(output)
    evaluate_folder(data, model=model, device=device, fast=fast, output=output)


def _register_optional_commands() -> None:
    """Commands whose code lives with their subsystem (batch/, pacs/)."""
    import importlib

    for module in ("pipeline.batch.cli", "pipeline.pacs.cli"):
        try:
            importlib.import_module(module).register(app)
        except ModuleNotFoundError as exc:  # subsystem not installed in this build
            if exc.name != module:
                raise


_register_optional_commands()


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit code. No traceback reaches the screen."""
    try:
        rc = app(args=argv, standalone_mode=False)
        return int(rc or 0)
    except SystemExit as exc:  # typer/click exits with an int code
        return int(exc.code or 0)
    except OsteoplanError as exc:
        log.error("%s: %s", type(exc).__name__, exc, extra={"file_only": True})
        print(f"osteoplan: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("osteoplan: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the contract: one line on screen, traceback in the log
        import click
        from typer._click import exceptions as tclick  # typer 0.29 vendors its own click

        if isinstance(exc, (click.exceptions.ClickException, tclick.ClickException)):
            print(f"osteoplan: error: {exc.format_message()}", file=sys.stderr)  # one line, per the contract
            return 2
        if isinstance(exc, click.exceptions.Abort) or type(exc).__name__ == "Abort":
            return 130
        log.error("internal error\n%s", traceback.format_exc(), extra={"file_only": True})
        print(f"osteoplan: internal error ({type(exc).__name__}); details in {_log_path()}", file=sys.stderr)
        return 4


def _log_path() -> str:
    from pipeline.logs import current_log_file

    return str(current_log_file() or "the log")
