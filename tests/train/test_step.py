"""Tests of the pieces of one pre-training step (xmodal.train.step)."""

import pytest
import torch

from xmodal.losses import cross_modal_loss, pair_scores
from xmodal.train.step import batch_positives, pooled_view_rows, sample_logits


def test_sample_logits_pick_the_papers_three_pairs():
    b = 4
    all_logits = torch.randn(3 * b, b, 2)
    got = sample_logits(all_logits)
    assert got.shape == (b, 3, 2)
    for i in range(b):
        for j in range(3):
            torch.testing.assert_close(got[i, j], all_logits[j * b + i, i])


def test_batch_positives_follow_object_identity():
    objects = torch.tensor([5, 2, 9])
    negatives = torch.tensor([2, 7, 5])  # img3 of sample 0 shows object 2 = the cloud of sample 1
    pos = batch_positives(objects, negatives)
    assert pos.shape == (9, 3)
    expected = torch.zeros(9, 3, dtype=torch.bool)
    for j in range(2):
        expected[j * 3 + torch.arange(3), torch.arange(3)] = True
    expected[6, 1] = True  # img3(0) shows object 2
    expected[8, 0] = True  # img3(2) shows object 5
    assert torch.equal(pos, expected)


def test_pooled_view_rows_against_a_loop():
    b, d = 4, 5
    z = torch.nn.functional.normalize(torch.randn(3 * b, d, dtype=torch.float64), dim=1)
    objects = torch.tensor([3, 1, 4, 0])
    negatives = torch.tensor([1, 5, 3, 6])  # img3 of samples 0 and 2 show the clouds of samples 1 and 0
    rows, pos = pooled_view_rows(z, objects, negatives)
    assert rows.shape == (2 * b, d) and pos.shape == (2 * b, b)
    for i in range(b):
        mean = (z[i] + z[b + i]) / 2
        torch.testing.assert_close(rows[i], mean / mean.norm())
        torch.testing.assert_close(rows[b + i], z[2 * b + i])
        for c in range(b):
            assert bool(pos[i, c]) == (i == c)
            assert bool(pos[b + i, c]) == (int(negatives[i]) == int(objects[c]))
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(2 * b, dtype=torch.float64))
    swapped = torch.cat([z[b : 2 * b], z[:b], z[2 * b :]])  # the two views of each sample swapped
    torch.testing.assert_close(pooled_view_rows(swapped, objects, negatives)[0], rows)
    with pytest.raises(ValueError, match="3B"):
        pooled_view_rows(z[:-1], objects, negatives)


def test_sample_form_of_all_pairs_gives_the_papers_loss():
    """Cross-entropy on the diagonal pairs of the all-pairs logits = Eq. 2 on the sample pairs."""
    b = 3
    all_logits = torch.randn(3 * b, b, 2, dtype=torch.float64)
    labels = torch.tensor([[1, 1, 0]] * b)
    per_sample = sample_logits(all_logits)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(
        pair_scores(per_sample), labels.double(), reduction="none"
    ).sum(1).mean()
    torch.testing.assert_close(cross_modal_loss(per_sample, labels), ce)


def test_point_lr_scale_gives_fp_its_own_learning_rate():
    from xmodal.config import resolve
    from xmodal.train.config import PretrainConfig
    from xmodal.train.distributed import DistContext
    from xmodal.train.model import build_optimizer, build_training_model

    cfg = resolve(PretrainConfig, "smoke", ["optim.point_lr_scale=10", "optim.lr=0.002"], group="pretrain")
    net = build_training_model(cfg, DistContext())
    opt, sched = build_optimizer(cfg, net)
    fp = {id(p) for p in net.point_encoder.parameters()}
    assert [g["lr"] for g in opt.param_groups] == [0.002, 0.02]
    assert {id(p) for p in opt.param_groups[1]["params"]} == fp
    assert not fp & {id(p) for p in opt.param_groups[0]["params"]}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))
    plain, _ = build_optimizer(resolve(PretrainConfig, "smoke", group="pretrain"), net)
    assert len(plain.param_groups) == 1


