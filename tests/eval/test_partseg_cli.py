"""End-to-end: `xmodal evaluate --task partseg` on a folder in the ShapeNet-Part txt layout and
on a raw Labeled PSB folder.

All nine settings (frozen / finetune / scratch x 2 / 20 / 100 %) and the three metrics (plus the
face labelling accuracy for Labeled PSB) must be reported. The data are tiny synthetic folders of
those layouts.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from xmodal.cli import main


def _write_shapenetpart_txt(root, per_split=None, n_points=48, seed=0):
    per_split = per_split or {"train": 6, "val": 1, "test": 2}
    rng = np.random.default_rng(seed)
    cats = {"Airplane": ("02691156", [0, 1, 2, 3]), "Mug": ("03797390", [36, 37])}
    (root / "train_test_split").mkdir(parents=True)
    (root / "synsetoffset2category.txt").write_text("".join(f"{n}\t{s}\n" for n, (s, _) in cats.items()))
    for split, k in per_split.items():
        entries = []
        for name, (syn, parts) in cats.items():
            (root / syn).mkdir(exist_ok=True)
            for j in range(k):
                xyz = rng.normal(size=(n_points, 3))
                lab = np.array(parts)[(xyz[:, 2] > 0).astype(int) % len(parts)]  # learnable: part by height
                rows = np.column_stack([xyz, np.zeros((n_points, 3)), lab])
                np.savetxt(root / syn / f"{split}{j}.txt", rows, fmt="%.5f")
                entries.append(f"shape_data/{syn}/{split}{j}")
        (root / "train_test_split" / f"shuffled_{split}_file_list.json").write_text(json.dumps(entries))


def _smoke_run(tmp_path):
    """A dataset and a 2-step smoke pre-training run under ``tmp_path`` (``ds``, ``run``)."""
    from xmodal.config import resolve
    from xmodal.data.store import write_store
    from xmodal.train.config import PretrainConfig
    from xmodal.train.trainer import pretrain

    rng = np.random.default_rng(0)
    splits = {
        s: {
            "ids": [f"{s}{i}" for i in range(n)],
            "labels": np.arange(n) % 2,
            "points": rng.normal(size=(n, 64, 3)).astype(np.float32) * 0.5,
            "images": rng.integers(0, 255, size=(n, 3, 32, 32), dtype=np.uint8),
            "cameras": np.zeros((n, 3, 2), np.float32),
        }
        for s, n in (("train", 6), ("test", 4))
    }
    write_store(tmp_path / "ds", classes=["a", "b"], splits=splits)
    cfg = resolve(PretrainConfig, "smoke", ["iterations=2", "data.num_points=48"], group="pretrain")
    pretrain(cfg.with_paths(tmp_path / "ds", tmp_path / "run"), progress=False)


@pytest.mark.slow
def test_evaluate_partseg_on_shapenetpart_layout(tmp_path):
    _smoke_run(tmp_path)
    _write_shapenetpart_txt(tmp_path / "snp")

    code = main(["-q", "evaluate", "--run", str(tmp_path / "run"), "--data", str(tmp_path / "ds"), "--task", "partseg",
                 "--partseg-data", str(tmp_path / "snp"), "--partseg-epochs", "1", "--partseg-points", "32",
                 "--out", str(tmp_path / "rep")])
    assert code == 0
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    for setting in ("frozen", "finetune", "scratch"):
        for pct in (2, 20, 100):
            for m in ("oa", "class_miou", "instance_miou"):
                v = metrics[f"partseg.{setting}.{pct}.{m}"]
                assert 0.0 <= v <= 1.0
    assert not any(k.endswith("face_accuracy") for k in metrics)  # ShapeNet-Part has no meshes
    assert "Table 4" in (tmp_path / "rep" / "report.md").read_text()


@pytest.mark.slow
def test_evaluate_partseg_on_a_labeled_psb_folder(tmp_path, labeled_tree):
    """The raw Labeled PSB folder as --partseg-data: points sampled from the meshes on the fly,
    the face labelling accuracy in metrics.json and in the report, one shape per category at 2%."""
    _smoke_run(tmp_path)
    labeled_tree(tmp_path / "lpsb", per_category=4)
    code = main(["-q", "evaluate", "--run", str(tmp_path / "run"), "--data", str(tmp_path / "ds"), "--task", "partseg",
                 "--partseg-data", str(tmp_path / "lpsb"), "--partseg-epochs", "1", "--partseg-points", "32",
                 "--out", str(tmp_path / "rep")])
    assert code == 0
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    for setting in ("frozen", "finetune", "scratch"):
        for pct in (2, 20, 100):
            for m in ("oa", "class_miou", "instance_miou", "face_accuracy"):
                assert 0.0 <= metrics[f"partseg.{setting}.{pct}.{m}"] <= 1.0
    assert metrics["partseg.2.one_per_category"] is True and metrics["partseg.2.n_train"] == 2
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "face acc." in report and "† 2%" in report
