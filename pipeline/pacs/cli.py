"""The ``listen`` command (registered on the main typer app by pipeline/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def listen(
        ae: Optional[str] = typer.Option(None, "--ae", help="Our AE title (default: config, OSTEOPLAN)."),
        port: Optional[int] = typer.Option(None, "--port", help="TCP port to listen on."),
        bind: Optional[str] = typer.Option(None, "--bind", help="Address to bind (default 0.0.0.0)."),
        spool: Optional[Path] = typer.Option(None, "--spool", help="Spool folder: instances, job queue, results."),
        send_to: Optional[str] = typer.Option(None, "--send-to", help="AE@HOST:PORT that receives SEG + SR."),
        study_timeout: Optional[float] = typer.Option(
            None, "--study-timeout", help="Seconds without a new instance after which a study is complete."),
        release_timeout: Optional[float] = typer.Option(
            None, "--release-timeout",
            help="Seconds without a new instance after which a study is complete once every association "
                 "that sent it has closed (default: off)."),
        allow_ae: Optional[str] = typer.Option(None, "--allow-ae", help="Comma list of calling AE titles allowed."),
        config: Optional[Path] = typer.Option(None, "--config", help="pacs.yaml (default configs/pacs.yaml)."),
        device: Optional[str] = typer.Option(None, help="auto|cpu|cuda|cuda:N|mps"),
        fast: Optional[bool] = typer.Option(None, "--fast/--no-fast", help="Coarser model spacing."),
        intent: Optional[str] = typer.Option(None, help="palliative|curative"),
        model: Optional[str] = typer.Option(None, help="Bundle name under models/ or a bundle folder."),
    ) -> None:
        """DICOM listener: C-STORE SCP -> durable job queue -> analysis -> SEG + SR sent to the PACS."""
        import logging

        from pipeline.logs import setup_logging
        from pipeline.pacs.config import load_pacs_config

        logging.getLogger("osteoplan").addHandler(logging.NullHandler())  # no stray lines before setup
        from pipeline.pacs.listener import Listener

        overrides = {
            "ae_title": ae, "port": port, "bind_address": bind,
            "spool": str(spool) if spool is not None else None, "send_to": send_to,
            "study_timeout_s": study_timeout, "release_timeout_s": release_timeout,
            "allow_ae": [a.strip() for a in allow_ae.split(",") if a.strip()] if allow_ae is not None else None,
            "run.device": device, "run.fast": fast, "run.intent": intent, "run.model": model,
        }
        cfg = load_pacs_config(config, overrides)
        setup_logging(cfg.spool)
        listener = Listener(cfg)
        typer.echo(f"osteoplan: listening as {cfg.ae_title} on {cfg.bind_address}:{cfg.port}; "
                   f"spool {cfg.spool}; results to {cfg.send_to or '(kept in the spool only)'}", err=True)
        listener.serve_forever()
