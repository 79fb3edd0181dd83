"""PNG charts of an evaluation, drawn from its ``metrics.json`` (headless: matplotlib's Agg backend).

    python -m evaluation.charts models/sft_output/eval/metrics.json      # (re)draw into <that dir>/charts/

Only charts whose data exist are drawn: IF accuracy per model (the four numbers, grouped bars, one
panel per benchmark), IF accuracy per instruction type (one chart per benchmark), validation loss,
stop rate (eval prompts and IF prompts; not drawn when every rate is 0), preference accuracy. Every
bar carries its 95% interval as an error bar and every group or row its n, drawn from the entries
the report prints (``evaluation/chart_data.py``), so a chart and the report cannot disagree.
Percent labels round half away from zero (12.5 -> 13). The per-type chart leaves out types where
every model scored 0 and stays at most 9 inches tall. The eval stage calls
:func:`write_charts` and embeds the result in ``report.md``.
"""
from __future__ import annotations

import json
import math
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Sequence

from core.cli import UserError, make_parser, run_cli
from evaluation import chart_data

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


def percent_text(share: float, digits: int = 0) -> str:
    """``share`` (0..1) as a percentage rounded half away from zero: 0.125 -> "13", 0.075 -> "8".

    Python's own formatting rounds half to even (12.5 -> "12") and works on the binary value
    (100 * 0.075 is 7.4999...): the decimal text of the share is scaled instead.
    """
    scaled = Decimal(repr(float(share))) * 100
    return str(scaled.quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def percent_label(value: float) -> str:
    """A bar's percent value (already x100) as its label, rounded half away from zero like :func:`percent_text`."""
    return percent_text(round(value, 9) / 100)


def n_text(estimates: Sequence[dict | None]) -> str:
    """``n=40`` when every bar of a group rests on the same n, ``n=40/39`` (in series order) otherwise."""
    ns = [e["n"] for e in estimates if e and e.get("n") is not None]
    if not ns:
        return ""
    return f"n={ns[0]}" if len(set(ns)) == 1 else "n=" + "/".join(str(n) for n in ns)


def bars_with_n(groups: Sequence[str], series: dict[str, list], separator: str = "\n") -> list[str]:
    """Each group's label with its n (the items behind its bars)."""
    labels = []
    for i, group in enumerate(groups):
        n = n_text([values[i] for values in series.values()])
        labels.append(f"{group}{separator}({n})" if n else group)
    return labels


def _grouped_bars(ax, groups: Sequence[str], series: dict[str, list], percent: bool, horizontal: bool = False,
                  max_labelled: int | None = None) -> None:
    """One group of bars per entry of ``groups``, one bar per series (model), each with its 95% interval as an error bar;
    missing values leave a gap. ``series``: per model, one estimate (``evaluation.chart_data``) or None per group.

    Bars carry their value while at most ``max_labelled`` bars are drawn (default: 120 horizontal, 24 vertical).
    """
    n = max(1, len(series))
    width = 0.8 / n
    for k, (label, estimates) in enumerate(series.items()):
        positions = [i - 0.4 + width * (k + 0.5) for i in range(len(groups))]
        shown = [e["value"] if e and _present(e["value"]) else 0.0 for e in estimates]
        color = COLORS[k % len(COLORS)]
        if horizontal:
            ax.barh(positions, shown, height=width, label=label, color=color)
        else:
            ax.bar(positions, shown, width=width, label=label, color=color)
        drawn = [(p, e) for p, e in zip(positions, estimates) if e and e.get("low") is not None]
        if drawn:
            where, values = [p for p, _ in drawn], [e["value"] for _, e in drawn]
            errors = [[e["value"] - e["low"] for _, e in drawn], [e["high"] - e["value"] for _, e in drawn]]
            ax.errorbar(values if horizontal else where, where if horizontal else values, fmt="none", ecolor="black",
                        elinewidth=0.8, capsize=2, **({"xerr": errors} if horizontal else {"yerr": errors}))
        limit = max_labelled if max_labelled is not None else (120 if horizontal else 24)
        if len(groups) * n <= limit:  # value labels only while they fit
            for where, e in zip(positions, estimates):  # past the interval's end, so the error bar never hides it
                text = (percent_label(e["value"]) if percent else f"{e['value']:.3g}") if e and _present(e["value"]) else "n/a"
                end = (e["high"] if e.get("high") is not None else e["value"]) if e and _present(e["value"]) else 0.0
                ax.annotate(text, (end, where) if horizontal else (where, end), xytext=(2, 0) if horizontal else (0, 2),
                            textcoords="offset points", ha="left" if horizontal else "center",
                            va="center" if horizontal else "bottom", fontsize=6 if horizontal else 7)
    ticks = list(range(len(groups)))
    if horizontal:
        ax.set_yticks(ticks, groups, fontsize=8)
        ax.invert_yaxis()  # first type on top
    else:
        ax.set_xticks(ticks, groups, fontsize=8)
    ax.grid(axis="x" if horizontal else "y", alpha=0.3)


def interval_note(series: dict[str, list]) -> str:
    """What the error bars are, and which bars have none."""
    missing = sorted({label for label, estimates in series.items() for e in estimates if e and e.get("low") is None})
    note = "error bars: 95% bootstrap interval"
    return note + (f"; no interval for {', '.join(missing)} (no per-item data)" if missing else "")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    _plt().close(fig)
    return path


def if_accuracy_bars(document: dict, bench: str) -> tuple[list[str], dict[str, list]]:
    """(group labels with n, per model the four IF estimates): what :func:`if_accuracy_chart` draws."""
    models = document["instruction_following"][bench]["models"]
    series = {label: [chart_data.if_estimate(document, bench, label, key) for key, _ in IF_METRICS] for label in models}
    return bars_with_n([title for _, title in IF_METRICS], series), series


def if_accuracy_chart(document: dict, path: Path) -> Path:
    """The four IFEval numbers per model with their intervals, one panel per benchmark."""
    benchmarks = document["instruction_following"]
    plt = _plt()
    fig, axes = plt.subplots(1, len(benchmarks), figsize=(6.5 * len(benchmarks), 4.4), dpi=110, squeeze=False)
    for ax, (name, data) in zip(axes[0], benchmarks.items()):
        groups, series = if_accuracy_bars(document, name)
        _grouped_bars(ax, groups, series, percent=True)
        ax.set_ylim(0, 105)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{name}: {data['prompts']} prompts\n{interval_note(series)}", fontsize=9)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # one legend, outside the bars
    fig.suptitle("Verifiable instruction following, per model (greedy)")
    return _save(fig, path)


PER_TYPE_MAX_HEIGHT = 9.0  # inches (990 px at 110 dpi): bars get thinner, the chart no taller
PER_TYPE_BAR_HEIGHT = 0.22  # inches per bar while that fits


def shown_types(data: dict) -> tuple[list[str], list[str]]:
    """(instruction types some model passed at least once (strict), types where every model scored 0)."""
    models = data["models"]
    types = sorted({t for s in models.values() for t in s["per_type"]})
    zero = [t for t in types if all(not s["per_type"].get(t, {}).get("strict") for s in models.values())]
    return [t for t in types if t not in zero], zero


def per_type_bars(document: dict, bench: str) -> tuple[list[str], dict[str, list]]:
    """(each shown type with its n, per model its estimates): what :func:`if_per_type_chart` draws."""
    data = document["instruction_following"][bench]
    types, _ = shown_types(data)
    series = {label: [chart_data.per_type_estimate(document, bench, label, t) for t in types] for label in data["models"]}
    return bars_with_n(types, series, " "), series


def if_per_type_chart(name: str, document: dict, path: Path) -> Path | None:
    """Instruction-level strict accuracy per instruction type (n in the label), one bar per model with its interval.

    Types where every model is at 0 are left out (the title says how many): they would fill most of
    the chart with empty rows. None when no model passed any instruction.
    """
    data = document["instruction_following"][name]
    types, zero = shown_types(data)
    if not types:
        return None
    plt = _plt()
    labels, series = per_type_bars(document, name)
    bars = len(types) * max(1, len(data["models"]))
    height = min(PER_TYPE_MAX_HEIGHT, max(3.0, PER_TYPE_BAR_HEIGHT * bars + 1.2))
    fig, ax = plt.subplots(figsize=(9, height), dpi=110)
    # value labels only while a bar is tall enough to hold one (about 0.12 inch)
    _grouped_bars(ax, labels, series, percent=True, horizontal=True, max_labelled=int((height - 1.2) / 0.12))
    ax.set_xlim(0, 108)  # room for the value labels
    ax.set_xlabel("instructions passed, strict (%); " + interval_note(series))
    dropped = f"\n({len(zero)} types where every model scored 0 not shown)" if zero else ""
    ax.set_title(f"{name}: accuracy per instruction type{dropped}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def model_bars(document: dict, keys: Sequence[tuple[str, str]]) -> tuple[list[str], dict[str, list]]:
    """(group labels with n, per model its estimates) for the given metric keys: what :func:`per_model_chart` draws."""
    models = document.get("models", {})
    series = {label: [chart_data.model_estimate(document, label, key) for key, _ in keys] for label in models}
    return bars_with_n([name for _, name in keys], series), series


def per_model_chart(document: dict, keys: Sequence[tuple[str, str]], title: str, ylabel: str, path: Path,
                    percent: bool) -> Path | None:
    """Bars per model for the given metric keys (one group per key) with intervals; None when no model has any."""
    models = document.get("models", {})
    keys = [(key, name) for key, name in keys if any(_present(v.get(key)) for v in models.values())]
    if not keys:
        return None
    plt = _plt()
    groups, series = model_bars(document, keys)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 1.2 * len(keys) * max(1, len(models)) / 2), 4.0), dpi=110)
    _grouped_bars(ax, groups, series, percent=percent)
    top = max(e["high"] if e.get("high") is not None else e["value"] for values in series.values() for e in values if e)
    ax.set_ylim(0, 105 if percent else max(top, 1e-9) * 1.18)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\n{interval_note(series)}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def _all_zero(models: dict[str, dict], keys: Sequence[tuple[str, str]]) -> bool:
    values = [m.get(key) for m in models.values() for key, _ in keys if _present(m.get(key))]
    return bool(values) and all(v == 0 for v in values)


