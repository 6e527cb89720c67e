"""One number formatter, for the console tables and summary.md alike: three significant digits below 10 (so a
CPU run's tiny TFLOP/s reads 0.0123 or 3.31e-05, never 0), one decimal up to 100, whole numbers with thousands
separators from there."""

from __future__ import annotations

import math


def fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
