"""Which objects a part of a sharded ``prepare`` builds: ``--shard I/N``.

``prepare`` cuts every split of its plan into chunks of ``chunk_size`` objects (in plan order),
one shard file per chunk. :func:`plan_chunks` numbers these chunks globally, train first, then
test, then any other split, in plan order: ``g = 0, 1, 2, ...``. Shard ``I`` of ``N`` (1-based)
builds exactly the chunks with ``g mod N == I - 1``: a deterministic split that depends only on
the plan (the sorted object list and ``chunk_size``), never on the machine.

Because a part builds whole chunks of the unsharded plan, with each object's cameras and points
seeded by ``(seed, object id)`` as always, its shard files are exactly the files an unsharded
build writes for those chunks: merging the parts (:mod:`xmodal.data.merge`) only gathers files.
Round robin rather than contiguous blocks spreads each class (ids are sorted by class) and both
splits over all parts, so parts take about the same time; they differ by at most one chunk.
"""

from __future__ import annotations

from typing import Mapping, Optional

from xmodal.errors import ConfigError

__all__ = ["parse_shard", "format_shard", "plan_chunks", "shard_chunks"]


def parse_shard(text: Optional[str]) -> Optional[tuple[int, int]]:
    """``"2/3"`` -> ``(2, 3)``; ``""`` or None -> None (not sharded).

    Raises:
        ConfigError: not of the form ``I/N`` with ``1 <= I <= N``.
    """
    if text is None or str(text).strip() == "":
        return None
    index, sep, count = str(text).strip().partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = 0
    if not sep or n < 1 or not 1 <= i <= n:
        raise ConfigError(f"shard must read I/N with 1 <= I <= N (e.g. 2/3, the second of 3 parts), got {text!r}")
    return i, n


def format_shard(shard: tuple[int, int]) -> str:
    """``(2, 3)`` -> ``"2/3"``."""
    return f"{int(shard[0])}/{int(shard[1])}"


def plan_chunks(sizes: Mapping[str, int], chunk_size: int) -> list[tuple[str, int]]:
    """``(split, chunk)`` of every chunk of a plan, in global order.

    ``sizes``: objects per split, in the plan's split order (train, test, others).
    """
    out = []
    for split, n in sizes.items():
        out.extend((split, c) for c in range((int(n) + chunk_size - 1) // chunk_size))
    return out


def shard_chunks(sizes: Mapping[str, int], chunk_size: int, shard: Optional[tuple[int, int]]) -> list[tuple[str, int]]:
    """The chunks part ``shard = (I, N)`` builds (every chunk when ``shard`` is None), in global order."""
    chunks = plan_chunks(sizes, chunk_size)
    if shard is None:
        return chunks
    i, n = shard
    return [c for g, c in enumerate(chunks) if g % n == i - 1]
