"""The bridge's kill points: SIGKILL at the N-th pass of a named step
(fault injection, as the core's kill points; the steps are in ``bridge``).

``SHM_TASKWORK_KILLPOINT=bridge_read|bridge_claimed|bridge_added|bridge_recorded|bridge_settled[:N]``
arms one of them for the whole process: one counter, shared by the read loop
and the watcher thread.
"""
from __future__ import annotations

import os
import signal

KILLPOINTS = ("bridge_read", "bridge_claimed", "bridge_added", "bridge_recorded",
              "bridge_settled")


def _killpoint_switch() -> tuple[str | None, int]:
    env = os.environ.get("SHM_TASKWORK_KILLPOINT", "")
    name, _, n = env.partition(":")
    if name not in KILLPOINTS:
        return None, 0
    try:
        return name, max(1, int(n.split(":")[0])) if n else 1
    except ValueError:
        return name, 1


_KP, _KP_LEFT = _killpoint_switch()


def killpoint(name: str) -> None:
    global _KP_LEFT
    if name == _KP:
        _KP_LEFT -= 1
        if _KP_LEFT == 0:
            os.kill(os.getpid(), signal.SIGKILL)
