"""Fingerprints, shards, manifest durability, stale-temp cleanup, prefetch bounds, reasons."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from batch_helpers import make_nifti, make_study
from pipeline.batch.discover import Study, discover_studies
from pipeline.batch.fingerprint import fingerprint, options_digest
from pipeline.batch.manifest import ManifestEntry, append_entry, cleanup_stale, compact, finished, read_entries, \
    safe_reason
from pipeline.batch.prefetch import Prefetcher
from pipeline.batch.run import assign_output_dirs
from pipeline.batch.shard import Shard, parse_shard, select, shard_of
from pipeline.errors import InputError


# ---- fingerprints ------------------------------------------------------------------------------

def test_dicom_fingerprint_ignores_folder_names_and_layout(tmp_path):
    uid, files = make_study(tmp_path / "a" / "study_by_name", 1, n_slices=4)
    fp1 = fingerprint(discover_studies(tmp_path / "a")[0][0])
    moved = tmp_path / "b" / "other" / "names"
    moved.mkdir(parents=True)
    for i, f in enumerate(files):
        shutil.move(f, moved / f"x{i}")
    fp2 = fingerprint(discover_studies(tmp_path / "b")[0][0])
    assert fp1 == fp2 and fp1.startswith("dicom:")


def test_dicom_fingerprint_changes_when_an_instance_changes(tmp_path):
    uid, files = make_study(tmp_path / "a", 1, n_slices=4)
    fp1 = fingerprint(discover_studies(tmp_path)[0][0])
    files[-1].unlink()  # an incomplete transfer is a different input
    fp2 = fingerprint(discover_studies(tmp_path)[0][0])
    make_study(tmp_path / "a2", 5, study_uid=uid, n_slices=1)  # an added instance too
    fp3 = fingerprint(discover_studies(tmp_path)[0][0])
    assert len({fp1, fp2, fp3}) == 3


def test_file_fingerprint_is_content_not_name(tmp_path):
    a = make_nifti(tmp_path / "one" / "a.nii.gz", 1)
    b = tmp_path / "two" / "renamed.nii.gz"
    b.parent.mkdir()
    shutil.copy(a, b)
    c = make_nifti(tmp_path / "three" / "a.nii.gz", 2)
    s = {x.rel: x for x in discover_studies(tmp_path)[0]}
    assert fingerprint(s["one/a.nii.gz"]) == fingerprint(s["two/renamed.nii.gz"])
    assert fingerprint(s["one/a.nii.gz"]) != fingerprint(s["three/a.nii.gz"])


def test_options_digest_tracks_result_options_and_config_content(tmp_path):
    cfg = tmp_path / "rules.yaml"
    cfg.write_text("a: 1\n")
    d1 = options_digest({"fast": False, "rules": cfg})
    assert d1 == options_digest({"rules": cfg, "fast": False})
    assert d1 != options_digest({"fast": True, "rules": cfg})
    cfg.write_text("a: 2\n")
    assert d1 != options_digest({"fast": False, "rules": cfg})


# ---- shards ------------------------------------------------------------------------------------

def _fake_studies(keys):
    return [Study(key=k, kind="dicom", input_path=Path("."), rel=".", shard_key=f"dicom:{k}") for k in keys]


@settings(max_examples=30, deadline=None)
@given(keys=st.sets(st.text(alphabet="0123456789.", min_size=1, max_size=40), min_size=0, max_size=200),
       n=st.integers(min_value=1, max_value=7))
def test_shards_partition_exactly(keys, n):
    studies = _fake_studies(sorted(keys))
    parts = [select(studies, Shard(k, n)) for k in range(1, n + 1)]
    flat = [s.key for p in parts for s in p]
    assert sorted(flat) == sorted(keys)  # union == all, and no study twice (pairwise disjoint)
    assert len(flat) == len(set(flat))


def test_shards_do_not_depend_on_listing_order_or_other_studies():
    keys = [f"1.2.3.{i}" for i in range(300)]
    full = {s.key: k for k in (1, 2, 3) for s in select(_fake_studies(keys), Shard(k, 3))}
    rev = {s.key: k for k in (1, 2, 3) for s in select(_fake_studies(keys[::-1][:100]), Shard(k, 3))}
    assert all(full[key] == k for key, k in rev.items())
    counts = [list(full.values()).count(k) for k in (1, 2, 3)]
    assert min(counts) > 60  # roughly balanced
    assert shard_of("dicom:1.2.3", 3) == shard_of("dicom:1.2.3", 3)


def test_shards_partition_real_discovery(tmp_path):
    for i in range(12):
        make_study(tmp_path / f"s{i}", i, n_slices=1)
    make_nifti(tmp_path / "n" / "a.nii.gz", 1)
    studies, _ = discover_studies(tmp_path)
    parts = [{s.key for s in select(studies, parse_shard(f"{k}/3"))} for k in (1, 2, 3)]
    assert set().union(*parts) == {s.key for s in studies}
    assert sum(len(p) for p in parts) == len(studies)


@pytest.mark.parametrize("bad", ["0/3", "4/3", "1/0", "a/b", "3", "1/2/3", "-1/2"])
def test_bad_shard_text_is_an_input_error(bad):
    with pytest.raises(InputError):
        parse_shard(bad)


def test_parse_shard_ok():
    assert parse_shard("2/5") == Shard(2, 5) and parse_shard(None) is None


# ---- manifest ----------------------------------------------------------------------------------

def _entry(fp, status="ok", output=None, t="2026-01-01T00:00:00.000001Z"):
    return ManifestEntry(study=fp, kind="dicom", input=".", fingerprint=fp, options="o", status=status,
                         output=output, finished_at=t)


def test_manifest_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "manifest.jsonl"
    append_entry(path, _entry("a"))
    with open(path, "a") as fh:
        fh.write('{"study": "b", "fingerp')  # killed mid-write
    append_entry(path, _entry("c", t="2026-01-01T00:00:01.000000Z"))
    entries = read_entries(tmp_path)
    assert [e["fingerprint"] for e in entries] == ["a", "c"]
    compact(path)
    lines = path.read_text().splitlines()
    assert [json.loads(l)["fingerprint"] for l in lines] == ["a", "c"]


def test_compact_keeps_latest_line_per_fingerprint(tmp_path):
    path = tmp_path / "manifest.jsonl"
    append_entry(path, _entry("a", "failed", t="2026-01-01T00:00:00.1Z"))
    append_entry(path, _entry("b", t="2026-01-01T00:00:00.2Z"))
    append_entry(path, _entry("a", "ok", output="A", t="2026-01-01T00:00:00.3Z"))
    compact(path)
    got = {e["fingerprint"]: e["status"] for e in read_entries(tmp_path)}
    assert got == {"a": "ok", "b": "ok"} and len(path.read_text().splitlines()) == 2


def test_finished_needs_ok_and_report_in_place(tmp_path):
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "report.json").write_text("{}")
    entries = [_entry("a", output="A").__dict__, _entry("b", output="B").__dict__,
               _entry("c", "failed").__dict__]
    assert set(finished(tmp_path, entries)) == {("a", "o")}


def test_cleanup_removes_only_temp_entries(tmp_path):
    for name in (".1.2.3.tmp-ab12cd34", ".case.old-0a0b0c0d", "_dup/abc/.x.tmp-12345678"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "half.nii.gz").write_bytes(b"x")
    (tmp_path / ".summary.csv.0123456789abcdef0123456789abcdef.tmp").write_text("x")
    (tmp_path / "1.2.3").mkdir()
    (tmp_path / "manifest.jsonl").write_text("")
    removed = cleanup_stale(tmp_path)
    assert len(removed) == 4
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["1.2.3", "_dup", "manifest.jsonl"]
    assert list((tmp_path / "_dup" / "abc").iterdir()) == []


def test_cleanup_spares_recent_temp_folders_when_asked(tmp_path):
    (tmp_path / ".x.tmp-12345678").mkdir()
    assert cleanup_stale(tmp_path, min_age_s=600) == []
    old = time.time() - 3600
    os.utime(tmp_path / ".x.tmp-12345678", (old, old))
    assert cleanup_stale(tmp_path, min_age_s=600) == [".x.tmp-12345678"]


def test_reasons_are_one_line_without_paths():
    exc = FileNotFoundError(2, "No such file or directory", "/data/DOE^JOHN/CT/IM0001.dcm")
    reason = safe_reason(exc)
    assert "DOE" not in reason and "FileNotFoundError" in reason and "<path>" in reason
    assert "\n" not in safe_reason(InputError("line one\nline two"))
    assert safe_reason(InputError("shard 1/3 bad")) == "shard 1/3 bad"
    assert "Smith" not in safe_reason(ValueError("cannot read C:\\scans\\Smith\\x.dcm"))


# ---- output-folder collisions ------------------------------------------------------------------

def test_colliding_output_names_get_distinct_folders(tmp_path):
    make_nifti(tmp_path / "a" / "ct.nii.gz", 1)
    make_nifti(tmp_path / "b" / "ct.nii.gz", 2)
    make_nifti(tmp_path / "c" / "other.nii.gz", 3)
    studies = assign_output_dirs(discover_studies(tmp_path)[0])
    subdirs = sorted((s.key, s.out_subdir) for s in studies)
    assert [k for k, _ in subdirs] == ["ct", "ct", "other"]
    assert subdirs[0][1] != subdirs[1][1] and "" in (subdirs[0][1], subdirs[1][1])
    assert subdirs[2][1] == ""


# ---- prefetch ----------------------------------------------------------------------------------

def test_prefetch_is_bounded_and_ordered():
    loaded, lock = [], threading.Lock()

    def load(x):
        with lock:
            loaded.append(x)
        return x * 10

    consumed = []
    with Prefetcher(range(50), load, depth=2) as pf:
        for item in pf:
            time.sleep(0.01)  # slow consumer: the loader must wait, not run ahead
            with lock:
                ahead = len(loaded) - len(consumed)
            assert ahead <= 2 + 1 + 1  # queued + being loaded + this one
            consumed.append(item.value)
    assert consumed == [x * 10 for x in range(50)]


def test_prefetch_overlaps_loading_with_work():
    def load(x):
        time.sleep(0.05)
        return x

    t0 = time.perf_counter()
    with Prefetcher(range(10), load, depth=2) as pf:
        for _ in pf:
            time.sleep(0.05)
    assert time.perf_counter() - t0 < 0.85  # serial would be 1.0 s


def test_prefetch_turns_load_errors_into_results_and_close_stops_early():
    def load(x):
        if x == 2:
            raise ValueError("bad study")
        return x

    with Prefetcher(range(5), load, depth=1) as pf:
        items = list(pf)
    assert [type(i.error).__name__ if i.error else i.value for i in items] == [0, 1, "ValueError", 3, 4]

    calls = []
    pf = Prefetcher(range(10_000), lambda x: calls.append(x) or x, depth=2)
    for item in pf:
        if item.value == 3:
            break
    pf.close()
    assert len(calls) < 10
