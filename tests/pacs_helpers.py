"""Shared helpers for the PACS tests: a real Orthanc process, a listener subprocess, dcmtk tools,
small CT series written with pydicom, and a stand-in analyser for queue/durability tests.

Run as a script, this file starts ``osteoplan listen`` (same CLI, same code) with the study
function replaced by :class:`FakeAnalyser`, so durability tests do not depend on the model:
``python tests/pacs_helpers.py [--fake-delay S] listen ...``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage, Comprehensive3DSRStorage, ExplicitVRLittleEndian, SegmentationStorage, generate_uid,
)

REPO = Path(__file__).resolve().parent.parent
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def dicom_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"  # dcmtk and Orthanc read it; else C-STORE crawls (Nagle + delayed ACK)
    return env


# ---- CT series --------------------------------------------------------------------------------
@dataclass
class CTStudy:
    folder: Path
    study_uid: str
    series_uid: str
    sop_uids: list[str] = field(default_factory=list)


def write_ct_series(outdir: Path, shape: tuple[int, int, int] = (64, 64, 24), spacing=(1.5, 1.5, 2.5),
                    study_uid: str | None = None, seed: int = 0, corrupt: int = 0) -> CTStudy:
    """A small CT series (one file per slice). ``corrupt`` slices get truncated pixel data.

    shape is (columns, rows, slices); HU values: air, soft tissue, a bone cylinder.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    rng = np.random.default_rng(seed)
    cols, rows, nz = shape
    yy, xx = np.mgrid[0:rows, 0:cols]
    body = ((xx - cols / 2) ** 2 + (yy - rows / 2) ** 2) < (0.45 * cols) ** 2
    bone = ((xx - cols / 2) ** 2 + (yy - rows * 0.65) ** 2) < (0.12 * cols) ** 2
    study = CTStudy(outdir, study_uid, series_uid)
    for k in range(nz):
        hu = np.where(body, 40, -1000) + np.where(bone, 700, 0) + rng.normal(0, 10, (rows, cols))
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        sop = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = study_uid + ".1" if len(study_uid) < 62 else generate_uid()
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "PHANTOM^PACS", "PACS0001", "", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "", "1"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-cols * spacing[0] / 2, -rows * spacing[1] / 2, k * spacing[2]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.KVP = 120
        pixels = (hu + 1024).astype(np.int16)
        ds.PixelData = pixels.tobytes()[: (100 if k < corrupt else None)]
        path = outdir / f"CT{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        study.sop_uids.append(sop)
    return study


# ---- stand-in analyser ------------------------------------------------------------------------
class FakeAnalyser:
    """Reads every CT instance fully (pixel data included) and writes a SEG-class and an SR-class
    instance referencing the study: enough for queue, durability and delivery tests.

    Raises InputError when an instance's pixel data cannot be decoded (like the real loader).
    ``delay_s`` makes a job last long enough to be killed in the middle of it. Each completed run
    appends a line to ``SPOOL/fake_runs.log``.
    """

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    def __call__(self, input_dir: Path, output_root: Path) -> Path:
        from pipeline.errors import InputError

        files = sorted(input_dir.glob("*.dcm"))
        first = None
        for f in files:
            ds = pydicom.dcmread(f)
            if ds.SOPClassUID != CTImageStorage:
                continue
            try:
                _ = ds.pixel_array
            except Exception as exc:  # noqa: BLE001
                raise InputError(f"pixel data of an instance cannot be decoded ({type(exc).__name__})") from None
            first = first or ds
        if first is None:
            raise InputError("no CT series")
        deadline = time.monotonic() + self.delay_s
        while time.monotonic() < deadline:
            time.sleep(0.05)
        out = output_root / str(first.StudyInstanceUID)
        tmp = output_root / f".tmp-{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        for name, cls, modality in (("seg.dcm", SegmentationStorage, "SEG"), ("sr.dcm", Comprehensive3DSRStorage, "SR")):
            _result_instance(first, cls, modality).save_as(tmp / name, enforce_file_format=True)
        os.replace(tmp, out)
        with open(input_dir.parent.parent.parent / "fake_runs.log", "a") as fh:
            fh.write(f"{input_dir.parent.name}\n")
        return out


def _result_instance(src: Dataset, sop_class: str, modality: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    sop = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
               "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName"):
        setattr(ds, kw, src.get(kw, ""))
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 900, 1
    ds.SeriesDescription = f"fake {modality}"
    return ds


# ---- processes --------------------------------------------------------------------------------
def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Stop one process we started (by its own pid), escalating to SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)


