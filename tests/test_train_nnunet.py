"""The nnU-Net path of `osteoplan train`: tiny labelled folder -> 2 training steps -> bundle -> `osteoplan run`."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import yaml

from pipeline.train.phantom import make_phantom
from pipeline.types import BONE, CANAL, LESION

SRC_VALUES = {CANAL: 5, LESION: 7, BONE: 9}  # the source's own label values, mapped back by label_map


def _write_nnunet(root, n=2, derive_canal_case=1):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n):
        ph = make_phantom(100 + i, shape=(64, 80, 40), spacing=(1.5, 1.5, 1.5), n_lesions=1 - i)
        lab = np.zeros(ph.labels.shape, np.uint8)
        for ours, theirs in SRC_VALUES.items():
            if i == derive_canal_case and ours == CANAL:
                continue  # this case has no canal label: it must be derived from the bone
            lab[ph.labels == ours] = theirs
        aff = ph.geometry.affine_ras
        nib.save(nib.Nifti1Image(np.round(ph.hu).astype(np.int16), aff), str(root / "imagesTr" / f"sp_{i:03d}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(lab, aff), str(root / "labelsTr" / f"sp_{i:03d}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "canal": 5, "metastasis": 7, "vertebra": 9},
        "numTraining": n, "file_ending": ".nii.gz"}))


def test_nnunet_cases_map_labels_and_derive_the_canal(tmp_path):
    from pipeline.train.data import nnunet_cases

    _write_nnunet(tmp_path / "ds")
    cases = nnunet_cases(tmp_path / "ds", {5: CANAL, 7: LESION, 9: BONE}, (1.5, 1.5, 1.5), derive_canal=True)
    assert [c.name for c in cases] == ["sp_000", "sp_001"]
    for c in cases:
        assert set(np.unique(c.labels)) <= {0, CANAL, LESION, BONE}
        assert (c.labels == BONE).any()
    assert (cases[0].labels == CANAL).any() and (cases[0].labels == LESION).any()
    # sp_001 has no canal label: whatever is derived lies outside the bone
    assert cases[1].labels.shape == cases[1].image.shape


def test_improved_canal_derivation_recovers_the_phantom_canal():
    """The phantom's arch ring is open towards the body (body gap); real_insert.derive_canal bridges it."""
    from pipeline.train.real_insert import derive_canal

    ph = make_phantom(101, shape=(64, 80, 40), spacing=(1.5, 1.5, 1.5), n_lesions=0)
    canal, bone = ph.labels == CANAL, ph.labels == BONE
    derived = derive_canal(bone, (1.5, 1.5, 1.5))
    assert (derived & canal).sum() / canal.sum() >= 0.6
    assert not (derived & bone).any()


def test_train_two_steps_export_and_run(tmp_path, monkeypatch):
    import torch

    import pipeline.train.export as export
    from pipeline.cli import main
    from pipeline.segment.bundle import load_bundle
    from pipeline.train.samples import write_samples
    from pipeline.train.trainer import load_train_config, train_from_config

    torch.set_num_threads(1)
    _write_nnunet(tmp_path / "ds")
    cfg = {
        "seed": 3, "workdir": str(tmp_path / "work"), "export_name": "tiny-test", "version": "0.0.1",
        "network": {"class": "monai.networks.nets.UNet",
                    "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 4, "channels": [4, 8],
                             "strides": [2], "num_res_units": 0}},
        "target_spacing_mm": [1.5, 1.5, 1.5], "fast_spacing_mm": [3.0, 3.0, 3.0],
        "patch_size": [32, 32, 32], "inference_roi": [64, 64, 64], "batch_size": 1, "max_steps": 2,
        "val_every": 1000, "ckpt_every": 1, "threads": 1, "amp": False,
        "data": {"phantom": {"n_train": 0, "n_val": 0},
                 "nnunet": {"path": str(tmp_path / "ds"), "label_map": {5: 1, 7: 2, 9: 3}, "derive_canal": True}},
    }
    cfg_path = tmp_path / "train.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    models = tmp_path / "models"
    monkeypatch.setattr(export, "MODELS_DIR", models)  # never write into the repository's models/
    bundle = train_from_config(cfg_path, resume=False)
    assert bundle == models / "tiny-test"
    md = json.loads((bundle / "metadata.json").read_text())
    assert md["training"]["data"]["nnunet"]["path"] == str(tmp_path / "ds")
    assert (tmp_path / "work" / "checkpoint.pt").is_file()
    b = load_bundle(bundle)  # sha256 verified
    assert b.metadata["name"] == "tiny-test"

    # explicit models_dir: exports the checkpoint's weights elsewhere, unchanged
    state = torch.load(tmp_path / "work" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 2
    other = export.export_bundle(load_train_config(cfg_path), state["model"], [{"step": 2, "dice": {}}],
                                 tmp_path / "work", 0.0, "cpu", models_dir=tmp_path / "models2")
    assert other == tmp_path / "models2" / "tiny-test"
    assert json.loads((other / "metadata.json").read_text())["sha256"] == md["sha256"]

    # the bundle folder works for `osteoplan run`
    study = write_samples(tmp_path / "samples", n=1, seed=77)[0]
    rc = main(["run", str(study), "-o", str(tmp_path / "out"), "--model", str(bundle), "--device", "cpu",
               "--format", "json,csv", "--quiet"])
    assert rc == 0
    reports = list((tmp_path / "out").glob("*/report.json"))
    assert len(reports) == 1
    rep = json.loads(reports[0].read_text())
    assert "tiny-test" in json.dumps(rep)


@pytest.mark.parametrize("bad", [{"data": {"real_insert": {"enabled": True, "n_cases": -1}}},
                                 {"data": {"real_insert": {"unknown": 1}}}])
def test_real_insert_config_is_validated(tmp_path, bad):
    from pipeline.errors import InputError
    from pipeline.train.trainer import load_train_config

    base = yaml.safe_load(open("configs/train.yaml"))
    assert base["data"]["real_insert"]["enabled"] is False  # the lead switches it on
    base["data"]["real_insert"].update(bad["data"]["real_insert"])
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump(base))
    with pytest.raises(InputError):
        load_train_config(p)
