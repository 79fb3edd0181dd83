"""Charts of the stage comparisons (matplotlib, headless Agg backend), drawn from the ``comparisons`` section.

* :func:`forest_plot`: every paired difference of IF accuracy between adjacent stages, in points, with
  its 95% bootstrap interval as an error bar and a line at zero (a change significant at the 5% level, uncorrected, is
  drawn in colour, anything else in grey);
* :func:`rloo_monitor_chart`: the RLOO run's reward-model score, KL and completion length per step, the
  monitor's paired changes (optimised reward, checker pass rate) with their intervals and n, and the
  IFEval accuracy of the SFT and the RLOO column with their intervals and n.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from evaluation.comparisons import INSTRUCTION_METRICS, PROMPT_METRICS, stage_name

INCREASE, DECREASE, UNCLEAR = "#1f77b4", "#d62728", "#7f7f7f"


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in tests
    import matplotlib.pyplot as plt

    return plt


def forest_rows(comparisons: Mapping) -> list[dict]:
    """One row per (stage pair, benchmark, metric) that has a difference: label, value, interval, colour."""
    stages = comparisons["stages"]
    rows = []
    for pair in comparisons["pairs"]:
        title = f"{stage_name(pair['after'], stages)} vs {stage_name(pair['before'], stages)}"
        for bench, data in pair["benchmarks"].items():
            for key, name in PROMPT_METRICS + INSTRUCTION_METRICS:
                entry = data.get(key)
                if not entry or entry["difference"]["value"] is None:
                    continue
                d = entry["difference"]
                colour = (INCREASE if d["value"] > 0 else DECREASE) if entry["real"] else UNCLEAR
                rows.append({"label": f"{title}: {bench} {name}", "value": d["value"], "low": d["low"], "high": d["high"],
                             "p": entry["p"], "n": data["n"], "colour": colour})
    return rows


def forest_plot(comparisons: Mapping, path: Path) -> Path | None:
    """The paired differences with their intervals; None when there is none to draw."""
    rows = forest_rows(comparisons)
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9.5, 1.2 + 0.32 * len(rows)), dpi=110)
    for y, row in enumerate(rows):
        ax.errorbar(row["value"], y, xerr=[[row["value"] - row["low"]], [row["high"] - row["value"]]], fmt="o",
                    color=row["colour"], ecolor=row["colour"], capsize=3, markersize=4)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [row["label"] for row in rows], fontsize=7)
    ax.invert_yaxis()  # first comparison on top
    right = ax.secondary_yaxis("right")
    right.set_yticks(range(len(rows)), [f"p={row['p']:.2g}, n={row['n']}" for row in rows], fontsize=7)
    ax.set_xlabel("paired difference, after - before (percentage points), with 95% bootstrap interval")
    ax.set_title("What each stage changed (colour: significant at the 5% level, uncorrected; grey: not distinguishable from none)",
                 fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return _save(plt, fig, path)


def monitor_points(result: Mapping | None) -> list[dict]:
    """The monitor's paired changes on the monitoring prompts, as its table prints them: label, change, interval, n, p."""
    paired = (result or {}).get("paired") or {}
    if "proxy" not in paired:
        return []
    return [{"label": f"{paired['proxy_name']}\n(n={e['n']}, p={e['p']:.2g})" if what == "proxy" else
             f"checker pass rate, points\n(n={e['n']}, p={e['p']:.2g})", "value": e["change"], "low": e["low"],
             "high": e["high"], "n": e["n"], "counts": e["counts"]} for what, e in (("proxy", paired["proxy"]), ("checker", paired["checker"]))]


