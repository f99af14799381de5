"""Distributed helpers: GlobalBatchNorm / convert_batchnorm, and a 2-process torchrun run
that must reproduce the single-process losses."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from xmodal.config import resolve
from xmodal.data.store import write_store
from xmodal.train.config import PretrainConfig
from xmodal.train.distributed import GlobalBatchNorm, convert_batchnorm, env_world, resolve_device
from xmodal.train.trainer import pretrain
from xmodal.utils.io import read_json, read_jsonl


def test_global_batchnorm_without_group_is_batchnorm():
    torch.manual_seed(0)
    for ref, x in ((nn.BatchNorm1d(5), torch.randn(7, 5, 3)), (nn.BatchNorm2d(4), torch.randn(3, 4, 5, 6))):
        ref.weight.data.uniform_(0.5, 1.5)
        ref.bias.data.uniform_(-1, 1)
        g = convert_batchnorm(nn.Sequential(ref), "cpu", world_size=2)[0]
        assert isinstance(g, GlobalBatchNorm)
        assert g.weight is ref.weight and g.running_mean is ref.running_mean  # shared, same state-dict keys
        assert set(g.state_dict()) == set(nn.BatchNorm1d(5).state_dict())
        # outside a process group it computes exactly what BatchNorm does, running stats included
        plain = type(ref)(ref.num_features)
        plain.load_state_dict(ref.state_dict())
        torch.testing.assert_close(g(x), plain(x))
        torch.testing.assert_close(g.running_var, plain.running_var)


def test_convert_batchnorm_single_process_is_a_no_op():
    m = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    assert convert_batchnorm(m, "cpu", world_size=1) is m
    assert isinstance(m[1], nn.BatchNorm2d)


def test_env_and_device(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert env_world() == (1, 2, 1)
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            resolve_device("cuda:0")


def _store(root, n=6, views=4, size=32, points=128, seed=0):
    rng = np.random.default_rng(seed)
    train = {
        "ids": [f"o{i}" for i in range(n)],
        "labels": np.arange(n) % 2,
        "points": rng.normal(size=(n, points, 3)).astype(np.float32),
        "images": rng.integers(0, 256, size=(n, views, size, size), dtype=np.uint8),
    }
    return write_store(root, classes=["a", "b"], splits={"train": train})


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_processes_match_one(tmp_path):
    data = tmp_path / "data"
    _store(data)
    overrides = ["iterations=4", "checkpoint_every=4", "batch_size=4"]
    one = tmp_path / "one"
    pretrain(data, one, resolve(PretrainConfig, "smoke", overrides, group="pretrain"), progress=False)

    two = tmp_path / "two"
    # same intra-op thread count as this process: DGCNN's k-NN and max-pooling make discrete choices
    # that a different float summation order can flip, which the chaotic early training then amplifies
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        "-m", "xmodal.train.distributed", "--data", str(data), "--out", str(two), "--preset", "smoke", "--quiet",
        *overrides,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert read_json(two / "run.json")["world_size"] == 2
    a, b = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("loss", "triplet", "cross", "cm_acc"):
        np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=1e-4, atol=1e-5, err_msg=key)
    # the final weights agree too (global BatchNorm running statistics included)
    from safetensors.torch import load_file

    wa, wb = load_file(str(one / "encoders.safetensors")), load_file(str(two / "encoders.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k].float(), wa[k].float(), rtol=1e-3, atol=1e-4, msg=k)
