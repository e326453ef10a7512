"""Names users give that become one folder of a path or one part of an object key (runs, sweeps, recipes).

No dependencies: recipes are validated where pyarrow is not installed (benchmarks/gpu_check.py).
"""

from __future__ import annotations

import re

NAME_MAX = 128
NAME_RULE = f"a name is 1-{NAME_MAX} of the characters A-Z a-z 0-9 . _ - and does not start with '.'"
_NAME_CHAR = re.compile(r"[A-Za-z0-9._-]")


def check_name(name: str, what: str = "") -> str:
    """A user-given name that becomes one folder of a path or object key (a run, a sweep), checked the same way
    for local and S3 storage: it cannot climb out of its parent ('..', '/', '\\') or hide ('.x'). Returns it."""
    if not name:
        reason = "is empty"
    elif len(name) > NAME_MAX:
        reason = f"is {len(name)} characters long"
    else:
        bad = next((c for c in name if not _NAME_CHAR.fullmatch(c)), None)
        reason = f"contains {bad!r}" if bad else "starts with '.'" if name.startswith(".") else ""
    if reason:
        raise ValueError(f"{what + ': ' if what else ''}{name!r} {reason} ({NAME_RULE})")
    return name
