"""Tiles of the upper triangle of block pairs, for running the pair sum as independent tasks
(on dask workers: ``_backends/distributed.py``; docs/design.md, "On a cluster").

A tile is a rectangle of the block grid: the blocks of row group a against those of column
group b (a <= b), of ``group`` blocks each, and its pairs (i, j) with i <= j.  One task computes
the features of the tile's blocks once and then each of its pairs.  How the pairs are cut into
tiles decides only where and how often features are computed, never a pair's value, so any
tile plan gives the same pair sums, bit for bit; the plan is free to depend on the cluster.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from .cost import feature_doubles, feature_flops, pair_flops

#: At least this many tiles per worker thread (when the blocks allow it), so that a slow or
#: lost worker's share can be taken over and the last tiles do not idle the others.
TILES_PER_THREAD = 4

#: Features are recomputed once per tile that references a block; tiles are made large enough
#: (when the parallelism allows) that this stays below 1/RECOMPUTE_FACTOR of the pair work.
RECOMPUTE_FACTOR = 100.0


class TilePlan(NamedTuple):
    """``group`` blocks per tile side; ``tiles``: each tile's pairs (i, j), i <= j, rows then
    columns increasing; ``memory_bytes``: what one task holds at most (features of its blocks)."""

    group: int
    tiles: list[list[tuple[int, int]]]
    memory_bytes: int

    @property
    def n_pairs(self) -> int:
        return sum(len(t) for t in self.tiles)


def tiles_of(n_blocks: int, group: int) -> list[list[tuple[int, int]]]:
    """The tiles (a, b), a <= b, of groups of ``group`` consecutive blocks, row-major; every pair
    (i, j), 0 <= i <= j < n_blocks, is in exactly one of them."""
    groups = [range(g0, min(g0 + group, n_blocks)) for g0 in range(0, n_blocks, group)]
    out = []
    for a, rows in enumerate(groups):
        for cols in groups[a:]:
            out.append([(i, j) for i in rows for j in cols if j >= i])
    return out


def plan_tiles(dims: Sequence[int], has_bias: Sequence[bool], n_samples: int, batch: int, hessian: bool,
               structured: bool, worker_threads: int, task_memory: int | None = None) -> TilePlan:
    """The tiles for ``worker_threads`` tasks running at once (all workers' threads together),
    each within ``task_memory`` bytes of features (None: no limit).

    group = the largest that still gives TILES_PER_THREAD tiles per thread, raised towards what
    keeps the recomputed features under 1/RECOMPUTE_FACTOR of the pair work if that costs at
    most half the wanted tiles, and lowered until two groups of features fit in task_memory.
    """
    nb = max(1, math.ceil(n_samples / batch))
    ratio = feature_flops(dims, hessian, structured) / pair_flops(dims, has_bias, hessian, structured)
    # tiles = G (G + 1) / 2 for G groups: G >= sqrt(2 * wanted) gives the wanted count
    wanted = TILES_PER_THREAD * max(1, worker_threads)
    g_par = max(1, nb // max(1, math.ceil(math.sqrt(2 * wanted))))
    g_rec = max(1, math.ceil(2 * RECOMPUTE_FACTOR * ratio / batch))  # features / pairs = 2 ratio / (g B)
    g_half = max(1, nb // max(1, math.ceil(math.sqrt(wanted))))  # half the wanted tiles
    group = max(g_par, min(g_rec, g_half))
    per_block = 8 * batch * feature_doubles(dims, has_bias, hessian, structured)
    if task_memory is not None:
        group = max(1, min(group, task_memory // max(1, 2 * per_block)))
    group = min(group, nb)
    return TilePlan(group, tiles_of(nb, group), 2 * group * per_block)


#: Most tasks of one curvature-vector product on a cluster (each returns a (k, P) partial), and
#: the fewest samples one takes (a task costs the scheduler about a millisecond, and Lanczos
#: waits for each product).
MAX_PRODUCT_TASKS = 64
PRODUCT_TASK_SAMPLES = 2048


def product_groups(n_blocks: int, batch: int, min_samples: int = PRODUCT_TASK_SAMPLES,
                   max_tasks: int = MAX_PRODUCT_TASKS) -> list[list[int]]:
    """Consecutive blocks per task of a product: at least ``min_samples`` samples and at most
    ``max_tasks`` groups, fixed by the blocks alone (not by the workers), so that the sum is
    the same for any cluster."""
    per = max(1, math.ceil(n_blocks / max_tasks), math.ceil(min_samples / batch))
    return [list(range(g, min(g + per, n_blocks))) for g in range(0, n_blocks, per)]
