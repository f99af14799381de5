"""Evaluation of pre-trained encoders: the paper's pretext metrics and transfer tasks.

Entry point: :func:`xmodal.eval.runner.evaluate` (``xmodal evaluate`` on the command line).
"""


def evaluate(*args, **kwargs):
    """See :func:`xmodal.eval.runner.evaluate`."""
    from xmodal.eval.runner import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


__all__ = ["evaluate"]
