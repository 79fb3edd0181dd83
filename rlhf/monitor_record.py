"""Per-prompt scores of each monitoring pass, for the reward-hacking monitor's paired before/after tests.

The monitor (``evaluation/rloo_monitor.py``) asks whether the reward the run optimised rose on the
held-out monitoring prompts while the checker's pass rate there fell, each judged by a paired test
over the same prompts. Pass means alone cannot pair, so while TRL samples on the monitoring rows
(those with a ``monitor_set`` column) the reward functions add their per-completion scores here, and
the trainer writes one line per monitoring pass to ``monitor_per_prompt.jsonl`` in the output dir:

    {"step": 0, "weights": {"reward_model": 1.0, "checker": 0.0},
     "prompts": [{"set": "if_val_seen", "key": "17", "completions": 4, "reward_model": 0.31, "checker": 0.5, "pass": 0.25}]}

Each value is the mean over the prompt's completions in that pass: ``reward_model`` the reward model's
score, ``checker`` the checker's reward (its --reward_shape), ``pass`` the share of completions that
followed every constraint (prompt-level strict). ``weights`` are the functions' weights in the
optimised reward (0 = monitored only). The step-0 pass starts the file; a resumed run appends.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

PER_PROMPT_FILE = "monitor_per_prompt.jsonl"


def row_key(prompts: Sequence, columns: Mapping, i: int) -> str:
    """A monitoring row's prompt key: its ``key`` column (constrained files), else the prompt text (held-back prompts)."""
    keys = columns.get("key")
    return str(keys[i]) if keys and keys[i] else str(prompts[i])


class PerPromptScores:
    """Sums per (set, prompt) of each score since the last flush; shared by the run's reward functions."""

    def __init__(self) -> None:
        self.sums: dict[tuple[str, str], dict[str, list[float]]] = {}
        self.weights: dict[str, float] = {}

    def add(self, name: str, prompts: Sequence, columns: Mapping, values: Sequence[float | None],
            weight: float | None = None) -> None:
        """Score ``name`` of each completion of a batch (``weight``: its weight in the optimised reward, None for a
        score that is no reward); only monitoring rows (a ``monitor_set``) are kept."""
        sets = columns.get("monitor_set")
        if not sets:
            return
        if weight is not None:
            self.weights[name] = weight
        for i, value in enumerate(values):
            if sets[i] and value is not None:
                entry = self.sums.setdefault((str(sets[i]), row_key(prompts, columns, i)), {})
                total = entry.setdefault(name, [0.0, 0])
                total[0] += float(value)
                total[1] += 1

    def rows(self) -> list[dict]:
        rows = []
        for (name, key), entry in self.sums.items():
            row = {"set": name, "key": key, "completions": max(int(count) for _, count in entry.values())}
            rows.append(row | {field: total / count for field, (total, count) in entry.items()})
        return rows

    def flush(self, step: int, output_dir: str | Path, accelerator=None) -> None:
        """Write this pass's per-prompt means (main process; gathered over processes), then reset."""
        rows = self.rows()
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rows = merge_rows(gather_object([rows]))
        self.sums.clear()
        if not rows or (accelerator is not None and not accelerator.is_main_process):
            return
        path = Path(output_dir) / PER_PROMPT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"step": int(step), "weights": self.weights, "prompts": rows}, sort_keys=True)
        with path.open("w" if step == 0 else "a", encoding="utf-8") as out:  # step 0 starts a run's file
            out.write(line + "\n")


def merge_rows(per_process: Sequence[Sequence[dict]]) -> list[dict]:
    """One row per (set, key) from every process's rows, means weighted by completions."""
    merged: dict[tuple[str, str], dict] = {}
    for rows in per_process:
        for row in rows:
            into = merged.setdefault((row["set"], row["key"]), {"set": row["set"], "key": row["key"], "completions": 0})
            n, m = into["completions"], row["completions"]
            for field, value in row.items():
                if field not in ("set", "key", "completions"):
                    into[field] = (into.get(field, 0.0) * n + value * m) / (n + m)
            into["completions"] = n + m
    return list(merged.values())


def read_passes(run_dir: str | Path) -> tuple[list[dict], int]:
    """(the monitoring passes a run recorded, one per step (the last written wins after a resume), by step;
    how many lines could not be read, e.g. one cut by a kill mid-write); ([], 0) without the file."""
    path = Path(run_dir) / PER_PROMPT_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return [], 0
    by_step, unreadable = {}, 0
    for line in lines:
        try:
            entry = json.loads(line)
            by_step[int(entry["step"])] = entry
        except (ValueError, KeyError, TypeError):
            unreadable += 1
    return [by_step[step] for step in sorted(by_step)], unreadable
