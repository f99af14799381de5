"""xmodal: self-supervised 2D image + 3D point-cloud features from 3D shapes.

Pipeline (each stage writes to disk and has a CLI sub-command):
mesh folder -> ``prepare`` (views + points) -> ``pretrain`` (run) -> ``evaluate`` (report).
"""

__version__ = "0.1.0"


def load_encoders(run, device="cpu", **kwargs):
    """Load the pre-trained image and point encoders of a run (see :func:`xmodal.api.load_encoders`)."""
    from xmodal.api import load_encoders as _load

    return _load(run, device=device, **kwargs)


__all__ = ["__version__", "load_encoders"]
