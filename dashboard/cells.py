"""How table cells read: NaN and ±Inf spelled out, a missing time blank (never "None" or "NaT"), severities in
colour, long decimals in messages rounded."""

from __future__ import annotations

import math
import re
from datetime import datetime

import pandas as pd

# Backgrounds light enough for dark text, one per alert severity.
SEVERITY_STYLES = {"block": "background-color: #ffb3b3; color: #7a0000; font-weight: 600",
                   "critical": "background-color: #ffd6d6; color: #8b1a1a",
                   "warning": "background-color: #ffe8c2; color: #6b4500",
                   "info": "background-color: #dcebff; color: #0b3d75"}
# A decimal with more digits than a person reads (0.30000000000000004, 2.891095021740674, 1.2e-05 stays).
_LONG_DECIMAL = re.compile(r"(?<![\w.])-?\d+\.\d{5,}(?:[eE][-+]?\d+)?(?![\w.])")


def number_text(value: float | None, digits: str = ".4f") -> str:
    if value is None:
        return ""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return format(value, digits)


def when_text(value: datetime | None) -> str:
    """A UTC time to the second, or blank for none (an incident still firing has no resolved time)."""
    if value is None or pd.isna(value):
        return ""
    return f"{value:%Y-%m-%d %H:%M:%S}"


def severity_style(severity: str) -> str:
    return SEVERITY_STYLES.get(severity, "")


def rounded(message: str) -> str:
    """`message` with each long decimal to 4 significant digits: gate messages carry raw floats."""
    return _LONG_DECIMAL.sub(lambda match: format(float(match.group()), ".4g"), message)
