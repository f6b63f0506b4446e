"""Byte counts as people read them: MiB (2**20 bytes), the unit of every budget, plan and report (torch-free)."""

from __future__ import annotations

MIB = 2**20


def mib(n_bytes: int | float) -> float:
    return n_bytes / MIB


def fmt_mib(n_bytes: int | float, digits: int = 1) -> str:
    """`1,234.5 MiB`: how plans, reports and logs print a byte count."""
    return f"{n_bytes / MIB:,.{digits}f} MiB"
