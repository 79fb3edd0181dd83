"""Metric panels against optimizer step (train line, held-out dots), one PNG per run: RLHF's curves."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

from core.reporting import loss_points


def plot_panels(log_history: Iterable[Mapping], path: str | Path, title: str,
                panels: Sequence[tuple[str, str | None, str | None]]) -> Path:
    """One panel per (name, train key, held-out key); a key that was never logged is skipped."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in tests
    import matplotlib.pyplot as plt

    history = list(log_history)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), dpi=110, squeeze=False)
    for ax, (name, train_key, eval_key) in zip(axes[0], panels):
        for key, label, style in ((train_key, "train", "-"), (eval_key, "held-out", "o-")):
            points = loss_points(history, key) if key else []
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, style, label=label, markersize=4)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(name)
        ax.set_title(f"{title}: {name}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def first_and_last(log_history, key: str) -> tuple[float | None, float | None]:
    """(value logged at step 0, last value logged) of ``key``; None where absent."""
    points = loss_points(log_history, key)
    if not points:
        return None, None
    return (points[0][1] if points[0][0] == 0 else None), points[-1][1]


def fmt(value, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"
