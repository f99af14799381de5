"""End-to-end: the demo pipeline (prepare -> pretrain -> evaluate) at a tiny size."""

from __future__ import annotations

import json

import pytest

from xmodal.demo import demo


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path):
    report = demo(
        tmp_path / "demo",
        workers=1,
        source="builtin:shapes?train=3&test=2",
        views=4,
        points=128,
        image_size=32,
        preset="smoke",
        progress=False,
        partseg_kwargs={"epochs": 1, "num_points": 64, "fractions": (0.2, 1.0)},
    )
    assert report.is_file()
    text = report.read_text()
    for table in ("Table 1", "Table 2", "Table 3", "Table 4"):
        assert table in text
    metrics = json.loads((tmp_path / "demo" / "report" / "metrics.json").read_text())
    for key in ("pretext.cm_accuracy", "svm3d.accuracy", "retrieval3d.top1", "svm2d.accuracy.1"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert "baseline.random.svm3d.accuracy" in metrics
    assert any(k.startswith("partseg.finetune.") for k in metrics)
    # every stage resumes: a second call finds everything done and rewrites only the report
    run_files = sorted(p.name for p in (tmp_path / "demo" / "run").iterdir())
    demo(tmp_path / "demo", workers=1, source="builtin:shapes?train=3&test=2", views=4, points=128,
         image_size=32, preset="smoke", progress=False, tasks=("svm",))
    assert sorted(p.name for p in (tmp_path / "demo" / "run").iterdir()) == run_files
