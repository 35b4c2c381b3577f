"""Processes as /proc shows them (Linux), for tests that kill commands and look for survivors."""

from __future__ import annotations

import os
import time


def process_table() -> dict[int, dict]:
    """pid -> {"ppid", "pgid", "cmdline"} of every live process (zombies are dead: left out)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # exited while we looked
            continue
        if fields[0] != "Z":
            table[int(entry)] = {"ppid": int(fields[1]), "pgid": int(fields[2]), "cmdline": cmdline}
    return table


def descendants(pid: int, table: dict | None = None) -> set[int]:
    table = process_table() if table is None else table
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, info in table.items() if info["ppid"] in frontier} - found
        found |= frontier
    return found


def survivors(pids: set[int], pgid: int | None = None, timeout: float = 10.0) -> dict[int, str]:
    """Which of ``pids`` (and of process group ``pgid``) are still alive after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        table = process_table()
        alive = {p: table[p]["cmdline"] for p in pids if p in table}
        if pgid is not None:
            alive.update({p: info["cmdline"] for p, info in table.items() if info["pgid"] == pgid})
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)
