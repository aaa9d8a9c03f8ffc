"""Plots of a federation run's history (matplotlib, written as PNG)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from fed_llama.server.checkpoint import evaluated

log = logging.getLogger(__name__)


def plot_history(rows: list[dict[str, Any]], sites: list[str], out: Path) -> list[Path]:
    """Training loss and held-out perplexity per round (each site and pooled:
    ``perplexity.png``), bytes per round, and task scores per round (``tasks.png``, when the
    history has them)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    rounds = [int(r["round"]) for r in rows]
    scored = evaluated(rows)
    at = [int(r["round"]) for r in scored]
    written = []
    fig, (loss_ax, ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for site in sites:  # every round trains, whether or not it is evaluated
        loss_ax.plot(rounds, [r.get(f"{site}/train-loss", math.nan) for r in rows],
                     linewidth=1, label=site)
    loss_ax.plot(rounds, [r.get("train-loss", math.nan) for r in rows], color="black",
                 linewidth=2.5, label="weighted mean")
    loss_ax.set(xlabel="round", ylabel="training answer loss (end of the round's steps)",
                title="Each site's local training")
    _round_ticks(loss_ax, rounds)
    loss_ax.grid(alpha=0.3)
    loss_ax.legend()
    for site in sites:
        ax.plot(at, [r.get(f"{site}/perplexity", math.nan) for r in scored], marker="o",
                label=site)
    ax.plot(at, [r.get("pooled-perplexity", math.nan) for r in scored], marker="s",
            color="black", linewidth=2.5, label="pooled")
    values = [v for r in scored for k, v in r.items() if k.endswith("perplexity") and v > 0]
    wide = bool(values) and max(values) / min(values) > 10  # log axis only for wide ranges
    ax.set(xlabel="round", ylabel="held-out answer perplexity",
           yscale="log" if wide else "linear",
           title="Global adapter on each site's held-out data")
    _round_ticks(ax, at)
    plain = FuncFormatter(lambda v, _pos: f"{v:.3g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(_save(fig, out / "perplexity.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    up = [r.get("bytes-up", 0) / 2**20 for r in rows]
    down = [r.get("bytes-down", 0) / 2**20 for r in rows]
    width = 0.4
    ax.bar([x - width / 2 for x in rounds], up, width, label="sites -> server")
    ax.bar([x + width / 2 for x in rounds], down, width, label="server -> sites")
    backbone_mb = rows[-1].get("backbone-bytes", 0) / 2**20 if rows else 0
    top = max([*up, *down, 0.0])
    if top > 0:
        ax.set_ylim(0, 1.3 * top)  # room for the legend above the bars
    ax.set(xlabel="round", ylabel="MiB (all sites)",
           title=f"Bytes per round (the backbone alone is {backbone_mb:.0f} MiB)")
    _round_ticks(ax, rounds)
    ax.legend()
    fig.tight_layout()
    written.append(_save(fig, out / "bytes.png"))
    plt.close(fig)
    pooled = sorted({k for r in rows for k in r if k.startswith("pooled/")})
    if pooled:
        ncols = min(3, len(pooled))
        nrows = math.ceil(len(pooled) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows),
                                 squeeze=False)
        flat = list(axes.flat)
        for ax, key in zip(flat, pooled, strict=False):
            metric = key[len("pooled/"):]
            for site in sites:
                ax.plot(at, [r.get(f"{site}/{metric}", math.nan) for r in scored],
                        marker="o", linewidth=1, label=site)
            ax.plot(at, [r.get(key, math.nan) for r in scored], marker="s", color="black",
                    linewidth=2.5, label="pooled")
            ax.set(xlabel="round", title=metric, ylim=(0, 1))
            _round_ticks(ax, at)
            ax.grid(alpha=0.3)
        for ax in flat[len(pooled):]:
            ax.set_visible(False)
        for row in axes:
            row[0].set_ylabel("score on held-out questions")
        flat[0].legend()
        fig.tight_layout()
        written.append(_save(fig, out / "tasks.png"))
        plt.close(fig)
    return written


def _round_ticks(ax: Any, rounds: list[int]) -> None:
    """A tick at every round while they fit (up to 12), else a few whole-numbered ones."""
    from matplotlib.ticker import MaxNLocator

    if len(rounds) <= 12:
        ax.set_xticks(rounds)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))


def _save(fig: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None:
            exc.filename = str(path)  # a full disk's write() names no file
        raise
    return path
