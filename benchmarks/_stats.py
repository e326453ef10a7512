"""Medians of repeated benchmark runs, keeping every run's figures for the raw JSON."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def medians(runs: list[dict]) -> dict:
    """One row from repeated runs: the median of every numeric field, `runs` (each run's figures), and
    `<field>_min`/`<field>_max` for the throughput fields so a table can show the spread."""
    row: dict = {"repeats": len(runs), "runs": runs}
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in runs]
            row[key] = statistics.median(values)
            if key.endswith("_per_s"):
                row[f"{key}_min"], row[f"{key}_max"] = min(values), max(values)
    return row


def spread(row: dict, key: str) -> str:
    """'15,658 (15,100-16,020, n=3)' for a median row; just the figure for a single run."""
    if row.get("repeats", 1) < 2:
        return f"{row[key]:,.0f}"
    return f"{row[key]:,.0f} ({row[key + '_min']:,.0f}-{row[key + '_max']:,.0f}, n={row['repeats']})"


def earlier_section(path: Path, section: str) -> dict | None:
    """`section` of an earlier run's JSON (a benchmark asked to re-measure only its other half), announced
    with the date it was measured."""
    old = json.loads(path.read_text()).get(section) if path.exists() else None
    if old is not None:
        print(f"{section} section kept from the run of {old.get('measured', 'an earlier day')}")
    return old
