"""Shared by the benchmarks that time value passes: switch off the two shortcuts of a value
pass (attention row by row, blocks below the edit kept per layout) to time the passes as they
ran before them, on the same machine and in the same process layout."""

from __future__ import annotations

from contextlib import nullcontext


def use_dense_passes() -> None:
    """Every value pass from here on attends over the whole packed sequence under its mask and
    runs every block (the results agree to rounding; only the time differs)."""
    import memedit.intrinsic.layer_cache as layer_cache
    import memedit.intrinsic.values as values

    values.supports_row_attention = lambda _model: False  # type: ignore[assignment]
    layer_cache.BelowCache.run = lambda _self, _owner: nullcontext()  # type: ignore[assignment,method-assign]
