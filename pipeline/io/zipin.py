"""Safe extraction of a zip input into a temporary folder.

Rules (README "Input" copies them):

- Not a valid zip, or an encrypted member -> InputError.
- Zip-slip: a member whose name is absolute, has a drive letter, or contains a ``..`` component,
  or that would land outside the target folder once resolved, makes the whole archive refused
  (an archive built like that is not a scanner export). Symbolic-link members are skipped.
- Zip bombs: more than ``MAX_MEMBERS`` members, a declared total above ``max_bytes``, or a member
  that expands more than ``MAX_RATIO`` times (above 1 MiB) -> refused. The bytes actually written
  are counted while streaming, so a member that lies about its size is caught too.
- Nested archives are not opened (they are skipped later as non-DICOM files).
"""

from __future__ import annotations

import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from pipeline.errors import InputError

MAX_MEMBERS = 200_000
MAX_RATIO = 200
RATIO_MIN_BYTES = 1 << 20
CHUNK = 1 << 20


def is_zip(path: Path) -> bool:
    """True when the file starts like a zip archive (local file header or empty archive)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) in (b"PK\x03\x04", b"PK\x05\x06")
    except OSError:
        return False


def _safe_parts(name: str) -> tuple[str, ...] | None:
    """Path parts of a member name, or None when the name is unsafe (absolute, drive, '..')."""
    name = name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if any(p == ".." for p in parts):
        return None
    return parts


def extract_zip(path: Path, dest: Path, max_bytes: int) -> int:
    """Extract ``path`` into the existing folder ``dest``; returns the number of files written."""
    dest = Path(dest).resolve()
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as exc:
        # NotImplementedError: an unsupported zip version or compression in the central directory
        raise InputError(f"the zip input cannot be read ({type(exc).__name__})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise InputError(f"the zip input holds {len(infos):,} members, more than the limit of {MAX_MEMBERS:,}")
        declared = sum(i.file_size for i in infos)
        if declared > max_bytes:
            raise InputError(f"the zip input would expand to {declared / 2**30:.1f} GiB, "
                             f"more than the limit of {max_bytes / 2**30:.1f} GiB")
        plan: list[tuple[zipfile.ZipInfo, Path]] = []
        for info in infos:
            parts = _safe_parts(info.filename)
            if parts is None:
                raise InputError("the zip input holds members with unsafe paths (absolute or '..'); refusing it")
            mode = (info.external_attr >> 16) & 0o170000
            if info.is_dir() or not parts or mode == stat.S_IFLNK:
                continue
            if info.flag_bits & 0x1:
                raise InputError("the zip input is encrypted")
            if info.file_size > RATIO_MIN_BYTES and info.file_size > MAX_RATIO * max(info.compress_size, 1):
                raise InputError("the zip input looks like a zip bomb (a member expands more than "
                                 f"{MAX_RATIO} times); refusing it")
            target = dest.joinpath(*parts)
            if not target.resolve().is_relative_to(dest):
                raise InputError("the zip input holds members with unsafe paths; refusing it")
            plan.append((info, target))
        written = 0
        for info, target in plan:
            target.parent.mkdir(parents=True, exist_ok=True)
            member_bytes = 0
            try:
                with zf.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(CHUNK):
                        member_bytes += len(chunk)
                        written += len(chunk)
                        if member_bytes > info.file_size or written > max_bytes:
                            raise InputError("the zip input expands beyond its declared size; refusing it")
                        out.write(chunk)
            except InputError:
                raise
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError, NotImplementedError) as exc:
                raise InputError(f"a member of the zip input cannot be extracted ({type(exc).__name__})") from None
        return len(plan)

