"""The project's plots, on one helper: grouped bars (evaluation accuracy, kernel benchmarks) and
the reward curve of a run. PNGs only (matplotlib's Agg backend, no display needed)."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    import logging

    import matplotlib
    # a first import under a new HOME builds matplotlib's font cache and says so at INFO: not the user's concern
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def grouped_bars(path: str | Path, groups: list[str], panels: list[tuple[str, dict[str, list[float]]]],
                 title: str = "", value_labels: str | None = None, ylim: tuple[float, float] | None = None) -> None:
    """One panel per (y label, {series: one value per group}), bars of a group side by side.

    A NaN value draws no bar; `value_labels` (a %-format) writes each bar's value on it.
    """
    plt = _pyplot()
    n_series = max((len(series) for _, series in panels), default=1) or 1
    width = 0.8 / n_series
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(max(6.0, 0.6 * len(groups) * n_series + 2), 3.5 * len(panels)))
    for ax, (ylabel, series) in zip(axes[:, 0], panels):
        for k, (name, values) in enumerate(series.items()):
            xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
            bars = ax.bar(xs, values, width, label=name)
            if value_labels:
                ax.bar_label(bars, fmt=value_labels, fontsize=7)
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set_ylabel(ylabel)
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[0, 0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reward_curve(path: str | Path, steps: list[int], rewards: list[float], window: int = 20) -> None:
    """Reward per step with its running mean over `window` steps."""
    plt = _pyplot()
    running = [sum(rewards[max(0, i - window + 1):i + 1]) / len(rewards[max(0, i - window + 1):i + 1])
               for i in range(len(rewards))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, rewards, alpha=0.35, label="reward (mean over captions)")
    ax.plot(steps, running, label=f"running mean ({window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
