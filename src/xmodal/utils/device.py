"""Device helpers shared by evaluation and feature extraction (torch imported lazily)."""

from __future__ import annotations

from typing import Any, Optional

from xmodal.errors import ConfigError

__all__ = ["default_device", "machine_device", "module_device", "cpu_has_native_bf16"]


def default_device(device: Any = None):
    """``device`` as a ``torch.device`` this machine has (:func:`machine_device`); ``None`` -> CUDA
    when available, else CPU."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return machine_device(device)


def machine_device(device: Any):
    """``device`` (a string or ``torch.device``) as a ``torch.device`` this machine has.

    Raises:
        ConfigError: not a device name, CUDA where this torch build or machine has none, or a CUDA
            index past the visible devices (torch would fail later with a bare assertion).
    """
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a device name ({exc})", hint="e.g. 'cpu', 'cuda' or 'cuda:0'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(device)!r} requested but CUDA is not available in this torch build/machine",
                              hint="use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def module_device(module, default: Any = "cpu"):
    """The device of ``module``'s first parameter, else of its first buffer (``default`` for a
    module with neither)."""
    import torch

    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device(default)


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> Optional[bool]:
    """Whether this CPU computes in bfloat16 natively (the ``avx512_bf16`` or ``amx_bf16`` flag of
    ``cpuinfo``); None where that cannot be told (no such file: not Linux). torch offers no public
    query of its own; without these instructions CPU bf16 autocast is emulated and can be slower
    than float32."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"}) if flags else None
