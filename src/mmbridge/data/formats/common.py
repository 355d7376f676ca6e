"""Shared by the format readers: counting what was skipped instead of crashing on it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ReadStats:
    """What a reader saw: ``read`` good samples, ``skipped`` bad ones (with reasons)."""

    read: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # the first few error messages, for the log

    def skip(self, reason: str, detail: str = "") -> None:
        self.skipped += 1
        self.reasons[reason] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{reason}: {detail}" if detail else reason)

    def handler(self, exn: Exception) -> bool:
        """A webdataset ``handler=``: count the failure and carry on."""
        self.skip(type(exn).__name__, str(exn)[:200])
        return True