def test_adamw_keeps_the_groups_and_the_schedule():
    from xmodal.config import resolve
    from xmodal.train.config import PretrainConfig
    from xmodal.train.distributed import DistContext
    from xmodal.train.model import build_optimizer, build_training_model

    cfg = resolve(PretrainConfig, "smoke", ["optim.name=adamw", "optim.point_lr_scale=2", "optim.lr=0.001",
                                            "optim.weight_decay=0.01", "optim.step_size=2"], group="pretrain")
    net = build_training_model(cfg, DistContext())
    opt, sched = build_optimizer(cfg, net)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["lr"] for g in opt.param_groups] == [0.001, 0.002]
    assert all(g["weight_decay"] == 0.01 and g["betas"] == (0.9, 0.999) for g in opt.param_groups)
    for _ in range(2):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.0001, 0.0002])
    sgd, _ = build_optimizer(resolve(PretrainConfig, "smoke", group="pretrain"), net)
    assert isinstance(sgd, torch.optim.SGD)


def _trust_stepper(trust_value: float, scaler=None):
    from xmodal.config import resolve
    from xmodal.train.config import PretrainConfig
    from xmodal.train.distributed import DistContext
    from xmodal.train.model import build_optimizer, build_training_model
    from xmodal.train.step import Stepper

    cfg = resolve(PretrainConfig, "smoke", [f"optim.point_trust={trust_value}", "optim.lr=0.01",
                                            "optim.momentum=0", "optim.weight_decay=0",
                                            "model.freeze_point_bn=true"], group="pretrain")
    net = build_training_model(cfg, DistContext())
    opt, sched = build_optimizer(cfg, net)
    return net, Stepper(net, cfg, DistContext(), opt, sched, scaler=scaler)  # trust: from the config


class _RecordingScaler:
    """A stand-in for a CUDA fp16 GradScaler (scale 1024) that records the order of its calls."""

    def __init__(self):
        self.calls, self.scale_value = [], 1024.0

    def is_enabled(self):
        return True

    def scale(self, loss):
        self.calls.append("scale")
        return loss * self.scale_value

    def unscale_(self, optimizer):
        self.calls.append("unscale_")
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(self.scale_value)

    def step(self, optimizer):
        self.calls.append("step")
        optimizer.step()

    def update(self):
        self.calls.append("update")


def _check_one_trust_step(net, stepper, coefficient, lr=0.01):
    torch.manual_seed(1)
    loss = net.point_encoder(torch.randn(4, 64, 3)).pow(2).mean() + net.image_encoder(torch.randn(6, 3, 32, 32)).pow(2).mean()
    fp = [p for p in net.point_encoder.parameters() if p.dim() >= 2]
    img = [p for p in net.image_encoder.parameters() if p.dim() >= 2]
    fp_before = [p.detach().clone() for p in fp]
    img_before = [p.detach().clone() for p in img]
    stepper._backward(loss)
    for p, p0 in zip(fp, fp_before):
        # plain SGD (no momentum, no decay): the update is lr times the rescaled gradient, whose
        # norm is coefficient x the weights' norm
        torch.testing.assert_close(p.grad.norm(), coefficient * p0.norm(), rtol=1e-4, atol=0)
        torch.testing.assert_close((p.detach() - p0).norm() / p0.norm(), torch.tensor(lr * coefficient), rtol=1e-4, atol=0)
    for p, p0 in zip(img, img_before):  # Fimg keeps its raw gradient
        torch.testing.assert_close(p.detach(), p0 - lr * p.grad, rtol=1e-5, atol=1e-7)
    ratios = [float(p.grad.norm() / p0.norm()) for p, p0 in zip(img, img_before) if p.grad.abs().sum() > 0]
    assert max(ratios) > 1.5 * min(ratios)  # not rescaled: Fimg's relative gradients differ per layer


def test_point_trust_moves_every_fp_weight_by_the_same_fraction():
    """With optim.point_trust = 0.5 and plain SGD, one step changes each Fp weight tensor by exactly
    lr * 0.5 of its norm; Fimg's weights take their plain gradient."""
    net, stepper = _trust_stepper(0.5)
    _check_one_trust_step(net, stepper, 0.5)


