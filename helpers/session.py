"""The wall clock of a training session: checkpoints every N minutes, and a clean stop before the session ends.

Colab and Kaggle end a session after at most 12 hours. With `session_hours` set, training stops with a checkpoint
once this session has trained that long, and the next session resumes the same plan (max_steps, LR schedule and
data stream come from the run's config and checkpoint, not from the clock). `checkpoint_minutes` bounds what an
abrupt end loses. Decisions are taken on the main process's clock and shared, so all processes stop together.
"""
from __future__ import annotations

import itertools
import os
import time

# A rehearsal of the session loop (the README's Colab commands in CI): each reading of the clock (once per training
# step; twice with checkpoint_minutes) advances this many seconds, so where a session stops does not depend on the host.
SIMULATED_SECONDS = "HELPERS_SIMULATED_CLOCK_TICK"


def session_time():
    """The clock sessions are measured on: the wall clock, or the simulated one of SIMULATED_SECONDS."""
    step = os.environ.get(SIMULATED_SECONDS)
    return itertools.count(0.0, float(step)).__next__ if step else time.monotonic


class SessionClock:
    def __init__(self, checkpoint_minutes: float = 0.0, session_hours: float = 0.0, now=None):
        now = now or session_time()
        self.now, self.every, self.limit = now, checkpoint_minutes * 60, session_hours * 3600
        self.start = self.last_checkpoint = now()

    def checkpoint_due(self) -> bool:
        return self.every > 0 and self.now() - self.last_checkpoint >= self.every

    def session_over(self) -> bool:
        return self.limit > 0 and self.now() - self.start >= self.limit

    def checkpointed(self) -> None:
        self.last_checkpoint = self.now()

    def describe(self) -> str:
        parts = []
        if self.every > 0:
            parts.append(f"a checkpoint at least every {self.every / 60:g} min")
        if self.limit > 0:
            parts.append(f"this session stops with a checkpoint after {self.limit / 3600:g} h of training "
                         f"(session_hours); run the same command again to resume")
        return "; ".join(parts)
