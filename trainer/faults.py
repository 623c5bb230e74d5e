"""Fault injection for the reliability tests: NaN losses, failed writes, crashes mid-save.

Faults are switched on by the environment variable EDDY_INJECT_FAULTS, a comma-separated list of
`kind@step` entries, and are off (an empty set) otherwise:

    nan_loss@S           the loss of optimizer step S (0-based, before the update) is NaN on every rank
                         (a transient fault: once per process, so a rollback past S does not meet it again)
    save_error@S         writing the checkpoint of step S fails with "No space left on device"
    crash_before_commit@S  the process dies (exit 137, like kill -9) after writing the checkpoint of
                         step S but before committing it

A step may be listed more than once with different kinds.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

KINDS = ("nan_loss", "save_error", "crash_before_commit")


@dataclass
class Faults:
    at: dict[str, frozenset[int]] = field(default_factory=dict)
    fired: set[tuple[str, int]] = field(default_factory=set)

    @classmethod
    def from_env(cls) -> "Faults":
        spec = os.environ.get("EDDY_INJECT_FAULTS", "").strip()
        at: dict[str, set[int]] = {}
        for entry in filter(None, (e.strip() for e in spec.split(","))):
            kind, _, step = entry.partition("@")
            if kind not in KINDS or not step.isdigit():
                raise ValueError(f"EDDY_INJECT_FAULTS entry {entry!r}: expected KIND@STEP with KIND in {KINDS}")
            at.setdefault(kind, set()).add(int(step))
        return cls({k: frozenset(v) for k, v in at.items()})

    def __call__(self, kind: str, step: int) -> bool:
        """Whether fault `kind` strikes at `step`; each (kind, step) strikes once per process."""
        if step not in self.at.get(kind, ()) or (kind, step) in self.fired:
            return False
        self.fired.add((kind, step))
        return True

    def save_hook(self, step: int):
        """A callback for write_checkpoint, run after the files are written and before the commit."""
        if self("save_error", step):
            def fail():
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            return fail
        if self("crash_before_commit", step):
            return lambda: os._exit(137)
        return None