def rloo_monitor_chart(history: Sequence[Mapping], path: Path, ifeval: Sequence[tuple[str, Mapping]] = (),
                       benchmark: str = "IFEval", result: Mapping | None = None) -> Path | None:
    """Reward-model score, KL and completion length per step (training line, held-out dots); the monitor's paired
    changes of the optimised reward and of the checker's pass rate with their intervals (its verdict's numbers); the
    benchmark's prompt-level strict accuracy of the SFT and RLOO columns with their intervals; None without data."""
    from core.reporting import loss_points
    from evaluation.rloo_monitor import SERIES

    panels = [(title, SERIES[name]) for name, title in
              (("reward_model", "reward model score"), ("kl", "KL to SFT (per token, sampling estimate)"), ("length", "completion length (tokens)"))]
    panels = [(title, key) for title, key in panels if loss_points(history, key) or loss_points(history, "eval_" + key)]
    shown = [(label, e) for label, e in ifeval if e and e.get("value") is not None]
    paired = monitor_points(result)
    lower = len(paired) + bool(shown)  # the verdict's numbers below the curves
    if not panels and not lower:
        return None
    plt = _plt()
    rows, width = bool(panels) + bool(lower), max(len(panels), lower)
    fig, axes = plt.subplots(rows, width, figsize=(4.6 * width, 3.6 * rows), dpi=110, squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, (title, key) in zip(axes[0], panels):
        ax.set_visible(True)
        for points, label, style in ((loss_points(history, key), "training", "-"), (loss_points(history, "eval_" + key), "held-out", "o-")):
            if points:
                ax.plot(*zip(*points), style, label=label, markersize=4)
        ax.set_xlabel("optimizer step")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    bottom = list(axes[-1])
    for ax, point in zip(bottom, paired):
        ax.set_visible(True)
        _paired_panel(ax, point, result["paired"]["steps"])
    if shown:
        bottom[len(paired)].set_visible(True)
        _benchmark_panel(bottom[len(paired)], shown, benchmark)
    fig.suptitle(f"RLOO monitor: {(result or {}).get('verdict', 'no verdict')} (hacking = the optimised reward up while the "
                 "checker's pass rate goes down on the same prompts, each by a paired test)", fontsize=10)
    return _save(plt, fig, path)


def _paired_panel(ax, point: Mapping, steps: Sequence[int]) -> None:
    """One paired change with its interval and a line at 0 (colour: the change counts, up or down)."""
    colour = (INCREASE if point["value"] > 0 else DECREASE) if point["counts"] else UNCLEAR
    ax.errorbar(0, point["value"], yerr=[[point["value"] - point["low"]], [point["high"] - point["value"]]], fmt="o",
                capsize=5, color=colour)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks([0], [point["label"]], fontsize=8)
    ax.set_xlim(-1, 1)
    ax.set_ylabel("change, after \u2212 before")
    ax.set_title(f"monitoring prompts, step {steps[0]} \u2192 {steps[1]}\n(paired, 95% interval)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def _benchmark_panel(ax, shown: Sequence[tuple[str, Mapping]], benchmark: str) -> None:
    for x, (label, e) in enumerate(shown):
        ax.errorbar(x, e["value"], yerr=[[e["value"] - e["low"]], [e["high"] - e["value"]]], fmt="o", capsize=4,
                    color=INCREASE)
    ax.set_xticks(range(len(shown)), [f"{label}\n(n={e.get('n')})" for label, e in shown])
    ax.set_xlim(-0.6, len(shown) - 0.4)
    ax.set_ylabel("prompts passed, strict (%)")
    ax.set_title(f"{benchmark} prompt-level strict (95% interval)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def _save(plt, fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_study_charts(comparisons: Mapping, out_dir: Path, rloo_histories: Mapping[str, Sequence[Mapping]] | None = None
                       ) -> dict[str, Path]:
    """The charts the comparisons support, by name: "forest", and "rloo_monitor[_<label>]" per monitored RLOO column."""
    charts = {"forest": forest_plot(comparisons, out_dir / "paired_differences.png")}
    monitors = comparisons.get("rloo_monitor") or {}
    for index, (label, result) in enumerate(monitors.items()):
        name = "rloo_monitor" if index == 0 else f"rloo_monitor_{label}"
        bench = next((b for b in ("ifeval", "ifbench") if b in comparisons["columns"][label]["benchmarks"]), None)
        ifeval = [(column, comparisons["columns"][column]["benchmarks"][bench]["prompt_strict"])
                  for column in (result["before"], label)] if bench else []
        charts[name] = rloo_monitor_chart((rloo_histories or {}).get(label) or [], out_dir / f"{name}.png", ifeval,
                                          result["benchmark"], result)
    return {name: path for name, path in charts.items() if path is not None}
