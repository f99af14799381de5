"""Figures of the evaluation report drawn from a run's metrics log."""

import json

from PIL import Image

from xmodal.eval.figures import training_curves_figure, validation_curve_figure


def _log(path, with_val=True):
    recs = []
    for s in range(0, 101, 10):
        if with_val and s % 50 == 0:
            recs.append({"step": s, "val.svm3d": 0.7 + s / 1000, "val.retrieval3d.top1": 0.6, "val.retrieval3d.map": 0.3,
                         "val.svm2d": 0.4 + s / 500, "val.retrieval2d.top1": 0.3, "val.retrieval2d.map": 0.2,
                         "time": s * 1.5, "val_seconds": 4.0})
        if s:
            recs.append({"step": s, "loss": 3.0 - s / 100, "triplet": 1.0, "cross": 2.0 - s / 100, "cm_acc": 0.6,
                         "lr": 0.005, "time": s * 1.5, "samples_per_s": 10.0})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_validation_curve_drawn_from_val_records(tmp_path):
    png = validation_curve_figure(_log(tmp_path / "metrics.jsonl"), tmp_path / "curve.png")
    assert png is not None and png.exists()
    w, h = Image.open(png).size
    assert w > h > 100  # three panels wide, two rows


def test_validation_curve_absent_without_val_records(tmp_path):
    assert validation_curve_figure(_log(tmp_path / "m.jsonl", with_val=False), tmp_path / "curve.png") is None
    assert not (tmp_path / "curve.png").exists()


def test_training_curves_ignore_validation_records(tmp_path):
    png = training_curves_figure(_log(tmp_path / "metrics.jsonl"), tmp_path / "train.png")
    assert png is not None and png.exists()


def test_validation_curve_draws_the_averaged_networks_beside_the_trained_ones(tmp_path, monkeypatch):
    import xmodal.eval.figures as figures

    drawn = {}

    def keep(fig, path):
        drawn["fig"] = fig
        return path

    monkeypatch.setattr(figures, "_save", keep)
    path = _log(tmp_path / "metrics.jsonl")
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    for r in recs:  # optim.average_from = 50: the averaged networks' figures from step 50 on
        if "val.svm3d" in r and r["step"] >= 50:
            r.update({k.replace("val.", "val.averaged.", 1): v + 0.01 for k, v in list(r.items()) if k.startswith("val.")})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    validation_curve_figure(path, tmp_path / "curve.png")
    axes = drawn["fig"].axes
    assert len(axes) == 6
    for ax in axes:  # per panel: points and images, each trained and averaged
        labels = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
        assert labels == ["points (Fp)", "points (Fp), averaged weights", "images (Fimg)", "images (Fimg), averaged weights"]
        averaged = [line for line in ax.get_lines() if line.get_label() == "points (Fp), averaged weights"][0]
        assert len(averaged.get_xdata()) == 2  # steps 50 and 100
