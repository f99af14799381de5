"""Part-segmentation metrics (hand-computed) and the Table 4 protocol on a tiny dataset."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from xmodal.data.shapenetpart import PartSegData, PartSegSplit, ShapeFaces, load_partseg, stratified_subset
from xmodal.eval.config import PartSegConfig
from xmodal.eval.partseg import (
    evaluate_partseg,
    face_labelling_accuracy,
    mean_face_accuracy,
    partseg_metrics,
    percent_key,
    reinitialize,
    restrict_predictions,
    run_partseg,
    shape_ious,
    short_categories,
    train_partseg,
)
from xmodal.models.dgcnn import DGCNN
from xmodal.models.batchnorm import batchnorm_layers
from xmodal.models.partseg import PartSegNet

# two categories: A owns parts 0, 1; B owns parts 2, 3, 4
PARTS = [[0, 1], [2, 3, 4]]


def test_perfect_prediction():
    seg = np.array([[0, 1, 1, 0], [2, 3, 4, 2]])
    m = partseg_metrics(seg, seg, np.array([0, 1]), PARTS, category_names=["A", "B"])
    assert m["oa"] == m["class_miou"] == m["instance_miou"] == 1.0
    assert m["per_category"] == {"A": 1.0, "B": 1.0}


def test_hand_computed_ious():
    # shape 0 (A): gt 0 0 1 1, pred 0 1 1 1 -> IoU0 = 1/2, IoU1 = 2/3
    # shape 1 (B): gt 2 2 3 3, pred 2 3 3 3 -> IoU2 = 1/2, IoU3 = 2/3, part 4 absent from both -> 1
    seg = np.array([[0, 0, 1, 1], [2, 2, 3, 3]])
    pred = np.array([[0, 1, 1, 1], [2, 3, 3, 3]])
    ious = shape_ious(pred, seg, np.array([0, 1]), PARTS)
    np.testing.assert_allclose(ious, [(1 / 2 + 2 / 3) / 2, (1 / 2 + 2 / 3 + 1) / 3])
    m = partseg_metrics(pred, seg, np.array([0, 1]), PARTS)
    assert m["oa"] == pytest.approx(6 / 8)
    # a prediction outside the shape's category (part 4 on an A shape) has no IoU of its own;
    # it only costs the ground-truth part it replaced: part 0 -> 1, part 1 -> 1/2
    pred2 = np.array([[0, 0, 1, 4], [2, 2, 3, 3]])
    np.testing.assert_allclose(shape_ious(pred2, seg, np.array([0, 1]), PARTS)[0], (1 + 1 / 2) / 2)


def test_absent_part_counts_one():
    seg = np.array([[2, 2, 2, 2]])
    pred = np.array([[2, 2, 2, 3]])
    # part 2: 3/4, part 3: 0/1, part 4 absent from both: 1
    np.testing.assert_allclose(shape_ious(pred, seg, np.array([1]), PARTS), [(3 / 4 + 0 + 1) / 3])


def test_class_vs_instance_miou_unbalanced():
    # three perfect shapes of A, one shape of B with mIoU 1/3 (everything predicted as part 3)
    seg = np.array([[0, 1, 0, 1]] * 3 + [[2, 2, 2, 2]])
    pred = seg.copy()
    pred[3] = 3
    m = partseg_metrics(pred, seg, np.array([0, 0, 0, 1]), PARTS)
    b = (0 + 0 + 1) / 3  # part 2: 0/4, part 3: 0/4, part 4 absent -> 1
    assert m["per_category"]["1"] == pytest.approx(b)
    assert m["instance_miou"] == pytest.approx((3 + b) / 4)
    assert m["class_miou"] == pytest.approx((1 + b) / 2)
    assert m["class_miou"] != pytest.approx(m["instance_miou"])


def test_category_restriction():
    # logits (n=2, P=5, N=3): the global arg-max is part 4 everywhere, but shape 0 is of category A
    logits = np.zeros((2, 5, 3))
    logits[:, 4] = 10.0
    logits[0, 1, :] = 1.0
    logits[1, 3, :] = 1.0
    pred = restrict_predictions(logits, np.array([0, 1]), PARTS)
    np.testing.assert_array_equal(pred, [[1, 1, 1], [4, 4, 4]])


def test_percent_key():
    assert [percent_key(f) for f in (0.02, 0.2, 1.0, 0.025)] == ["2", "20", "100", "2.5"]


# ---------------------------------------------------------------------------------------
# tiny synthetic dataset: category A = two blobs along x (part by sign of x),
# category B = three slabs along z
# ---------------------------------------------------------------------------------------


def _tiny_split(n_per_cat: int, n_points: int, seed: int) -> PartSegSplit:
    rng = np.random.default_rng(seed)
    pts, seg, cat = [], [], []
    for c in (0, 1):
        for _ in range(n_per_cat):
            p = rng.uniform(-1, 1, size=(n_points, 3)).astype(np.float32)
            s = (p[:, 0] > 0).astype(np.int64) if c == 0 else 2 + np.digitize(p[:, 2], [-1 / 3, 1 / 3])
            pts.append(p)
            seg.append(s)
            cat.append(c)
    return PartSegSplit(np.stack(pts), np.stack(seg), np.array(cat))


def _tiny_data(n_points: int = 64) -> PartSegData:
    splits = {"train": _tiny_split(6, n_points, 0), "test": _tiny_split(2, n_points, 1)}
    return PartSegData(splits, ["A", "B"], ["A/l", "A/r", "B/lo", "B/mid", "B/hi"], PARTS)


def _tiny_dgcnn() -> DGCNN:
    return DGCNN(k=4, channels=(8, 8, 8, 16), emb_dims=32)


def test_partsegnet_shapes_and_modes():
    torch.manual_seed(0)
    net = PartSegNet(_tiny_dgcnn(), 5, 2)
    assert net.block_channels == [8, 8, 8, 16] and net.global_dim == 32
    out = net(torch.randn(3, 32, 3), torch.tensor([0, 1, 1]))
    assert out.shape == (3, 5, 32)
    with pytest.raises(ValueError, match="category"):
        net(torch.randn(2, 32, 3))
    frozen = PartSegNet(_tiny_dgcnn(), 5, 2, freeze_encoder=True, use_category=False)
    frozen.train()
    assert frozen.training and not frozen.encoder.training and frozen.head.training
    assert not any(p.requires_grad for p in frozen.encoder.parameters())
    assert all(p.requires_grad for p in frozen.head_parameters())
    assert frozen(torch.randn(2, 32, 3)).shape == (2, 5, 32)


def test_frozen_training_keeps_encoder_and_bn_stats():
    data = _tiny_data(32)
    torch.manual_seed(0)
    enc = _tiny_dgcnn()
    before = copy.deepcopy(enc.state_dict())
    net = PartSegNet(enc, 5, 2, freeze_encoder=True)
    head_before = copy.deepcopy(net.head.state_dict())
    train_partseg(net, data.split("train"), PartSegConfig(epochs=1, batch_size=4), device="cpu", progress=False)
    after = net.encoder.state_dict()
    assert any("running_mean" in k for k in before)
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert any(not torch.equal(v, net.head.state_dict()[k]) for k, v in head_before.items())
    # the unfrozen model does move the encoder (weights and BN statistics)
    net2 = PartSegNet(copy.deepcopy(enc), 5, 2)
    train_partseg(net2, data.split("train"), PartSegConfig(epochs=1, batch_size=4), device="cpu", progress=False)
    changed = [k for k, v in before.items() if not torch.equal(v, net2.encoder.state_dict()[k])]
    assert any("running_mean" in k for k in changed) and any("weight" in k for k in changed)


def test_reinitialize_is_seeded_and_fresh():
    torch.manual_seed(0)
    enc = _tiny_dgcnn()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(1.0)
    a, b = reinitialize(enc, seed=5), reinitialize(enc, seed=5)
    for (k, va), vb, v0 in zip(a.state_dict().items(), b.state_dict().values(), enc.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.conv_out.weight, enc.conv_out.weight)
    assert torch.equal(a.bn_out.weight, torch.ones_like(a.bn_out.weight))


def test_run_partseg_end_to_end(tmp_path):
    data = _tiny_data(64)
    torch.manual_seed(0)
    pretrained = _tiny_dgcnn()
    state = copy.deepcopy(pretrained.state_dict())
    res = run_partseg(
        PartSegConfig(epochs=1, batch_size=4, fractions=[0.02, 0.2, 1.0]), pretrained, data, device="cpu",
        progress=False, log_dir=tmp_path / "logs", encoder_factory=_tiny_dgcnn, seed=0,
    )
    keys = {f"partseg.{s}.{p}.{m}" for s in ("frozen", "finetune", "scratch") for p in ("2", "20", "100")
            for m in ("oa", "class_miou", "instance_miou")}
    flags = {f"partseg.{p}.{k}" for p in ("2", "20", "100") for k in ("n_train", "one_per_category")}
    assert set(res) == keys | flags  # no face_accuracy: these clouds have no meshes
    assert all(0.0 <= res[k] <= 1.0 for k in keys)
    # 2% of 6 shapes per category rounds to none: each category takes one; 20% rounds to one
    assert (res["partseg.2.one_per_category"], res["partseg.2.n_train"]) == (True, 2)
    assert (res["partseg.20.one_per_category"], res["partseg.20.n_train"]) == (False, 2)
    assert (res["partseg.100.one_per_category"], res["partseg.100.n_train"]) == (False, 12)
    # the caller's pre-trained encoder is left untouched
    for k, v in state.items():
        assert torch.equal(v, pretrained.state_dict()[k])
    lines = (tmp_path / "logs" / "partseg_frozen_20.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert len(recs) == 2 and recs[0]["epoch"] == 1 and recs[-1]["split"] == "test"
    assert recs[0]["n_train"] == 2  # 20% of 6 per category -> 1 each
    assert set(recs[-1]["per_category"]) == {"A", "B"}
    # seeded: the same call gives the same numbers
    again = run_partseg(
        PartSegConfig(settings=["finetune"], fractions=[0.2], epochs=1, batch_size=4), pretrained, data,
        device="cpu", progress=False, encoder_factory=_tiny_dgcnn, seed=0,
    )
    assert again["partseg.finetune.20.instance_miou"] == res["partseg.finetune.20.instance_miou"]


def test_run_partseg_without_run_only_scratch():
    data = _tiny_data(32)
    res = run_partseg(PartSegConfig(fractions=[1.0], epochs=1, batch_size=6), None, data, device="cpu",
                      progress=False, encoder_factory=_tiny_dgcnn)
    assert set(res) == {f"partseg.scratch.100.{m}" for m in ("oa", "class_miou", "instance_miou")} | {
        "partseg.100.n_train", "partseg.100.one_per_category"}
    with pytest.raises(ValueError, match="unknown"):
        run_partseg(PartSegConfig(settings=["bogus"]), None, data, encoder_factory=_tiny_dgcnn, progress=False)


def test_training_learns_tiny_task():
    """A few epochs on the separable tiny task beat the chance level of the restricted arg-max."""
    data = _tiny_data(32)
    torch.manual_seed(0)
    net = PartSegNet(_tiny_dgcnn(), 5, 2, dropout=0.0)
    train_partseg(net, data.split("train"), PartSegConfig(epochs=8, batch_size=4, lr=0.01, augment=False),
                  device="cpu", progress=False)
    m = evaluate_partseg(net, data.split("test"), PARTS, device="cpu")
    assert m["oa"] > 0.7  # chance: 1/2 for A, 1/3 for B


@pytest.mark.parametrize("held_bn, finetune_bn", [(False, "pretraining"), (True, "pretraining"), (True, "train")])
def test_run_partseg_from_run_dir(tmp_path, monkeypatch, held_bn, finetune_bn):
    """A run folder written like `xmodal pretrain` does: Fp is read with xmodal.api.load_run.
    A run pre-trained with frozen Fp BatchNorm statistics is fine-tuned with them frozen only
    under partseg.finetune_point_bn=pretraining (the default trains them, as scratch does)."""
    import xmodal.models.partseg as partseg_mod
    from xmodal.config import apply_overrides, to_dict
    from xmodal.train.checkpoint import architecture_from_config, build_networks, save_encoders
    from xmodal.train.config import PretrainConfig

    built = []

    def recording_net(*args, **kwargs):
        built.append((kwargs["freeze_encoder"], kwargs["freeze_encoder_bn"]))
        return PartSegNet(*args, **kwargs)

    monkeypatch.setattr(partseg_mod, "PartSegNet", recording_net)
    cfg = apply_overrides(PretrainConfig(), ["model.k=4", f"model.freeze_point_bn={str(held_bn).lower()}"])
    arch = architecture_from_config(cfg)
    nets = build_networks(arch, seed=0)
    save_encoders(tmp_path / "run", nets=nets, info={
        "architecture": arch, "image_size": 32, "num_points": 32, "up_axis": "z", "step": 0, "config": to_dict(cfg),
    })
    data = PartSegData({"train": _tiny_split(2, 32, 0), "test": _tiny_split(1, 32, 1)}, ["A", "B"],
                       ["A/l", "A/r", "B/lo", "B/mid", "B/hi"], PARTS)
    res = run_partseg(PartSegConfig(fractions=[1.0], epochs=1, batch_size=4, finetune_point_bn=finetune_bn),
                      tmp_path / "run", data,
                      device="cpu", progress=False)
    keys = {f"partseg.{s}.100.{m}" for s in ("frozen", "finetune", "scratch") for m in ("oa", "class_miou", "instance_miou")}
    assert set(res) == keys | {"partseg.100.n_train", "partseg.100.one_per_category"}
    assert all(0.0 <= res[k] <= 1.0 for k in keys)
    # settings run in the order frozen, finetune, scratch; only finetune holds Fp's BatchNorm
    # statistics, and only for a run pre-trained that way
    assert built == [(True, False), (False, held_bn and finetune_bn == "pretraining"), (False, False)]


def test_finetune_with_held_batchnorm_trains_weights_but_keeps_statistics():
    data = _tiny_data(32)
    torch.manual_seed(0)
    enc = _tiny_dgcnn()
    before = copy.deepcopy(enc.state_dict())
    net = PartSegNet(enc, 5, 2, freeze_encoder_bn=True)
    net.train()
    assert net.encoder.training and not any(m.training for m in batchnorm_layers(net.encoder))
    head_stats = copy.deepcopy({k: v for k, v in net.head.state_dict().items() if "running_mean" in k})
    train_partseg(net, data.split("train"), PartSegConfig(epochs=1, batch_size=4), device="cpu", progress=False)
    after = net.encoder.state_dict()
    stats = [k for k in before if "running_" in k or "num_batches" in k]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    assert all(not torch.equal(v, net.head.state_dict()[k]) for k, v in head_stats.items())


# --------------------------------------------------------------------------------------- face accuracy


def test_face_accuracy_two_triangles_of_different_area():
    # triangle 0: area 0.5 around x ~ 0.3; triangle 1: area 1.5 (3x) around x ~ 5
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [4, 0, 0], [7, 0, 0], [4, 1, 0]], float)
    f = np.array([[0, 1, 2], [3, 4, 5]])
    tri = v[f]
    areas = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    np.testing.assert_allclose(areas, [0.5, 1.5])
    centroids = tri.mean(axis=1)
    labels = np.array([3, 7])
    points = np.array([[0.2, 0.2, 0], [5.0, 0.3, 0], [9.0, 0, 0]])  # one near each centroid, one far
    assert face_labelling_accuracy(points, np.array([3, 7, 3]), centroids, areas, labels) == 1.0
    assert face_labelling_accuracy(points, np.array([3, 3, 7]), centroids, areas, labels) == 0.25  # small face right
    assert face_labelling_accuracy(points, np.array([7, 7, 3]), centroids, areas, labels) == 0.75  # big face right
    assert face_labelling_accuracy(points, np.array([7, 3, 7]), centroids, areas, labels) == 0.0


def test_face_accuracy_nearest_point_decides_per_face():
    # four unit-area faces along x (centroids at 0, 1, 2, 3), two points at 0.4 and 2.6:
    # faces 0, 1 take point 0's prediction, faces 2, 3 point 1's
    centroids = np.array([[x, 0, 0] for x in range(4)], float)
    areas = np.array([1.0, 1.0, 2.0, 4.0])
    labels = np.array([0, 1, 1, 1])
    points = np.array([[0.4, 0, 0], [2.6, 0, 0]])
    assert face_labelling_accuracy(points, np.array([1, 1]), centroids, areas, labels) == pytest.approx(7 / 8)
    assert face_labelling_accuracy(points, np.array([0, 0]), centroids, areas, labels) == pytest.approx(1 / 8)
    with pytest.raises(ValueError, match="no area"):
        face_labelling_accuracy(points, np.array([0, 0]), centroids, np.zeros(4), labels)
    with pytest.raises(ValueError, match="must agree"):
        face_labelling_accuracy(points, np.array([0, 0]), centroids, areas[:3], labels)


def test_mean_face_accuracy_averages_shapes():
    centroids = np.array([[0, 0, 0], [1, 0, 0]], float)
    faces = [ShapeFaces(centroids, np.array([1.0, 3.0]), np.array([0, 1])),
             ShapeFaces(centroids, np.array([1.0, 1.0]), np.array([0, 0]))]
    points = np.array([[[0, 0, 0], [1, 0, 0]], [[0, 0, 0], [1, 0, 0]]], float)
    pred = np.array([[0, 0], [0, 0]])
    assert mean_face_accuracy(points, pred, faces) == pytest.approx((0.25 + 1.0) / 2)


def test_short_categories_take_one_shape_each():
    category = np.repeat([0, 1, 2], [5, 5, 40])
    short = short_categories(category, 0.02)  # 0.1, 0.1 -> none; 0.8 -> one
    np.testing.assert_array_equal(short, [0, 1])
    sub = stratified_subset(category, 0.02, seed=0)
    assert np.bincount(category[sub]).tolist() == [1, 1, 1]
    assert short_categories(category, 0.2).size == 0 and short_categories(category, 1.0).size == 0


def test_run_partseg_on_a_labeled_psb_tree(tmp_path, labeled_tree):
    """The raw Labeled PSB folder (train/test levels) through the Table 4 runner: every setting
    gets OA, class / instance mIoU and the face labelling accuracy; 10% takes one shape per category."""
    root = labeled_tree(tmp_path / "lpsb", per_category=4, split_levels=True, test_per_category=1)
    data = load_partseg(root, num_points=32, seed=0)
    assert data.category_names == ["Cup", "Table"] and data.category_parts == [[0, 1], [2, 3]]
    test = data.split("test")
    assert test.n == 2 and len(test.faces) == 2 and test.faces[0].centroids.shape == (24, 3)
    # the faces are in the frame of the points: every centroid lies within the unit sphere's reach
    assert max(np.linalg.norm(f.centroids, axis=1).max() for f in test.faces) <= 1.0 + 1e-6
    torch.manual_seed(0)
    res = run_partseg(
        PartSegConfig(fractions=[0.1, 1.0], epochs=2, batch_size=4, num_points=32), _tiny_dgcnn(), root,
        device="cpu", progress=False, encoder_factory=_tiny_dgcnn, seed=0,
    )
    metrics = ("oa", "class_miou", "instance_miou", "face_accuracy")
    keys = {f"partseg.{s}.{p}.{m}" for s in ("frozen", "finetune", "scratch") for p in ("10", "100") for m in metrics}
    assert set(res) - keys == {f"partseg.{p}.{k}" for p in ("10", "100") for k in ("n_train", "one_per_category")}
    assert keys <= set(res) and all(0.0 <= res[k] <= 1.0 for k in keys)
    assert (res["partseg.10.one_per_category"], res["partseg.10.n_train"]) == (True, 2)
    assert (res["partseg.100.one_per_category"], res["partseg.100.n_train"]) == (False, 6)


def test_face_accuracy_of_true_point_labels_is_high(tmp_path, labeled_tree):
    """Predicting every point's own (true) label, faces inherit it from their nearest point: on
    the two-box meshes (parts 0.5 apart) every face is then right."""
    root = labeled_tree(tmp_path / "lpsb", per_category=2)
    data = load_partseg(root, num_points=64, seed=1)
    for split in data.splits.values():
        assert mean_face_accuracy(split.points, split.seg, split.faces) == 1.0
        wrong = np.where(split.seg % 2 == 0, split.seg + 1, split.seg - 1)  # the other part of the category
        assert mean_face_accuracy(split.points, wrong, split.faces) == 0.0
