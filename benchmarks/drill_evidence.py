"""What a drill's verdict rests on: the run folder's history rows and round seals, and the
processes' exits — never a hard-coded result.

- rounds lost: rounds of ``1..expected`` without a completed history row and checkpoint;
- rounds applied twice: a round number with two rows, a round that had completed before a
  restart and was run again after it (its row changed), or a seal whose starting adapter is
  not the previous round's checkpoint (a round trained on a state it had already changed);
- the seal chain and the checkpoints: ``fed-llama audit``'s checks
  (:mod:`fed_llama.server.audit`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fed_llama import wire

Row = dict[str, Any]

COLUMNS = ["drill", "sites", "rounds done", "rounds lost", "rounds applied twice",
           "updates refused", "wall s", "result"]
"""The drill table's columns (``note`` follows in the JSON and the docs)."""


def history(out: Path) -> list[Row]:
    """The run folder's history rows ([] when there are none yet, or the file is mid-write)."""
    try:
        rows = json.loads((out / "history.json").read_text())
    except (OSError, ValueError):
        return []
    return rows if isinstance(rows, list) else []


def completed(out: Path, rows: list[Row]) -> list[int]:
    """The rounds with a history row that did not fail and a checkpoint (as ``fed-llama
    audit`` counts them)."""
    from fed_llama.server.audit import completed_rounds
    from fed_llama.server.checkpoint import RunStore

    return completed_rounds(RunStore(out), rows)


def rounds_lost(done: list[int], expected: int) -> int:
    return len(set(range(1, expected + 1)) - set(done))


def rerun_rounds(before: list[Row], after: list[Row]) -> list[int]:
    """Rounds complete in ``before`` (a snapshot taken before a restart) whose row in
    ``after`` differs in anything ``before`` held, or that appear twice in ``after``: rounds
    trained again. (A round's evaluation carried by the next round's training adds to its row
    afterwards, and changes nothing it held.)"""
    seen: dict[int, int] = {}
    for row in after:
        seen[int(row["round"])] = seen.get(int(row["round"]), 0) + 1
    twice = {r for r, n in seen.items() if n > 1}
    now = {int(r["round"]): r for r in after}
    for row in before:
        r = int(row["round"])
        if "failed" not in row and r in now and any(not _same(now[r].get(k), v)
                                                    for k, v in row.items()):
            twice.add(r)
    return sorted(twice)


def _same(a: Any, b: Any) -> bool:
    """Equal, a NaN (a metric a row may hold, read twice from JSON) equal to a NaN."""
    return bool(a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b))


def seal_chain(out: Path, keys: Path) -> tuple[bool, str, list[int]]:
    """Verify the run's round seals end to end with ``fed-llama audit``'s checks: (ok, what
    was checked or what broke, the rounds whose seal does not seal the previous round's
    checkpoint)."""
    from fed_llama.crypto.keys import ServerPublicKey
    from fed_llama.server.audit import audit_run

    audit = audit_run(out, ServerPublicKey.load(keys / "server.pub.json"))
    if not audit.seals and audit.ok:
        return False, "no seals", []
    said = "; ".join(audit.problems or [c for c in audit.checked if "seal" in c])
    # the run id (``run-`` and 16 hex digits) says nothing in a table, and reads as a commit
    said = re.sub(r"\brun run-[0-9a-f]{16}\b", "this run", said)
    return audit.ok, said, audit.unsealed_checkpoints


def overhead(rows: list[Row]) -> list[dict[str, float]]:
    """Per round: its wall time, the slowest site's training (with the previous round's
    evaluation, where its training message carried it) and evaluation times, and
    Flower's overhead (the round's time less those two: messaging, ClientApp process starts,
    loading the backbone in them, checkpoints). Where the sites report their load times, also
    ``flower_s``: the round's time less the slowest site's load and training and the slowest
    site's load and evaluation, which leaves Flower's part (messages, ClientApp process starts
    and FAB installs) and the aggregator's checkpoints."""
    def slowest(row: Row, *suffixes: str) -> float:
        sites = {k.rsplit("/", 1)[0] for k in row if k.endswith(suffixes[0])}
        return max((sum(float(v) for s in suffixes
                        if isinstance(v := row.get(f"{site}{s}"), int | float))
                    for site in sites), default=0.0)

    # a training message that carried the previous round's evaluation did both in a row
    carried = "/" + wire.CARRIED_EVALUATE_SECONDS
    out = []
    for row in rows:
        train = slowest(row, "/train-seconds", carried)
        evaluate = slowest(row, "/evaluate-seconds")
        if "round-seconds" in row and train:
            wall = float(row["round-seconds"])
            spent = wall - train - evaluate
            entry = {"round": int(row["round"]), "round_s": round(wall, 2),
                     "slowest_train_s": round(train, 2),
                     "slowest_evaluate_s": round(evaluate, 2),
                     "overhead_s": round(spent, 2),
                     "overhead_share": round(spent / wall, 3) if wall else 0}
            if any(k.endswith("/train-load-seconds") for k in row):
                flower = (wall - slowest(row, "/train-seconds", "/train-load-seconds", carried)
                          - slowest(row, "/evaluate-seconds", "/evaluate-load-seconds"))
                entry.update({"slowest_train_load_s": round(
                    slowest(row, "/train-load-seconds"), 2),
                    "flower_s": round(flower, 2),
                    "flower_share": round(flower / wall, 3) if wall else 0})
            entry.update(round_path(row, wall))
            out.append(entry)
    return out


