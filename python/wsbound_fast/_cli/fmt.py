"""Numbers printed so that printed bounds still hold: rounded down (lower bounds) or up (upper)."""

from __future__ import annotations

import math

__all__ = ["directed"]


def directed(x: float, digits: int, up: bool) -> str:
    """``x`` to ``digits`` significant digits, rounded down (or up): printed bounds still hold."""
    from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    d = Decimal(x)  # exact
    quantum = Decimal(1).scaleb(d.adjusted() - digits + 1)
    q = d.quantize(quantum, rounding=ROUND_CEILING if up else ROUND_FLOOR)  # at most digits + 1 digits
    return f"{float(q):.{digits + 1}g}"  # the float nearest q prints back as q (no trailing zeros)
