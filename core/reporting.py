"""What a finished run leaves for people: metrics JSON, a loss-curve PNG, a model-card README.

General on purpose (SFT and DPO both use it): functions take plain dicts and a Trainer-style
``log_history`` (a list of dicts with ``step`` and ``loss`` / ``eval_loss`` keys).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from core.config import write_json_atomic
from core.log import fraction_text  # noqa: F401  (stages import it from here)
from core.phases import peak_rss_mb

LOSS_CURVE_FILENAME = "loss_curve.png"  # every stage's training (and held-out) loss against step


def loss_points(log_history: Iterable[Mapping[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of ``key`` in a Trainer log history, in step order, one per step."""
    points = {int(entry["step"]): float(entry[key]) for entry in log_history if key in entry and "step" in entry}
    return sorted(points.items())


def plot_loss_curve(log_history: Iterable[Mapping[str, Any]], path: str | Path, title: str = "loss",
                    train_key: str = "loss", eval_key: str = "eval_loss", ylabel: str = "loss (response tokens)") -> Path:
    """Train and validation loss against optimizer step, written as a PNG (headless Agg backend)."""
    return _draw_panels(log_history, path, [(title, ylabel, train_key, eval_key)], eval_label="validation", width=7)


class PeakMemory:
    """Peak memory of the run on its device, in MiB, and what exactly was measured.

    CUDA: the allocator's peak. MPS: the highest driver allocation seen at the sampling points.
    CPU: the process's peak resident set size (includes Python, libraries and data).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._mps_peak = 0

    def sample(self) -> None:
        if self.device.type == "mps":
            self._mps_peak = max(self._mps_peak, torch.mps.driver_allocated_memory())

    def report(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            return {"peak_memory_mb": round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1),
                    "peak_memory_kind": "cuda max_memory_allocated"}
        if self.device.type == "mps":
            self.sample()
            return {"peak_memory_mb": round(self._mps_peak / 2**20, 1),
                    "peak_memory_kind": "mps driver_allocated_memory (sampled max)"}
        return {"peak_memory_mb": peak_rss_mb(), "peak_memory_kind": "process peak RSS"}


def write_metrics(path: str | Path, metrics: Mapping[str, Any]) -> Path:
    """Metrics as pretty JSON, written atomically (floats rounded for readability)."""
    clean = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
    path = Path(path)
    write_json_atomic(path, clean)
    return path


def write_model_card(path: str | Path, title: str, sections: Mapping[str, str]) -> Path:
    """A short README.md: a title and ``## heading`` sections in the given order."""
    parts = [f"# {title}\n"] + [f"## {heading}\n\n{body.strip()}\n" for heading, body in sections.items()]
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- model-card phrases every stage uses


def base_phrase(config) -> str:
    """How the frozen base was held: ``4-bit nf4 base (QLoRA)`` or ``full-precision base``."""
    return f"4-bit {config.bnb_4bit_quant_type} base (QLoRA)" if config.load_in_4bit else "full-precision base"


def effective_batch(config, metrics: Mapping[str, Any]) -> int:
    """Examples (pairs) per optimizer step over every process."""
    return config.per_device_train_batch_size * config.gradient_accumulation_steps * metrics["world_size"]


def adapter_load_code(base_args: str, adapter_dir: str) -> str:
    """The card's code block that loads a causal-LM adapter and its tokenizer with stock calls."""
    return ("```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"base = AutoModelForCausalLM.from_pretrained({base_args})\n"
            f"model = PeftModel.from_pretrained(base, {adapter_dir!r})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({adapter_dir!r})\n```\n\n")


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "n/a" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def format_table(rows: Mapping[str, Any]) -> str:
    """A two-column markdown table of name/value pairs."""
    lines = ["| | |", "|---|---|"]
    for name, value in rows.items():
        shown = _format_value(value)
        lines.append(f"| {name} | {shown} |")
    return "\n".join(lines)


def plot_panels(log_history: Iterable[Mapping], path: str | Path, title: str,
                panels: Sequence[tuple[str, str | None, str | None]]) -> Path:
    """One panel per (name, train key, held-out key); a key that was never logged is skipped."""
    return _draw_panels(log_history, path, [(f"{title}: {name}", name, train_key, eval_key)
                                            for name, train_key, eval_key in panels], eval_label="held-out", width=5.5)


def _draw_panels(log_history: Iterable[Mapping], path: str | Path, panels: Sequence[tuple[str, str, str | None, str | None]],
                 eval_label: str, width: float) -> Path:
    """Panels of (title, y label, train key, eval key) against optimizer step: train as a line, eval as dots."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in tests
    import matplotlib.pyplot as plt

    history = list(log_history)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 4), dpi=110, squeeze=False)
    for ax, (panel_title, ylabel, train_key, eval_key) in zip(axes[0], panels):
        for key, label, style in ((train_key, "train", "-"), (eval_key, eval_label, "o-")):
            points = loss_points(history, key) if key else []
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, style, label=label, markersize=4)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
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


def fmt_value(value, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def pool_batch_means(metrics: dict[str, list[float]], batch_sizes: Sequence[int], keys: Sequence[str]) -> int:
    """Turn per-batch means (as TRL logs them, one entry per batch) into means over every pair.

    TRL averages a batch mean per batch, so a short last batch weighs as much as a full one (13
    held-out pairs in batches of 8 and 5: 7/8 and 5/5 average to 0.9375, while 12/13 = 0.923 were
    right). Each key of ``keys`` present with one value per batch is replaced by the pair-weighted
    mean; returns the number of pairs. Keys with another number of values are left as they are.
    """
    total = sum(batch_sizes)
    for key in keys:
        values = metrics.get(key)
        if total and values is not None and len(values) == len(batch_sizes):
            metrics[key] = [sum(v * n for v, n in zip(values, batch_sizes)) / total]
    return total


def pairs_correct(accuracies: Sequence[float], batch_sizes: Sequence[int]) -> int:
    """How many pairs were ranked right, from per-batch accuracies (each a count / batch size)."""
    return sum(round(a * n) for a, n in zip(accuracies, batch_sizes))
