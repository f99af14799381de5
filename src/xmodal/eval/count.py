"""A trivial evaluation task: the number of test objects per class (an example task)."""

from __future__ import annotations

import numpy as np

from xmodal.eval.context import TEST


def count_task(ctx) -> None:
    """``count.test_objects`` and ``count.min_per_class`` of the test split."""
    labels = ctx.store.split(TEST).labels
    ctx.put("count.test_objects", int(labels.shape[0]))
    ctx.put("count.min_per_class", int(np.bincount(labels).min()))


def section_count(m) -> list[str]:
    return ["## Test split", "", f"{m.get('count.test_objects')} objects, at least "
            f"{m.get('count.min_per_class')} per class.", ""]