class Orthanc:
    """A real Orthanc on loopback ports with its own config and storage in ``workdir``."""

    def __init__(self, workdir: Path, modalities: dict[str, tuple[str, str, int]] | None = None,
                 aet: str = "ORTHANC") -> None:
        self.workdir = workdir
        self.aet = aet
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.modalities = modalities or {}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def address(self) -> str:
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    def start(self) -> "Orthanc":
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = {
            "Name": "osteoplan-test", "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"), "StorageCompression": False,
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.aet,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpServerEnabled": True,
            "DicomServerEnabled": True, "DicomCheckCalledAet": False, "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True, "UnknownSopClassAccepted": True,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "DicomScuTimeout": 10, "Plugins": [], "SaveJobs": False, "ConcurrentJobs": 2,
            "StableAge": 3600, "HttpTimeout": 30, "DicomAssociationCloseDelay": 0,
        }
        cfg_path = self.workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(cfg, indent=2))
        self.log = open(self.workdir / "orthanc.log", "w")
        self.proc = subprocess.Popen([ORTHANC, str(cfg_path)], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dicom_env(), cwd=self.workdir)
        try:
            wait_for(self._up, 30, what="Orthanc to start")
        except BaseException:
            self.stop()
            raise
        return self

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited ({self.proc.returncode}); see {self.workdir / 'orthanc.log'}")
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.proc, timeout=1.0)  # Orthanc may take seconds to close; its data is scratch
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()

    def kill(self) -> None:
        stop_process(self.proc, signal.SIGKILL)
        self.proc = None

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str, body) -> object:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read()
        return json.loads(raw) if raw.strip() else None

    def upload(self, files: list[Path]) -> list[str]:
        return [self.post("/instances", f.read_bytes())["ID"] for f in files]

    def find_study(self, study_uid: str) -> str | None:
        ids = self.post("/tools/lookup", study_uid.encode())
        for item in ids or []:
            if item.get("Type") == "Study":
                return item["ID"]
        return None

    def study_modalities(self, study_uid: str) -> dict[str, int]:
        """Number of instances per Modality in a study (from the series' main tags)."""
        sid = self.find_study(study_uid)
        if sid is None:
            return {}
        out: dict[str, int] = {}
        for series in self.get(f"/studies/{sid}/series"):
            m = series["MainDicomTags"].get("Modality", "?")
            out[m] = out.get(m, 0) + len(series["Instances"])
        return out


@contextlib.contextmanager
def orthanc(workdir: Path, modalities: dict[str, tuple[str, str, int]] | None = None) -> Iterator[Orthanc]:
    server = Orthanc(workdir, modalities).start()
    try:
        yield server
    finally:
        server.stop()


class ListenerProcess:
    """``osteoplan listen`` as a subprocess (real pipeline) or through this file (FakeAnalyser)."""

    def __init__(self, spool: Path, port: int, send_to: str | None, study_timeout: float = 1.0,
                 ae: str = "OSTEOPLAN", fake_delay: float | None = 0.0, extra: list[str] | None = None,
                 timeout: float = 60.0) -> None:
        """``fake_delay=None`` runs the real ``python -m pipeline listen``; a number runs it with
        FakeAnalyser taking that long per job. ``timeout``: seconds to wait for C-ECHO at start."""
        self.spool, self.port, self.ae, self.start_timeout = spool, port, ae, timeout
        args = ["listen", "--ae", ae, "--port", str(port), "--bind", "127.0.0.1", "--spool", str(spool),
                "--study-timeout", str(study_timeout), "--device", "cpu"]
        if send_to:
            args += ["--send-to", send_to]
        args += extra or []
        if fake_delay is None:
            self.cmd = [sys.executable, "-m", "pipeline", *args]
        else:
            self.cmd = [sys.executable, str(Path(__file__).resolve()), "--fake-delay", str(fake_delay), *args]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float | None = None) -> "ListenerProcess":
        timeout = self.start_timeout if timeout is None else timeout
        self.spool.mkdir(parents=True, exist_ok=True)
        self.stderr = open(self.spool.parent / f"listener-{self.port}.stderr", "a")
        env = dicom_env()
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=self.stderr, stderr=self.stderr, env=env)
        try:
            wait_for(self._up, timeout, interval=0.2, what="the listener to answer C-ECHO")
        except BaseException:
            self.kill()
            raise
        return self

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"listener exited with {self.proc.returncode}: {self.stderr_text()[-2000:]}")
        return echo(self.port, self.ae) == 0

    def stderr_text(self) -> str:
        p = self.spool.parent / f"listener-{self.port}.stderr"
        return p.read_text() if p.exists() else ""

    def kill(self) -> None:
        stop_process(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM, timeout=15)

    def __enter__(self) -> "ListenerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
        if getattr(self, "stderr", None):
            self.stderr.close()


def echo(port: int, called_ae: str = "OSTEOPLAN", calling_ae: str = "SCANNER") -> int:
    return subprocess.run([ECHOSCU, "-aet", calling_ae, "-aec", called_ae, "-to", "5", "127.0.0.1", str(port)],
                          capture_output=True, env=dicom_env(), timeout=20).returncode


def storescu(port: int, files: list[Path] | Path, called_ae: str = "OSTEOPLAN", calling_ae: str = "SCANNER",
             timeout: float = 120.0, **popen) -> subprocess.CompletedProcess:
    paths = [str(files)] if isinstance(files, Path) else [str(f) for f in files]
    cmd = [STORESCU, "-aet", calling_ae, "-aec", called_ae, "-to", "10", "+sd", "-nh", "127.0.0.1", str(port), *paths]
    return subprocess.run(cmd, capture_output=True, text=True, env=dicom_env(), timeout=timeout, **popen)


# ---- script entry: the listener with the stand-in analyser ------------------------------------
def _main(argv: list[str]) -> int:
    delay = 0.0
    if argv[:1] == ["--fake-delay"]:
        delay = float(argv[1])
        argv = argv[2:]
    import pipeline.pacs.listener as listener_mod

    listener_mod.StudyAnalyser = lambda run_cfg: FakeAnalyser(delay)  # type: ignore[assignment]
    from pipeline.cli import main

    return main(argv)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(_main(sys.argv[1:]))
