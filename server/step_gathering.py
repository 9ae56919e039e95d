"""How long the compute thread waits for the decode steps of sessions that usually share its forward.

Sessions decoding together drift out of step: their clients compute their LM heads on shared cores
and send the next step a few ms apart, so the first step to arrive would run alone and the rest
merged after it, two forwards where one would do. Measured with scripts/bench_throughput.py (8
sessions, 2-server swarm on this 2-core machine, shared with other jobs): 40% of the first server's
compute went into such lone steps.

So, when some of the sessions that recently ran with a merge key are queued again and others are
not, the worker waits for the missing ones, at most GATHER_FRACTION of that key's last forward
(running a lone step would cost the server about as much as a forward; waiting costs it nothing),
and stops waiting as soon as they are all queued. A session counts as recent for ACTIVE_FORWARDS
forward durations after its last step, so one that stops decoding is waited for briefly, a few
times at most, and a session that decodes alone (one user) has no one to wait for: an idle server
answers at once, as before.

This module is pure (no threads, no torch): the compute worker asks it and sleeps.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Iterable

GATHER_FRACTION = 0.5  # of the key's last forward's duration: the longest wait for its missing sessions
MAX_GATHER_WAIT = 0.05  # seconds: never wait longer, however slow the forward
ACTIVE_FORWARDS = 3.0  # a session is expected again for this many forward durations after its last step


class StepGathering:
    def __init__(self) -> None:
        # By merge key: when each session last ran a step with it (monotonic seconds; sessions weakly
        # held, so a closed session's cache is freed as usual), and how long its last forward took.
        self._last_step: dict[Hashable, weakref.WeakKeyDictionary[object, float]] = {}
        self._duration: dict[Hashable, float] = {}

    def ran(self, merge_key: Hashable, sessions: Iterable[object], seconds: float, now: float) -> None:
        """A forward of inference steps with `merge_key` ran the steps of `sessions` in `seconds`, ending at `now`."""
        last_step = self._last_step.setdefault(merge_key, weakref.WeakKeyDictionary())
        for session in sessions:
            last_step[session] = now
        self._duration[merge_key] = seconds

    def wait_for(self, queued: dict[Hashable, set[object]], now: float) -> float:
        """Seconds worth waiting at `now` for missing sessions, given the sessions queued per merge key; 0: run now."""
        wait = 0.0
        for key, sessions in queued.items():
            last_step, seconds = self._last_step.get(key), self._duration.get(key, 0.0)
            if not last_step:
                continue
            expected = {session for session, at in list(last_step.items()) if now - at <= ACTIVE_FORWARDS * seconds}
            if expected & sessions and not expected <= sessions:
                wait = max(wait, min(GATHER_FRACTION * seconds, MAX_GATHER_WAIT))
        return wait
