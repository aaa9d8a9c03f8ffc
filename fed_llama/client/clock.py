"""When the site's process started: with the handler's own clock, how much of Flower's
hand-over of a message is the new ClientApp process starting (importing Flower, installing
the app, loading it) rather than the SuperNode noticing the message and starting it."""

from __future__ import annotations

import os
from pathlib import Path


def process_started_at(proc: Path = Path("/proc")) -> float | None:
    """This process's start on the wall clock (seconds since the epoch), from Linux's
    ``/proc/self/stat`` and the boot time in ``/proc/stat``; None where they cannot be read."""
    try:
        stat = (proc / "self" / "stat").read_text()
        # the command name (2nd field) may hold spaces: the fields after it follow its ')'
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22: starttime
        boot = next(int(line.split()[1]) for line in (proc / "stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None