def phase_path(row: Row, phase: str) -> dict[str, float] | None:
    """A phase's critical path from the clocks in ``row`` (all on one host in a drill): the
    aggregator made the messages (``<phase>-sent-at``), the last site to finish got its
    message (``<site>/<phase>-started-at``) and finished (``-done-at``), the aggregator got the
    replies (``<phase>-received-at``). Hand-over, the site's own time (load and work) and the
    reply's way back add up to the phase; None where a time is missing."""
    sent, received = row.get(f"{phase}-sent-at"), row.get(f"{phase}-received-at")
    done = {k.rsplit("/", 1)[0]: float(v) for k, v in row.items()
            if k.endswith(f"/{phase}-done-at") and isinstance(v, int | float)}
    if not (isinstance(sent, int | float) and isinstance(received, int | float) and done):
        return None
    last = max(done, key=lambda site: done[site])
    started = row.get(f"{last}/{phase}-started-at")
    if not isinstance(started, int | float):
        return None
    out = {"handover_s": float(started) - float(sent), "site_s": done[last] - float(started),
           "reply_s": float(received) - done[last], "phase_s": float(received) - float(sent)}
    process = row.get(f"{last}/{phase}-process-started-at")
    # the hand-over: to the new process, then in it (a process older than the message, as a
    # simulation's actor is, started nothing for it)
    if isinstance(process, int | float) and float(sent) <= process <= float(started):
        out["process_start_s"] = float(started) - float(process)
    return out


def round_path(row: Row, wall: float) -> dict[str, float]:
    """Where a round's time went, where its row has the clocks: Flower's hand-over of the
    messages (poll, ClientApp process start; ``process_start_s``: the part after the process
    started, where the sites report it) and the replies' way back, summed over the training
    and evaluation phases; the last site's own time; the aggregator's own time (aggregation,
    checkpoint, the next round's messages): the round less its two phases."""
    train, evaluate = phase_path(row, "train"), phase_path(row, "evaluate")
    if train is None or (evaluate is None and "evaluate-sent-at" in row):
        return {}  # a phase without its clocks would count as the aggregator's time
    paths = [p for p in (train, evaluate) if p]
    moved = sum(p["handover_s"] + p["reply_s"] for p in paths)
    split = ({"process_start_s": round(sum(p["process_start_s"] for p in paths), 2)}
             if all("process_start_s" in p for p in paths) else {})
    return {**split, "handover_s": round(sum(p["handover_s"] for p in paths), 2),
            "reply_s": round(sum(p["reply_s"] for p in paths), 2),
            "last_site_s": round(sum(p["site_s"] for p in paths), 2),
            "aggregator_s": round(wall - sum(p["phase_s"] for p in paths), 2),
            "messaging_share": round(moved / wall, 3) if wall else 0}


def refused(rows: list[Row]) -> int:
    return int(sum(float(r.get("sites-refused", 0) or 0) for r in rows))


def verdict(checks: Mapping[str, bool]) -> str:
    """``PASS`` when every check holds, else ``FAIL: <the checks that failed>``."""
    failed = [name for name, ok in checks.items() if not ok]
    return "PASS" if checks and not failed else "FAIL: " + ", ".join(failed or ["no checks"])


def drill_row(drill: str, sites: int, out: Path, expected: int, wall: float,
              checks: dict[str, bool], twice: list[int], keys: Path | None = None,
              note: str = "") -> Row:
    """The drill's table row, its verdict computed from the run folder and ``checks``."""
    rows = history(out)
    done = completed(out, rows)
    lost = rounds_lost(done, expected)
    chain_note = ""
    if keys is not None:
        ok, chain_note, mismatched = seal_chain(out, keys)
        checks = {**checks, "seal chain verifies": ok}
        twice = sorted(set(twice) | set(mismatched))
    checks = {**checks, "0 rounds lost": lost == 0, "0 rounds applied twice": not twice}
    result = verdict(checks)
    return {"drill": drill, "sites": sites, "rounds done": len(done), "rounds lost": lost,
            "rounds applied twice": len(twice), "updates refused": refused(rows),
            "wall s": round(wall, 1), "result": result,
            "note": "; ".join(x for x in (note, chain_note) if x)}
