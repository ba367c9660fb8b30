"""End to end with the real study function: ``python -m pipeline listen`` (StudyRunner with the
shipped model bundle) between dcmtk storescu / Orthanc as senders and Orthanc as the PACS."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pacs_helpers import ORTHANC, STORESCU, ListenerProcess, Orthanc, free_port, storescu, wait_for  # noqa: E402
from pipeline.config import REPO_ROOT  # noqa: E402
from pipeline.pacs.queue import JobQueue  # noqa: E402

BUNDLE = REPO_ROOT / "models" / "osteoplan-spine"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(ORTHANC).exists() or not Path(STORESCU).exists(),
                       reason="Orthanc and dcmtk are needed (Debian packages orthanc, dcmtk)"),
    pytest.mark.skipif(not (BUNDLE / "model.pt").exists() or not (BUNDLE / "metadata.json").exists(),
                       reason=f"model bundle {BUNDLE} not present (make train)"),
]


def test_phantoms_from_storescu_and_from_orthanc_come_back_as_seg_and_sr(tmp_path):
    import highdicom as hd
    import pydicom

    from pipeline.train.samples import write_samples

    studies = write_samples(tmp_path / "samples", n=2, seed=11, size="small")
    uids = [pydicom.dcmread(next((s / "ct").iterdir()), stop_before_pixels=True).StudyInstanceUID for s in studies]
    port = free_port()
    pacs = Orthanc(tmp_path / "orthanc", {"osteoplan": ("OSTEOPLAN", "127.0.0.1", port)})
    spool = tmp_path / "spool"
    try:
        pacs.start()
        with ListenerProcess(spool, port, pacs.address, study_timeout=1.0, fake_delay=None, timeout=180) as lp:
            # 1. the scanner: dcmtk storescu
            r = storescu(lp.port, [studies[0] / "ct", studies[0] / "localizer"])
            assert r.returncode == 0, r.stderr
            # 2. the PACS as sender
            ids = pacs.upload(sorted((studies[1] / "ct").iterdir()))
            assert ids
            pacs.post("/modalities/osteoplan/store", {"Resources": [pacs.find_study(uids[1])], "Synchronous": True})

            queue = JobQueue(spool / "queue.sqlite")
            finished = wait_for(lambda: len(js := [j for j in queue.jobs() if j.state in ("done", "failed")]) == 2
                                and js, 300, interval=1.0, what="both jobs to finish")
            assert [j.reason for j in finished if j.state == "failed"] == []
            assert sorted(j.study_uid for j in finished) == sorted(uids)
            for job in finished:
                result = Path(job.result_dir)
                report = json.loads((result / "report.json").read_text())
                seg = hd.seg.segread(result / "seg.dcm")
                assert seg.StudyInstanceUID == job.study_uid
                # what the study function wrote is what the PACS gets: SEG and SR (TID 1500; with no
                # lesion the SR says so in a finding group), whatever the model found
                expected = {"SEG": 1, "SR": 1}
                assert pydicom.dcmread(result / "sr.dcm").Modality == "SR"
                assert isinstance(report["lesions"], list)
                found = wait_for(lambda: (m := {k: v for k, v in pacs.study_modalities(job.study_uid).items()
                                                if k in ("SEG", "SR")}) == expected and m, 60, interval=0.5,
                                 what=f"{expected} back in Orthanc")
                assert found == expected
            wait_for(lambda: all(o.state == "sent" for o in queue.outbox()), 10, what="outbox marked sent")
    finally:
        pacs.stop()
