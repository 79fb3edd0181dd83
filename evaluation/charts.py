"""PNG charts of an evaluation, drawn from its ``metrics.json`` (headless: matplotlib's Agg backend).

    python -m evaluation.charts models/sft_output/eval/metrics.json      # (re)draw into <that dir>/charts/

Only charts whose data exist are drawn: IF accuracy per model (the four numbers, grouped bars, one
panel per benchmark), IF accuracy per instruction type (one chart per benchmark), validation loss,
stop rate (eval prompts and IF prompts), preference accuracy. The eval stage calls
:func:`write_charts` and embeds the result in ``report.md``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from core.cli import UserError, make_parser, run_cli

IF_METRICS = (("prompt_strict", "prompt\nstrict"), ("prompt_loose", "prompt\nloose"),
              ("instruction_strict", "instruction\nstrict"), ("instruction_loose", "instruction\nloose"))
COLORS = ["#7f7f7f", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]  # base is grey


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in tests
    import matplotlib.pyplot as plt

    return plt


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _grouped_bars(ax, groups: Sequence[str], series: dict[str, list], percent: bool, horizontal: bool = False) -> None:
    """One group of bars per entry of ``groups``, one bar per series (model); missing values leave a gap."""
    n = max(1, len(series))
    width = 0.8 / n
    for k, (label, values) in enumerate(series.items()):
        positions = [i - 0.4 + width * (k + 0.5) for i in range(len(groups))]
        shown = [(100 * v if percent else v) if _present(v) else 0.0 for v in values]
        color = COLORS[k % len(COLORS)]
        bars = ax.barh(positions, shown, height=width, label=label, color=color) if horizontal else \
            ax.bar(positions, shown, width=width, label=label, color=color)
        if len(groups) * n <= (120 if horizontal else 24):  # value labels only while they fit
            texts = [(f"{100 * v:.0f}" if percent else f"{v:.3g}") if _present(v) else "n/a" for v in values]
            ax.bar_label(bars, labels=texts, fontsize=6 if horizontal else 7, padding=2)
    ticks = list(range(len(groups)))
    if horizontal:
        ax.set_yticks(ticks, groups, fontsize=8)
        ax.invert_yaxis()  # first type on top
    else:
        ax.set_xticks(ticks, groups, fontsize=8)
    ax.grid(axis="x" if horizontal else "y", alpha=0.3)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    _plt().close(fig)
    return path


def if_accuracy_chart(benchmarks: dict[str, dict], path: Path) -> Path:
    """The four IFEval numbers per model, one panel per benchmark."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(benchmarks), figsize=(6.5 * len(benchmarks), 4.2), dpi=110, squeeze=False)
    for ax, (name, data) in zip(axes[0], benchmarks.items()):
        series = {label: [s.get(key) for key, _ in IF_METRICS] for label, s in data["models"].items()}
        _grouped_bars(ax, [title for _, title in IF_METRICS], series, percent=True)
        ax.set_ylim(0, 105)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{name}: {data['prompts']} prompts")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # one legend, outside the bars
    fig.suptitle("Verifiable instruction following, per model (greedy)")
    return _save(fig, path)


def if_per_type_chart(name: str, data: dict, path: Path) -> Path:
    """Instruction-level strict accuracy per instruction type (n in the label), one bar per model."""
    plt = _plt()
    models = data["models"]
    types = sorted({t for s in models.values() for t in s["per_type"]})
    counts = {t: max(s["per_type"][t]["count"] for s in models.values() if t in s["per_type"]) for t in types}
    labels = [f"{t} (n={counts[t]})" for t in types]
    series = {label: [s["per_type"].get(t, {}).get("strict") for t in types] for label, s in models.items()}
    height = max(3.0, 0.22 * len(types) * max(1, len(models)) + 1.2)
    fig, ax = plt.subplots(figsize=(9, height), dpi=110)
    _grouped_bars(ax, labels, series, percent=True, horizontal=True)
    ax.set_xlim(0, 108)  # room for the value labels
    ax.set_xlabel("instructions passed, strict (%)")
    ax.set_title(f"{name}: accuracy per instruction type")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def per_model_chart(models: dict[str, dict], keys: Sequence[tuple[str, str]], title: str, ylabel: str, path: Path,
                    percent: bool) -> Path | None:
    """Bars per model for the given metric keys (one group per key); None when no model has any of them."""
    keys = [(key, name) for key, name in keys if any(_present(v.get(key)) for v in models.values())]
    if not keys:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 1.2 * len(keys) * max(1, len(models)) / 2), 3.8), dpi=110)
    _grouped_bars(ax, [name for _, name in keys], {label: [v.get(key) for key, _ in keys] for label, v in models.items()},
                  percent=percent)
    top = max((100 * v if percent else v) for m in models.values() for key, _ in keys if _present(v := m.get(key)))
    ax.set_ylim(0, 105 if percent else max(top, 1e-9) * 1.18)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def write_charts(metrics: dict, out_dir: Path) -> list[tuple[str, Path]]:
    """Every chart the metrics support, as (title, path), in the order a report shows them."""
    models = metrics.get("models", {})
    benchmarks = metrics.get("instruction_following") or {}
    charts: list[tuple[str, Path | None]] = []
    if benchmarks:
        charts.append(("IF accuracy per model", if_accuracy_chart(benchmarks, out_dir / "if_accuracy.png")))
        for name, data in benchmarks.items():
            if any(s["per_type"] for s in data["models"].values()):
                charts.append((f"{name} per instruction type", if_per_type_chart(name, data, out_dir / f"if_per_type_{name}.png")))
    charts.append(("Validation loss", per_model_chart(
        models, [("val_loss", "validation loss\n(response tokens)")], "Validation loss (lower is better)", "loss (nats/token)",
        out_dir / "val_loss.png", percent=False)))
    stop_keys = [("stop_rate", "eval prompts")] + [(f"{name}_stop_rate", f"{name} prompts") for name in benchmarks]
    charts.append(("Stop rate", per_model_chart(models, stop_keys, "Generations that ended with EOS", "stopped (%)",
                                                out_dir / "stop_rate.png", percent=True)))
    charts.append(("Preference accuracy", per_model_chart(
        models, [("pref_accuracy", "implicit reward ranks\nchosen first"), ("logp_accuracy", "chosen more likely\n(model alone)")],
        "Preference accuracy on held-out pairs", "pairs (%)", out_dir / "pref_accuracy.png", percent=True)))
    return [(title, path) for title, path in charts if path is not None]


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(prog="python -m evaluation.charts", description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics_json", type=Path, help="an eval's metrics.json; the charts go to charts/ beside it")
    path = parser.parse_args(argv).metrics_json
    if not path.is_file():
        raise UserError(f"metrics file not found: {path}")
    for title, chart in write_charts(json.loads(path.read_text(encoding="utf-8")), path.parent / "charts"):
        print(f"{title}: {chart}")
    return 0


if __name__ == "__main__":
    run_cli(main)
