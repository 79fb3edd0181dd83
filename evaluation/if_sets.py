"""The synthetic IF validation sets beside IFEval, and IFEval split by the constraint types training saw.

    python -m sft.eval_sft --adapter_dir RUN_SFT RUN_RLVR --ifeval data/raw/ifeval_input_data.jsonl \\
        --if_sets data/if --if_sets_limit 100

``--if_sets DIR`` is the output dir of ``scripts/prepare_if_prompts.py``. Its validation files become
benchmarks of the eval like IFEval itself (same generation, scoring, intervals and paired tests, in
``evaluation/comparisons.py``): ``if_val_seen`` and ``if_val_heldout`` judged by the IFEval checkers,
``if_val_ood`` by IFBench's. With ``--ifeval`` too, IFEval's instructions are split by the type
lists of ``if_stats.json`` (seen in training, held out, neither) and each group's
instruction-level accuracy is reported per column (k/n with its interval) and per stage pair (paired
interval, sign-flip test over prompts), the question being whether what RL taught carries over to
constraint types it never saw.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

from core.cli import UserError
from evaluation import comparisons as cmp
from evaluation.number_text import interval, p_clause, signed

# (file stem = benchmark name in the eval, checkers, name in sentences)
IF_SET_FILES = (("if_val_seen", "ifeval", "IF val, seen types"), ("if_val_heldout", "ifeval", "IF val, held-out types"),
                ("if_val_ood", "ifbench", "IF val, IFBench types"))
IF_SET_NAMES = {name: title for name, _, title in IF_SET_FILES}
STATS_FILE = "if_stats.json"
GROUPS = (("seen", "seen_types", "types training saw"), ("held_out", "held_out_types", "held-out types"))


def checker_benchmark(name: str) -> str:
    """The checkers a benchmark of the eval is judged by: an IF set's, else its own name (ifeval, ifbench)."""
    return next((checkers for stem, checkers, _ in IF_SET_FILES if stem == name), name)


def read_if_stats(directory: str | Path) -> dict:
    path = Path(directory) / STATS_FILE
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--if_sets {directory}: no {STATS_FILE} (the output dir of scripts/prepare_if_prompts.py)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc})") from None
    missing = [key for _, key, _ in GROUPS if not isinstance(stats.get(key), list)]
    if missing:
        raise UserError(f"{path}: no {', '.join(missing)} list")
    return stats


def load_if_sets(config) -> list[tuple[str, str, int | None, list]]:
    """(name, source, limit, samples) per IF validation file of ``--if_sets`` (before any model is loaded).

    ``if_val_seen`` and ``if_val_heldout`` must be there; a missing ``if_val_ood`` is said and skipped.
    """
    from evaluation.instruction_following import load_benchmark

    if not config.if_sets:
        return []
    directory = Path(config.if_sets)
    if not directory.is_dir():
        raise UserError(f"--if_sets: {directory} is not a directory (the output dir of scripts/prepare_if_prompts.py)")
    read_if_stats(directory)
    loaded = []
    for name, checkers, _ in IF_SET_FILES:
        path = directory / f"{name}.jsonl"
        if not path.is_file() and name == "if_val_ood":
            print(f"note: --if_sets: no {path.name} in {directory}: no IFBench-type validation set")
            continue
        if not path.is_file():
            raise UserError(f"--if_sets: {path} not found")
        loaded.append((name, str(path), config.if_sets_limit, load_benchmark(checkers, path, config.if_sets_limit)))
    return loaded


# --------------------------------------------------------------------------- IFEval by constraint group


def group_items(items: Sequence[cmp.PromptItem], samples: Sequence, types: set[str]) -> list[cmp.PromptItem]:
    """The prompts that carry a type of the group (by the prompt's ids, the same in every column), with only
    those instructions; prompt-level pass = all of them pass."""
    out = []
    for item, sample in zip(items, samples):
        if not types & set(sample.instruction_id_list):
            continue
        kept = tuple(i for i in item.instructions if i[0] in types)
        strict = all(i[1] for i in kept) if item.scored else None
        loose = all(i[2] for i in kept) if item.scored else None
        out.append(cmp.PromptItem(item.key, strict, loose, kept, item.num_tokens, item.stopped))
    return out


