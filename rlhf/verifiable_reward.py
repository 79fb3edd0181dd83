"""RL with verifiable rewards (RLVR): the constraint checker as a TRL reward function, and its monitoring.

``--reward checker`` scores each completion by ``core.if_checker.judge_response`` (strict, each
constraint with its own seed): the fraction of the prompt's constraints it followed
(``--reward_shape fraction``) or 1/0 for all/not all (``binary``). The same verdict judges
checker-made preference pairs and evaluation, so "followed" means one thing everywhere.

The prompt rows carry what the checker needs as dataset columns, which TRL's RLOOTrainer hands to
every reward function as keyword arguments: ``key``, ``if_prompt`` (the release prompt text, which
some checkers read), ``instruction_id_list``, ``kwargs`` (JSON text: the per-constraint arguments
differ in their keys, which a datasets column cannot hold as objects) and ``benchmark`` (``ifeval``
or ``ifbench``, whichever registry knows every id of the file).

Monitoring rows also carry ``monitor_set`` (the file's name, or "held-back"): while TRL samples on
them, :class:`VerifiableReward` counts per set how many completions followed all their constraints
(prompt level), how many constraints were followed (instruction level), the mean reward, length and
stops; :meth:`VerifiableReward.flush` turns the counts into log entries (``eval_<set>/...``).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from core.cli import UserError
from core.if_checker import benchmark_knowing, checker_registry, judge_response
from core.release_format import to_sample

CONSTRAINT_COLUMNS = ("key", "if_prompt", "instruction_id_list", "kwargs", "benchmark")
# per monitoring set: completions, all constraints followed, constraints followed, constraints, reward sum, tokens, stopped
TALLY = ("completions", "passed", "followed", "constraints", "reward_sum", "tokens", "stopped")


def constraint_columns(row: dict, where: str) -> dict:
    """The checker's columns of a prompt row with constraints (IFEval release format); {} for a row without.

    The benchmark is filled in per file (:func:`mark_benchmark`), once every id of the file is known.
    """
    ids = row.get("instruction_id_list")
    if not ids:
        return {}
    text = row.get("prompt") if isinstance(row.get("prompt"), str) else str(row.get("instruction") or "")
    to_sample("ifeval", {"key": row.get("key", where), "prompt": text, "instruction_id_list": ids,
                         "kwargs": row.get("kwargs")}, where)  # the release format's checks: a one-line error
    return {"key": str(row.get("key", where)), "if_prompt": text, "instruction_id_list": list(ids),
            "kwargs": json.dumps(row["kwargs"], sort_keys=True), "benchmark": ""}


def mark_benchmark(rows: list[dict], source: str | Path) -> list[dict]:
    """Each constrained row gets the benchmark whose checker registry knows every id of the file (IFEval first)."""
    ids = {i for row in rows for i in row.get("instruction_id_list") or ()}
    if not ids:
        return rows
    benchmark = benchmark_knowing(ids)
    if benchmark is not None:
        return [{**row, "benchmark": benchmark} if row.get("instruction_id_list") else row for row in rows]
    unknown = sorted(ids - set(checker_registry("ifeval")))
    raise UserError(f"{source}: constraint ids that neither the IFEval nor the IFBench checkers know: {', '.join(unknown[:5])}")


def require_constraints(rows: list[dict], source: str | Path) -> None:
    """``--reward checker`` needs prompts the checker can judge: a one-line error for a file without any."""
    if not any(row.get("instruction_id_list") for row in rows):
        raise UserError(f"--reward checker: {source} has no prompt with constraints (rows need instruction_id_list and "
                        "kwargs in the IFEval release format, as scripts/prepare_if_prompts.py writes them)")


def dataset_rows(rows: Sequence[dict]) -> list[dict]:
    """Rows for ``datasets.Dataset.from_list``: every row with every column (empty where a row has no constraints)."""
    if not any(row.get("instruction_id_list") for row in rows):
        return [{k: v for k, v in row.items() if k not in CONSTRAINT_COLUMNS} for row in rows]
    empty = {"key": "", "if_prompt": "", "instruction_id_list": [], "kwargs": "[]", "benchmark": ""}
    return [{**empty, **row} for row in rows]


class VerifiableReward:
    """The checker's reward for each completion; None (left out by TRL) for a row without constraints.

    ``weight`` is its weight in TRL's weighted sum of rewards (0 = only monitored, with ``--reward model``).
    """

    __name__ = "checker"

    def __init__(self, tokenizer, stop_ids: Sequence[int], shape: str = "fraction", weight: float = 1.0,
                 monitor_sets: Sequence[str] = (), per_prompt=None):
        self.tokenizer, self.stop_ids, self.shape, self.weight = tokenizer, set(stop_ids), shape, weight
        self.per_prompt = per_prompt  # rlhf.monitor_record.PerPromptScores: each monitoring prompt's reward and pass share
        self.registries: dict[str, dict] = {}
        self.samples: dict[tuple, Any] = {}
        self.tally: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(TALLY))
        # known up front: every process flushes the same sets in the same order (the sums are collective)
        self.set_names: list[str] = list(monitor_sets)

    def response_text(self, ids: Sequence[int]) -> str:
        """The completion as evaluation reads a generation: without its stop token, special tokens skipped."""
        kept = list(ids[:-1]) if ids and ids[-1] in self.stop_ids else list(ids)
        return self.tokenizer.decode(kept, skip_special_tokens=True)

    def sample(self, benchmark: str, key: str, prompt: str, ids: Sequence[str], kwargs_json: str):
        cached = (benchmark, key, prompt)
        if cached not in self.samples:
            row = {"key": key, "prompt": prompt, "instruction_id_list": list(ids), "kwargs": json.loads(kwargs_json)}
            self.samples[cached] = to_sample(benchmark, row, f"prompt {key}")
        return self.samples[cached]

    def __call__(self, prompts, completions, completion_ids, **columns) -> list[float | None]:
        rewards: list[float | None] = []
        passed: list[float | None] = []
        monitor_sets = columns.get("monitor_set") or [None] * len(completion_ids)
        for i, ids in enumerate(completion_ids):
            instruction_ids = (columns.get("instruction_id_list") or [None] * len(completion_ids))[i]
            if not instruction_ids:
                rewards.append(None)
                passed.append(None)
                continue
            benchmark = columns["benchmark"][i]
            registry = self.registries.setdefault(benchmark, checker_registry(benchmark))
            sample = self.sample(benchmark, columns["key"][i], columns["if_prompt"][i], instruction_ids, columns["kwargs"][i])
            verdict = judge_response(benchmark, sample, self.response_text(ids), registry)
            reward = verdict.fraction if self.shape == "fraction" else float(verdict.all_followed)
            rewards.append(reward)
            passed.append(float(verdict.all_followed))
            if monitor_sets[i]:
                self.count(monitor_sets[i], verdict, reward, ids)
        if self.per_prompt is not None:
            self.per_prompt.add(self.__name__, prompts, columns, rewards, self.weight)
            self.per_prompt.add("pass", prompts, columns, passed)
        return rewards

    def count(self, name: str, verdict, reward: float, ids: Sequence[int]) -> None:
        if name not in self.set_names:  # a set not named up front (single process): counted all the same
            self.set_names.append(name)
        stopped = bool(ids) and ids[-1] in self.stop_ids
        for j, value in enumerate((1, verdict.all_followed, verdict.followed, verdict.total, reward, len(ids), stopped)):
            self.tally[name][j] += value

    def flush(self, accelerator=None) -> dict[str, float | int]:
        """The counts since the last flush as log entries (summed over processes), then reset."""
        entries: dict[str, float | int] = {}
        for name in self.set_names:
            values = list(self.tally[name])
            if accelerator is not None and accelerator.num_processes > 1:
                import torch

                values = accelerator.reduce(torch.tensor(values, device=accelerator.device), reduction="sum").tolist()
            entries.update(set_log_entries(name, dict(zip(TALLY, values))))
        self.tally.clear()
        return entries


def set_log_entries(name: str, t: dict[str, float]) -> dict[str, float | int]:
    """``eval_<set>/pass`` (completions that followed every constraint) and ``/followed`` (constraints followed),
    each with its counts (``_k``, ``_n``), and the set's mean reward, length and stop rate."""
    n = int(t["completions"])
    if not n:
        return {}
    prefix = f"eval_{name}/"
    return {prefix + "pass": t["passed"] / n, prefix + "pass_k": int(t["passed"]), prefix + "pass_n": n,
            prefix + "followed": t["followed"] / t["constraints"] if t["constraints"] else 0.0,
            prefix + "followed_k": int(t["followed"]), prefix + "followed_n": int(t["constraints"]),
            prefix + "reward": t["reward_sum"] / n, prefix + "length": t["tokens"] / n, prefix + "stop_rate": t["stopped"] / n}


