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


def bars_ci(labels: list[str], values: list[float], cis: list[list[float]], path: Path, title: str, ylabel: str,
            log_y: bool = False) -> Path:
    """Bars with asymmetric confidence-interval whiskers."""
    v = np.asarray(values, float)
    # clipped at 0: with one resampling unit a percentile interval equals the point up to rounding
    lo = np.maximum(v - np.asarray([c[0] for c in cis], float), 0)
    hi = np.maximum(np.asarray([c[1] for c in cis], float) - v, 0)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 4.5))
    ax.bar(range(len(labels)), v, yerr=np.vstack([lo, hi]), capsize=3, color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, rotation=40, ha="right", fontsize=8)
    if log_y and (v > 0).all():
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def histogram_grid(samples: dict[str, list], path: Path, xlabel: str, log10: bool = True) -> Path:
    """One histogram panel per entry (e.g. per-token KL of each spliced variant)."""
    n = len(samples)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, vals) in zip(axes.flat, samples.items()):
        a = np.asarray(vals, float)
        a = np.log10(np.clip(a, 1e-8, None)) if log10 else a
        ax.hist(a, bins=50, color="tab:blue")
        ax.set_title(f"{name}\nmean {np.mean(vals):.3g}", fontsize=8)
        ax.set_xlabel(xlabel, fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def bar_panels(panels: dict[str, list[dict]], path: Path) -> Path:
    """One horizontal bar panel per ranking ([{"feature", "value"}, ...])."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.5), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels.items()):
        ax.barh([str(r["feature"]) for r in rows][::-1], [r["value"] for r in rows][::-1], color="tab:blue")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("contribution / score", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def overlaid_histograms(data: dict[str, tuple], path: Path, xlabel: str) -> Path:
    """Per model: the trained values and, as a line, their values at initialisation."""
    fig, axes = plt.subplots(1, len(data), figsize=(4.5 * len(data), 3.6), squeeze=False)
    for ax, (name, (vals, init)) in zip(axes[0], data.items()):
        if np.ptp(vals) < 1e-5:             # e.g. unit-norm decoder rows: a single value, not a distribution
            ax.hist(np.round(vals, 4), bins=1, color="tab:blue", label="trained")
            ax.text(0.5, 0.5, f"all = {np.round(vals[0], 4)}\n(norm fixed by the recipe)", transform=ax.transAxes,
                    ha="center", fontsize=9)
            ax.set_title(name, fontsize=9)
            continue
        ax.hist(vals, bins=60, color="tab:blue", label="trained")
        for v in np.unique(np.round(init, 4))[:3]:
            ax.axvline(v, color="tab:red", ls="--", lw=1, label="init" if v == np.unique(np.round(init, 4))[0] else None)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def scatter_panels(x, ys: dict[str, np.ndarray], path: Path, xlabel: str, threshold: float | None = None) -> Path:
    fig, axes = plt.subplots(1, len(ys), figsize=(3.6 * len(ys), 3.4), squeeze=False)
    for ax, (name, y) in zip(axes[0], ys.items()):
        ax.scatter(x, y, s=3, alpha=0.4)
        if threshold is not None:
            ax.axvline(threshold, color="grey", ls=":", lw=1)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(f"{name} share", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def cell_boxplots(values: dict[str, np.ndarray], labels: np.ndarray, cells: list[str], a: np.ndarray, b: np.ndarray,
                  path: Path) -> Path:
    """Per chosen quantity: a box per 2x2 cell, and a box per level of each factor."""
    fig, axes = plt.subplots(len(values), 2, figsize=(10, 2.8 * len(values)), squeeze=False)
    for row, (name, v) in zip(axes, values.items()):
        row[0].boxplot([v[labels == c] for c in cells], tick_labels=cells)
        row[0].set_title(f"{name}: per cell", fontsize=9)
        lv = list(dict.fromkeys(a.tolist())) + list(dict.fromkeys(b.tolist()))
        data = [v[a == x] for x in dict.fromkeys(a.tolist())] + [v[b == x] for x in dict.fromkeys(b.tolist())]
        row[1].boxplot(data, tick_labels=lv)
        row[1].set_title(f"{name}: per factor level", fontsize=9)
        for ax in row:
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def clamp_plots(results: dict, levels_a: list[str], levels_b: list[str], out: Path) -> list[Path]:
    """part9's figures: interaction lines per setting, the 2x2 heatmap at the strongest setting, effect sizes
    by setting for the target and its controls, and the per-word logit changes."""
    target = results["target"]
    settings = list(target)
    paths = []
    fig, axes = plt.subplots(1, len(settings), figsize=(3.2 * len(settings), 3.2), squeeze=False)
    for ax, s in zip(axes[0], settings):
        cm = target[s].get("cell_means", {f"{la}|{lb}": 0.0 for la in levels_a for lb in levels_b})
        for la in levels_a:
            ax.plot(levels_b, [cm[f"{la}|{lb}"] for lb in levels_b], marker="o", label=la)
        ax.set_title(s, fontsize=9)
        ax.set_ylabel("mean logit change", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "interaction_lines.png", dpi=100)
    plt.close(fig)
    paths.append(out / "interaction_lines.png")
    strongest = max(settings, key=lambda s: target[s].get("max_abs_logit_change", 0))
    if "cell_means" not in target[strongest]:                      # no clamp moved any logit
        return paths
    cm = target[strongest]["cell_means"]
    grid = np.array([[cm[f"{la}|{lb}"] for lb in levels_b] for la in levels_a])
    fig, ax = plt.subplots(figsize=(4, 3.4))
    im = ax.imshow(grid, cmap="RdBu_r", vmin=-np.abs(grid).max(), vmax=np.abs(grid).max())
    ax.set_xticks(range(len(levels_b)), levels_b)
    ax.set_yticks(range(len(levels_a)), levels_a)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:+.3f}", ha="center", va="center", fontsize=9)
    fig.colorbar(im)
    ax.set_title(f"mean logit change, {strongest}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "cell_heatmap.png", dpi=100)
    plt.close(fig)
    paths.append(out / "cell_heatmap.png")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for cname, res in results.items():
        xs = [s for s in res if "A:B" in res[s]]
        axes[0].plot(xs, [res[s]["A:B"]["F"] for s in xs], marker="o", label=cname)
        est = [res[s]["A:B"]["estimate"] for s in xs]
        lo = [res[s]["A:B"]["ci"][0] for s in xs]
        hi = [res[s]["A:B"]["ci"][1] for s in xs]
        axes[1].errorbar(xs, est, yerr=[np.subtract(est, lo), np.subtract(hi, est)], marker="o", capsize=3, label=cname)
    axes[0].set_ylabel("interaction min F' (words x prompts)", fontsize=8)
    axes[1].set_ylabel("interaction contrast (logits, 95% CI)", fontsize=8)
    axes[1].axhline(0, color="black", lw=0.6)
    for ax in axes:
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "effect_by_multiplier.png", dpi=100)
    plt.close(fig)
    paths.append(out / "effect_by_multiplier.png")
    w = np.asarray(target[strongest]["word_mean_change"])
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.scatter(range(len(w)), w, s=12)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("bucket word (in bucket order)", fontsize=8)
    ax.set_ylabel("mean logit change", fontsize=8)
    ax.set_title(f"per-word logit change, {strongest}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "word_scatter.png", dpi=100)
    plt.close(fig)
    paths.append(out / "word_scatter.png")
    return paths


def null_distribution(specificity: dict, path: Path, title: str) -> Path:
    """part9: per setting, the null features' interaction min F' (histogram) and the target's (red line)."""
    labels = list(specificity)
    fig, axes = plt.subplots(1, len(labels), figsize=(3.4 * len(labels), 3.0), squeeze=False)
    for ax, s in zip(axes[0], labels):
        r = specificity[s]
        ax.hist(r["null_F"], bins=20, color="0.6")
        ax.axvline(r["target_F"], color="red", lw=1.5, label="target")
        ax.set_title(f"{s}: empirical p {r['empirical_p']:.3g}", fontsize=9)
        ax.set_xlabel("interaction min F'", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