def type_groups(run, stats: Mapping, settings: Mapping, items: Mapping[str, list], resamples: int) -> dict:
    """IFEval's instruction-level accuracy per group of types, per column and per stage pair."""
    seed = int(settings.get("seed", 0))
    stages = {column["label"]: cmp.column_stage(column) for column in settings["columns"]}
    seen_in_ifeval = {i for s in run.samples for i in s.instruction_id_list}
    named = {group: set(stats[key]) for group, key, _ in GROUPS}
    groups = {**named, "other": seen_in_ifeval - set().union(*named.values())}
    out: dict = {}
    for group, types in groups.items():
        present = sorted(types & seen_in_ifeval)
        if not present:
            continue
        filtered = {label: group_items(column, run.samples, set(present)) for label, column in items.items()}
        columns = {label: {key: entry for key, entry in cmp.column_intervals(rows, resamples, seed).items()
                           if key in ("prompts_scored", "prompts_total", "instruction_strict", "instruction_loose")}
                   for label, rows in filtered.items()}
        pairs = []
        for before, after, kind in cmp.stage_pairs(stages):
            if before in filtered and after in filtered:
                change = cmp.benchmark_change(filtered[before], filtered[after], resamples, seed)
                pairs.append({"before": before, "after": after, "kind": kind, "n": change["n"],
                              **{key: change.get(key) for key, _ in cmp.INSTRUCTION_METRICS}})
        out[group] = {"types": present, "columns": columns, "pairs": pairs}
    return out


def type_group_section(if_runs: Sequence, settings: Mapping, resamples: int, benchmark_items) -> tuple[dict | None, list[str]]:
    """(``metrics.json``'s ``ifeval_by_type_group``, the report lines), or (None, []) without IFEval or --if_sets.

    ``benchmark_items(run)``: per column, the run's ``PromptItem``s (``evaluation.study_report.benchmark_items``).
    """
    run = next((r for r in if_runs if r.name == "ifeval"), None)
    if run is None or not settings.get("if_sets"):
        return None, []
    stats = read_if_stats(settings["if_sets"])
    groups = type_groups(run, stats, settings, benchmark_items(run), resamples)
    return {"if_stats": str(Path(settings["if_sets"]) / STATS_FILE), "groups": groups}, group_lines(groups, settings)


def group_lines(groups: Mapping, settings: Mapping) -> list[str]:
    stages = {column["label"]: cmp.column_stage(column) for column in settings["columns"]}
    titles = {group: title for group, _, title in GROUPS} | {"other": "types in neither list"}
    lines = ["## IFEval by constraint group (types training saw vs held out)", "",
             "Instruction-level accuracy on IFEval's instructions of each group (types from `if_stats.json` of the "
             "IF prompt files), over the prompts that carry one: k/n instructions followed, in %, with a 95% bootstrap "
             "interval over prompts.", "",
             "| group | types | prompts | column | strict | loose |", "|---|---|---|---|---|---|"]
    for group, data in groups.items():
        for label, c in data["columns"].items():
            cells = [f"{c[key]['value']:.1f} [{c[key]['low']:.1f}, {c[key]['high']:.1f}] ({c[key]['passed']}/{c[key]['n']})"
                     if c[key]["value"] is not None else "-" for key in ("instruction_strict", "instruction_loose")]
            lines.append(f"| {titles[group]} | {len(data['types'])} | {c['prompts_scored']}/{c['prompts_total']} | {label} "
                         f"| {cells[0]} | {cells[1]} |")
    pair_rows = [(group, pair) for group, data in groups.items() for pair in data["pairs"] if pair["n"]]
    if pair_rows:
        lines += ["", "| comparison | group | n prompts | strict: difference [95% CI], p | loose: difference [95% CI], p |",
                  "|---|---|---|---|---|"]
        for group, pair in pair_rows:
            cells = [f"{signed(e['difference']['value'])} {interval(e['difference'])} points, {p_clause(e['p'])} "
                     f"({e['before']['passed']}/{e['before']['n']} \u2192 {e['after']['passed']}/{e['after']['n']})"
                     for e in (pair["instruction_strict"], pair["instruction_loose"])]
            lines.append(f"| {cmp.stage_name(pair['after'], stages)} vs {cmp.stage_name(pair['before'], stages)} "
                         f"| {titles[group]} | {pair['n']} | {cells[0]} | {cells[1]} |")
    return lines + ["", "Differences: paired bootstrap over prompts; p: paired sign-flip test of the per-prompt "
                        "differences in instructions followed.", ""]
