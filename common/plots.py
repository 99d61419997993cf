"""The PNGs every stage writes (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def training_curves(history: list[dict], keys: list[str], path: Path, title: str, best_step: int | None = None,
                    log_y: bool = True) -> Path:
    """One panel per key group: training vs held-out-selection curves over steps."""
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False)
    steps = [h["step"] for h in history]
    for ax, key in zip(axes[0], keys):
        for prefix, style, name in (("train_", "-", "train"), ("val_", "--", "held-out (selection half)")):
            if prefix + key in history[0]:
                ax.plot(steps, [h[prefix + key] for h in history], style, label=f"{name} {key}")
        if best_step is not None:
            ax.axvline(best_step, color="grey", lw=0.8, ls=":", label=f"best step {best_step}")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        if log_y and all(h.get("train_" + key, 1) > 0 for h in history):
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def density_histogram(firing_rate: list[float], n_tokens: int, path: Path, title: str) -> Path:
    """log10 feature firing frequency on held-out tokens; dead latents counted separately."""
    rate = np.asarray(firing_rate)
    alive = rate[rate > 0]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    if alive.size:
        ax.hist(np.log10(alive), bins=50, color="tab:blue")
    ax.set_xlabel("log10 firing frequency (held-out tokens)")
    ax.set_ylabel("latents")
    ax.set_title(f"{title}\n{(rate == 0).sum()} of {rate.size} latents never fired on {n_tokens} tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bars(labels: list[str], values: list[float], path: Path, title: str, ylabel: str) -> Path:
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 2, 3.8))
    b = ax.bar(labels, values, color=["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"][:len(labels)])
    ax.bar_label(b, fmt="%.3f")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grouped_bars(labels: list[str], series: dict[str, list], path: Path, title: str, ylabel: str) -> Path:
    """Bars per label, one colour per series (e.g. planted vs null); None values are left out."""
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 4.2))
    width = 0.8 / len(series)
    x = np.arange(len(labels))
    for i, (name, vals) in enumerate(series.items()):
        v = np.array([np.nan if a is None else a for a in vals], dtype=float)
        b = ax.bar(x + (i - (len(series) - 1) / 2) * width, v, width, label=name)
        ax.bar_label(b, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, labels, fontsize=7)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
