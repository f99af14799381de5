"""Device helpers (xmodal.utils.device) and the CPU autocast choice that reads them."""

import logging

import torch

import xmodal.train.model as model_mod
from xmodal.train.model import autocast_dtype
from xmodal.utils.device import cpu_has_native_bf16


def _cpuinfo(tmp_path, flags):
    p = tmp_path / "cpuinfo"
    p.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    return str(p)


def test_native_bf16_read_from_the_cpu_flags(tmp_path):
    assert cpu_has_native_bf16(_cpuinfo(tmp_path, "fpu sse2 avx2 avx512f avx512_bf16")) is True
    assert cpu_has_native_bf16(_cpuinfo(tmp_path, "fpu sse2 avx2 amx_tile amx_bf16")) is True
    assert cpu_has_native_bf16(_cpuinfo(tmp_path, "fpu sse2 avx2 avx512f avx512bw")) is False
    assert cpu_has_native_bf16(str(tmp_path / "absent")) is None
    (tmp_path / "noflags").write_text("processor\t: 0\n")
    assert cpu_has_native_bf16(str(tmp_path / "noflags")) is None


def test_cpu_bf16_warns_only_without_native_support(monkeypatch, caplog):
    cpu = torch.device("cpu")
    for native, warned in ((False, True), (True, False), (None, False)):
        monkeypatch.setattr(model_mod, "cpu_has_native_bf16", lambda native=native: native)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="xmodal.train.model"):
            assert autocast_dtype("bf16", cpu) is torch.bfloat16
        assert ("emulated" in caplog.text) is warned
    assert autocast_dtype("off", cpu) is None


def test_cpu_auto_is_bf16_only_where_the_cpu_has_it_natively(monkeypatch, caplog):
    """amp=auto never runs emulated bf16 (8.6x slower than float32 for the cpu preset's step)."""
    cpu = torch.device("cpu")
    for native, dtype in ((True, torch.bfloat16), (False, None), (None, None)):
        monkeypatch.setattr(model_mod, "cpu_has_native_bf16", lambda native=native: native)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="xmodal.train.model"):
            assert autocast_dtype("auto", cpu) is dtype
        assert "amp=auto: " + ("bf16" if dtype else "float32") in caplog.text
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # a choice, not a problem


def test_every_device_path_refuses_cuda_on_a_machine_without_it(monkeypatch):
    """The API, evaluation (default_device) and training (resolve_device) share machine_device."""
    import pytest

    from xmodal.errors import ConfigError
    from xmodal.train.distributed import resolve_device
    from xmodal.utils.device import default_device, machine_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for call in (lambda: machine_device("cuda"), lambda: default_device("cuda:0"), lambda: resolve_device("cuda")):
        with pytest.raises(ConfigError, match="CUDA is not available") as info:
            call()
        assert info.value.hint == "use device='cpu'"
    assert default_device(None) == torch.device("cpu") == resolve_device("auto") == default_device("cpu")
