"""Issue 8 item 4: no patient identity in logs, stderr or error messages; none in --deidentify outputs.

The study carries a patient name, ID, birth date, study date, accession number, institution and
referring physician. Identity = any of those strings or any raw DICOM UID of the input (study,
series, frame of reference, SOP instances, the localizer's too). Binary outputs are searched where
text can hide: NIfTI header fields and extensions, PNG text chunks, gzip-decompressed bytes.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import sys
from pathlib import Path

import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import foreign_phantom as fp  # noqa: E402

NAME = "DOE^JANE^QUINCY"
PID = "PID-93721"
BIRTH = "19510314"
STUDY_DATE = "20240229"
ACCESSION = "ACC77123X"
INSTITUTION = "ST ELSEWHERE HOSPITAL"
REFERRER = "HOUSE^GREGORY"
TEXT_SECRETS = [NAME, "DOE^JANE", "QUINCY", PID, BIRTH, "1951-03-14", "14/03/1951", STUDY_DATE, "2024-02-29",
                "29/02/2024", ACCESSION, "ELSEWHERE", REFERRER, "GREGORY"]


def run_main(args: list[str]) -> tuple[int, str, str]:
    from pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def identified(tmp_path_factory) -> tuple[Path, list[str]]:
    """A study with full identity in every file; returns (folder, secrets incl. every raw UID)."""
    root = tmp_path_factory.mktemp("privacy")
    ph = fp.make_foreign(31415, shape=(112, 112, 44), spacing=(1.2, 1.2, 2.0), position="HFS",
                         lesions=[("lytic", "mid")])
    fp.write_study(ph, root / "study", patient_name=NAME, patient_id=PID, study_date=STUDY_DATE, seed=3)
    uids: set[str] = set()
    for path in (root / "study").rglob("*"):
        if not path.is_file():
            continue
        ds = pydicom.dcmread(path)
        ds.PatientBirthDate = BIRTH
        ds.AccessionNumber = ACCESSION
        ds.InstitutionName = INSTITUTION
        ds.ReferringPhysicianName = REFERRER
        ds.save_as(path)
        uids |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                 str(ds.FrameOfReferenceUID)}
    return root / "study", TEXT_SECRETS + sorted(uids)


def leaks(text: str, secrets: list[str]) -> list[str]:
    up = text.upper()
    return [s for s in secrets if s.upper() in up]


def file_text(path: Path) -> str:
    """Text where identity could hide in an output file (decompressed, header fields included)."""
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    if path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as img:
            meta = " ".join(f"{k}={v}" for k, v in {**img.info, **getattr(img, "text", {})}.items())
        return meta + data.decode("latin-1")
    if path.name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        img = nib.load(str(path))
        h = img.header
        fields = [bytes(h[k]).decode("latin-1", "replace") for k in ("descrip", "aux_file", "intent_name", "db_name")]
        exts = [e.get_content().decode("latin-1", "replace") if isinstance(e.get_content(), bytes)
                else str(e.get_content()) for e in h.extensions]
        return " ".join(fields + exts) + data[:352 + 65536].decode("latin-1")
    return data.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def plain_run(identified, tmp_path_factory, shipped_model):
    out = tmp_path_factory.mktemp("privacy-out")
    rc, stdout, stderr = run_main(["run", str(identified[0]), "-o", str(out), "--device", "cpu"])
    return rc, stdout, stderr, out


@pytest.fixture(scope="module")
def deid_run(identified, tmp_path_factory, shipped_model):
    out = tmp_path_factory.mktemp("privacy-deid")
    rc, stdout, stderr = run_main(["run", str(identified[0]), "-o", str(out), "--device", "cpu", "--deidentify"])
    return rc, stdout, stderr, out


@pytest.mark.slow
def test_log_and_stderr_carry_no_identity(plain_run, identified):
    rc, stdout, stderr, out = plain_run
    assert rc == 0, stderr
    secrets = identified[1]
    log = (out / "osteoplan.log").read_text()
    assert "chose series" in log  # the log is written, with pseudonymised UIDs
    assert not leaks(log, secrets), leaks(log, secrets)
    assert not leaks(stderr, secrets), stderr
    # stdout shows the output folder, which the output contract names by StudyInstanceUID
    assert not leaks(stdout, TEXT_SECRETS), stdout
    # the search does find identity where it is allowed: the identified report names its UIDs
    (study_dir,) = [p for p in out.iterdir() if p.is_dir()]
    assert leaks(file_text(study_dir / "report.json"), [s for s in secrets if s.count(".") > 5])


def test_error_messages_carry_no_identity(identified, tmp_path, shipped_model):
    secrets = identified[1]
    scout_only = tmp_path / "scout_only"
    scout_only.mkdir()
    for f in (identified[0] / "scout").iterdir():
        (scout_only / f.name).write_bytes(f.read_bytes())
    cases = [
        (["run", str(scout_only), "-o", str(tmp_path / "o1")], 3),
        (["run", str(identified[0]), "-o", str(tmp_path / "o2"), "--series", "1.2.3.4.5.6.7.8.9"], 2),
        # a real UID of the input that is not a series (an instance's): "no such series", exit 2
        (["run", str(identified[0]), "-o", str(tmp_path / "o3"), "--series", str(pydicom.dcmread(
            next(p for p in sorted(identified[0].rglob("*")) if p.is_file()), stop_before_pixels=True).SOPInstanceUID)], 2),
    ]
    for args, code in cases:
        rc, stdout, stderr = run_main(args)
        assert rc == code, (args, stderr)
        assert "Traceback" not in stderr
        # a UID the user typed may be echoed; none of the input's other identity may be
        typed = args[-1] if "--series" in args else ""
        found = [s for s in leaks(stderr + stdout, secrets) if s != typed]
        assert not found, stderr
        log = Path(args[3]) / "osteoplan.log"
        if log.exists():
            found = [s for s in leaks(log.read_text(), secrets) if s != typed]
            assert not found, found


@pytest.mark.slow
def test_deidentified_outputs_carry_no_identity(deid_run, identified):
    from pipeline.logs import anon

    rc, stdout, stderr, out = deid_run
    assert rc == 0, stderr
    secrets = identified[1]
    (study_dir,) = [p for p in out.iterdir() if p.is_dir()]
    names = {p.name for p in study_dir.iterdir()}
    assert {"report.json", "lesions.csv", "segmentation.nii.gz", "report.html"} <= names
    assert "seg.dcm" not in names and "sr.dcm" not in names  # DICOM objects carry identity by design
    for path in sorted(study_dir.iterdir()):
        found = leaks(file_text(path), secrets)
        assert not found, f"{path.name} leaks {found}"
    rep = json.loads((study_dir / "report.json").read_text())
    assert rep["deidentified"] is True
    raw_uids = [s for s in secrets if s.count(".") > 5]
    assert rep["series"]["study_instance_uid"] in {anon(u) for u in raw_uids}
    log = (out / "osteoplan.log").read_text()
    assert not leaks(log, secrets)
    assert not leaks(stderr, secrets)


@pytest.mark.slow
def test_deidentified_output_folder_is_not_the_raw_uid(deid_run, identified):
    """A research export named by the StudyInstanceUID would leak it through the folder name."""
    rc, _, stderr, out = deid_run
    assert rc == 0, stderr
    raw_uids = [s for s in identified[1] if s.count(".") > 5]
    folders = [p.name for p in out.iterdir() if p.is_dir()]
    assert folders and not [f for f in folders if any(u in f for u in raw_uids)], folders
