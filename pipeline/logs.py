"""Logging: a file log with details (tracebacks included), terse lines on screen.

Logs never carry patient identity: no names, IDs or dates. UIDs are logged only through
``anon()``, a short salted-free hash that is stable across runs (so a site can correlate
its own lines) but does not reveal the UID.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

_LOG_FILE: Path | None = None
logging.getLogger("osteoplan").addHandler(logging.NullHandler())  # nothing on screen before setup_logging
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def anon(uid: str | None) -> str:
    """A short stable pseudonym for a UID, safe to log."""
    if not uid:
        return "-"
    return "uid-" + hashlib.sha256(uid.encode()).hexdigest()[:12]


def current_log_file() -> Path | None:
    return _LOG_FILE


def setup_logging(outdir: Path | None, level: int = logging.INFO, console_level: int = logging.WARNING) -> None:
    """Send INFO and up to OUTDIR/osteoplan.log (or ./osteoplan.log), WARNING and up to stderr."""
    global _LOG_FILE
    root = logging.getLogger()
    root.setLevel(level)
    for h in list(root.handlers):
        if getattr(h, "_osteoplan", False):
            root.removeHandler(h)
            h.close()
    log_dir = Path(outdir) if outdir is not None else Path.cwd()
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        _LOG_FILE = log_dir / "osteoplan.log"
        fh = logging.FileHandler(_LOG_FILE)
    except OSError:
        _LOG_FILE = None
        fh = logging.NullHandler()
    fh.setFormatter(logging.Formatter(_FORMAT))
    fh.setLevel(level)
    fh._osteoplan = True  # type: ignore[attr-defined]
    root.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setLevel(console_level)
    sh.addFilter(lambda record: not getattr(record, "file_only", False))
    sh.setFormatter(logging.Formatter("osteoplan: %(levelname)s: %(message)s"))
    sh._osteoplan = True  # type: ignore[attr-defined]
    root.addHandler(sh)
    for noisy in ("highdicom", "pynetdicom", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # its warnings may quote header values