def test_point_trust_under_a_grad_scaler_rescales_the_unscaled_gradients():
    """Rescaling before unscale_ would leave Fp's step 1024x too small: the exact fractions fail."""
    scaler = _RecordingScaler()
    net, stepper = _trust_stepper(0.5, scaler=scaler)
    _check_one_trust_step(net, stepper, 0.5)
    assert scaler.calls == ["scale", "unscale_", "step", "update"]


def test_stepper_takes_fp_weights_for_the_trust_ratio_through_a_compile_wrapper():
    """A Stepper built without trust= finds Fp's weights itself, also inside torch.compile's
    wrapper (what the trainer passes with compile=true), and none with the option off."""
    from xmodal.train.step import Stepper, unwrap_model
    from xmodal.train.trust import trust_params

    net, stepper = _trust_stepper(0.5)
    fp_weights = trust_params(net.point_encoder)
    assert len(fp_weights) > 4 and all(p.dim() >= 2 for p in fp_weights)
    assert [id(p) for p in stepper.trust] == [id(p) for p in fp_weights]
    compiled = torch.compile(net)  # wrapping compiles nothing until it is called
    assert unwrap_model(compiled) is net and unwrap_model(net) is net
    wrapped = Stepper(compiled, stepper.cfg, stepper.ctx, stepper.optimizer, stepper.scheduler)
    assert [id(p) for p in wrapped.trust] == [id(p) for p in fp_weights]
    assert _trust_stepper(0.0)[1].trust == ()


def test_unwrap_model_sees_through_ddp_and_compile(tmp_path):
    """DDP (a one-process gloo group) inside torch.compile: the trainer's wrapping under torchrun."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from xmodal.train.step import unwrap_model

    net = torch.nn.Linear(3, 2)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(net)
        assert unwrap_model(ddp) is net and unwrap_model(torch.compile(ddp)) is net
    finally:
        dist.destroy_process_group()


def test_point_trust_off_leaves_fp_gradients_alone():
    """Without the option the deep EdgeConv blocks move far less than the first (the imbalance it fixes)."""
    torch.manual_seed(0)
    net, stepper = _trust_stepper(0.0)
    loss = net.point_encoder(torch.randn(4, 64, 3)).pow(2).mean()
    fp = [p for p in net.point_encoder.parameters() if p.dim() >= 2]
    before = [p.detach().clone() for p in fp]
    stepper._backward(loss)
    moved = [float((p.detach() - p0).norm() / p0.norm()) for p, p0 in zip(fp, before)]
    assert max(moved) > 2 * min(moved)


def test_point_map_is_dgcnns_per_point_features_and_needs_them():
    from xmodal.errors import ConfigError
    from xmodal.models.dgcnn import DGCNN
    from xmodal.models.heads import PairClassifier
    from xmodal.train.model import XModalNet

    torch.manual_seed(0)
    fp = DGCNN(k=4, emb_dims=16)
    img = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 12))
    net = XModalNet(img, fp, PairClassifier(12, 16, hidden=8), point_map=True).eval()
    images, points = torch.randn(6, 3, 8, 8), torch.randn(2, 20, 3)
    out = net(images, points)
    want = fp.forward_features(points)
    assert out.pts_map.shape == (2, 16, 20)
    torch.testing.assert_close(out.pts_map, want["point"])
    torch.testing.assert_close(out.f_pts, want["global"])
    out2 = net(images, points, torch.randn(2, 20, 3))  # a second copy: the map is the first copy's
    torch.testing.assert_close(out2.pts_map, want["point"])
    assert XModalNet(img, fp, PairClassifier(12, 16, hidden=8)).eval()(images, points).pts_map is None
    with pytest.raises(ConfigError, match="Linear has no forward_features"):
        XModalNet(img, torch.nn.Linear(3, 16), PairClassifier(12, 16, hidden=8), point_map=True)
