"""Size limits of the Triton kernels, checked on the host before a launch.

* **int32 indices.** The kernels hold pixel, memory-entry and point indices in int32:
  program ids times tile sizes, the argmin index of the matching kernels (``ridx``,
  ``bidx``), the memory index in the low word of top-k's sort keys, the split bounds of
  the reductions over N. Every such count must stay below :data:`INDEX_LIMIT`
  (``2^31 - 2^20``: room for a tile's padding past the last index). Element offsets are
  int64 throughout, so a tensor may hold more than ``2^31`` elements.
* **Grid.** CUDA launches at most ``2^31 - 1`` programs along grid axis x and 65535
  along y and z (CUDA C++ Programming Guide, "Compute capabilities", table "Technical
  specifications"). Every Triton kernel here puts the batch on its last grid axis; the
  op entries of :mod:`vos_kernels.triton` split a larger batch into slices of at most
  :data:`BATCH_SLICE` (every op is independent across batch elements). Other axes (labels,
  channel blocks) past the limit raise :class:`ValueError`.

The CUDA C++ kernels have their own checks (``csrc/cuda/*_glue.cpp``): the same int32
counts, and they loop over batch slices in their launchers.
"""
from __future__ import annotations

INDEX_LIMIT = 2**31 - 2**20
GRID_X_LIMIT = 2**31 - 1
GRID_YZ_LIMIT = 65535
BATCH_SLICE = GRID_YZ_LIMIT


def check_count(op: str, what: str, value: int) -> None:
    """ValueError when ``value`` (a count the kernels index in int32) is not below INDEX_LIMIT."""
    if int(value) >= INDEX_LIMIT:
        raise ValueError(
            f"vos_kernels.triton.{op}: {what} = {int(value)} is beyond the int32 indexing of the "
            f"Triton kernels (must be below 2^31 - 2^20 = {INDEX_LIMIT}); split the input")


def launch_grid(op: str, **axes: int) -> tuple:
    """The grid ``tuple(axes.values())`` (x, then y, then z), or ValueError naming the axis
    past CUDA's limit. ``axes`` maps a readable name of each axis (``labels=L``) to its size."""
    grid = tuple(int(v) for v in axes.values())
    for i, (name, size) in enumerate(zip(axes, grid)):
        limit = GRID_X_LIMIT if i == 0 else GRID_YZ_LIMIT
        if size > limit:
            axis = "xyz"[i]
            raise ValueError(
                f"vos_kernels.triton.{op}: {size} {name.replace('_', ' ')} exceed the CUDA grid limit "
                f"({limit} programs along grid axis {axis})")
    return grid
