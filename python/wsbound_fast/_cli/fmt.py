"""Numbers printed so that printed bounds still hold: rounded down (lower bounds) or up (upper)."""

from __future__ import annotations

import math
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

__all__ = ["directed", "directed_digits"]


def _quantized(x: float, digits: int, up: bool) -> Decimal:
    d = Decimal(x)  # exact
    quantum = Decimal(1).scaleb(d.adjusted() - digits + 1)
    return d.quantize(quantum, rounding=ROUND_CEILING if up else ROUND_FLOOR)  # at most digits + 1 digits


def directed(x: float, digits: int, up: bool) -> str:
    """``x`` to ``digits`` significant digits, rounded down (or up): printed bounds still hold."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    return f"{float(_quantized(x, digits, up)):.{digits + 1}g}"  # the float nearest q prints back as q


def directed_digits(x: float, digits: int, up: bool) -> str:
    """As :func:`directed`, keeping the trailing zeros (1.0240, not 1.024): for table columns."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    return format(_quantized(x, digits, up), "f")