def write_charts(metrics: dict, out_dir: Path, notes: list[str] | None = None) -> list[tuple[str, Path]]:
    """Every chart the metrics support, as (title, path), in the order a report shows them.

    ``metrics``: the whole metrics.json document (models, instruction_following, comparisons), so every bar
    draws the entry the report prints. A chart that would show nothing (every bar 0) is not drawn; why is
    appended to ``notes``.
    """
    notes = notes if notes is not None else []
    models = metrics.get("models", {})
    benchmarks = metrics.get("instruction_following") or {}
    charts: list[tuple[str, Path | None]] = []
    if benchmarks:
        charts.append(("IF accuracy per model", if_accuracy_chart(metrics, out_dir / "if_accuracy.png")))
        for name, data in benchmarks.items():
            if any(s["per_type"] for s in data["models"].values()):
                chart = if_per_type_chart(name, metrics, out_dir / f"if_per_type_{name}.png")
                charts.append((f"{name} per instruction type", chart))
                if chart is None:
                    notes.append(f"No {name} per-type chart: no model passed any instruction (strict).")
    charts.append(("Validation loss", per_model_chart(
        metrics, [("val_loss", "validation loss\n(response tokens)")], "Validation loss (lower is better)", "loss (nats/token)",
        out_dir / "val_loss.png", percent=False)))
    stop_keys = [("stop_rate", "eval prompts")] + [(f"{name}_stop_rate", f"{name} prompts") for name in benchmarks]
    if _all_zero(models, stop_keys):
        notes.append("No stop-rate chart: no generation of any model ended with EOS (0% everywhere; every one was cut "
                     "at max_new_tokens).")
    else:
        charts.append(("Stop rate", per_model_chart(metrics, stop_keys, "Generations that ended with EOS", "stopped (%)",
                                                    out_dir / "stop_rate.png", percent=True)))
    charts.append(("Preference accuracy", per_model_chart(
        metrics, [("pref_accuracy", "implicit reward (vs base)\nranks chosen first"), ("logp_accuracy", "chosen more likely\n(model alone)")],
        "Preference accuracy on held-out pairs", "pairs (%)", out_dir / "pref_accuracy.png", percent=True)))
    return [(title, path) for title, path in charts if path is not None]


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(prog="python -m evaluation.charts", description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics_json", type=Path, help="an eval's metrics.json; the charts go to charts/ beside it")
    path = parser.parse_args(argv).metrics_json
    if not path.is_file():
        raise UserError(f"metrics file not found: {path}")
    metrics = json.loads(path.read_text(encoding="utf-8"))
    notes: list[str] = []
    for title, chart in write_charts(metrics, path.parent / "charts", notes):
        print(f"{title}: {chart}")
    for note in notes:
        print(note)
    if metrics.get("comparisons"):  # the stage comparisons' forest plot (the RLOO monitor needs the run's log history)
        from evaluation.study_charts import forest_plot

        chart = forest_plot(metrics["comparisons"], path.parent / "charts" / "paired_differences.png")
        if chart is not None:
            print(f"Paired differences: {chart}")
    return 0


if __name__ == "__main__":
    run_cli(main)