def shown_keys(set_names: Sequence[str]) -> dict[str, str]:
    """What a held-out log line shows of each set: ``seen pass 3/32 = 0.094, followed 40/80 = 0.500``."""
    shown = {}
    for name in set_names:
        short = name.removeprefix("if_val_")
        shown[f"{name}/pass"] = f"{short} pass"
        shown[f"{name}/followed"] = f"{short} followed"
    return shown


def monitor_set_metrics(history: Sequence[dict], set_names: Sequence[str]) -> dict[str, dict]:
    """Per set: the counts and rates logged before the first step (step 0) and at the last monitoring pass."""
    out = {}
    for name in set_names:
        points = [e for e in history if f"eval_{name}/pass_n" in e]
        if not points:
            continue

        def pick(entry: dict) -> dict:
            return {key: entry.get(f"eval_{name}/{key}") for key in ("pass_k", "pass_n", "followed_k", "followed_n",
                                                                     "reward", "length", "stop_rate")} | {"step": entry.get("step")}

        out[name] = {"before": pick(points[0]) if points[0].get("step") == 0 else None, "after": pick(points[-1])}
    return out


def monitor_sets_text(sets: dict[str, dict]) -> str:
    """``; seen pass 3/32 -> 9/32, followed 40/80 -> 52/80`` for the run's summary line ("" without sets)."""
    parts = []
    for name, m in sets.items():
        b, a = m["before"] or {}, m["after"]
        parts.append(f"{name.removeprefix('if_val_')} pass {b.get('pass_k', '?')}/{b.get('pass_n', '?')} -> "
                     f"{a['pass_k']}/{a['pass_n']}, followed {b.get('followed_k', '?')}/{b.get('followed_n', '?')} -> "
                     f"{a['followed_k']}/{a['followed_n']}")
    return ("; " + "; ".join(parts)) if parts else ""
