"""Preference accuracy and reward margin of a model on held-out pairs, relative to the base model.

DPO's implicit reward of a response y to a prompt x is ``beta * (log p_model(y|x) - log p_base(y|x))``,
with ``log p(y|x)`` the sum of the response tokens' log-probs (the response's final EOS included,
the prompt masked), tokenised exactly as in training (``core.pairs.encode_pairs``). Per model:

- ``pref_accuracy`` ("pref acc (vs base)" in the report): ``pref_correct`` / ``pref_pairs``, the
  share of pairs whose reward ranks chosen above rejected (ties count as wrong, as in TRL), so the
  base model itself scores 0 by construction and is reported as ``None``. The reference is the base
  model, not DPO's (the SFT model, with ``--init sft``): the two accuracies differ by design;
- ``reward_margin``: mean of reward(chosen) - reward(rejected);
- ``logp_accuracy``: ``logp_correct`` / ``pref_pairs``, the share of pairs where the model alone
  finds chosen more likely than rejected (no reference; defined for the base model too).

The evaluation (``python -m sft.eval_sft --prefs_file data/processed/prefs_val.jsonl``) calls
:func:`evaluate_preferences` with its columns; tests and scripts can call :func:`pair_logps` and
:func:`preference_metrics` directly.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from core.losses import sequence_logps, supports_logits_mask
from core.prompting import PromptTemplate, prompt_format
from core.runs import RunRecord, read_run
from core.stages import find_stage
from core.tokenization import IGNORE_INDEX
from core.pairs import PAIRS_STATS_FILE, EncodedPairs, encode_pairs, read_pairs
from evaluation.config import AUTO

DEFAULT_BETA = 0.1  # TRL's and the DPO paper's default; only scales the margins, never the accuracy
DEFAULT_PREFS_FILE = "data/processed/prefs_val.jsonl"  # what scripts/prepare_dpo_data.py writes


@dataclass(frozen=True)
class PairLogps:
    """Summed response log-probs per pair, in the order of the features."""

    chosen: tuple[float, ...]
    rejected: tuple[float, ...]


def _pair_batch(features: Sequence[dict], pad_token_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded [chosen rows..., rejected rows...]: labels on the response only, attention by position."""
    sequences, labels = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for f in features:
            sequences.append(f["prompt_ids"] + f[key])
            labels.append([IGNORE_INDEX] * len(f["prompt_ids"]) + f[key])
    width = max(len(s) for s in sequences)
    batch = {"input_ids": torch.full((len(sequences), width), pad_token_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(sequences), width), dtype=torch.long),
             "labels": torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)}
    for row, (ids, target) in enumerate(zip(sequences, labels)):
        batch["input_ids"][row, :len(ids)] = torch.tensor(ids)
        batch["attention_mask"][row, :len(ids)] = 1
        batch["labels"][row, :len(ids)] = torch.tensor(target)
    return {k: v.to(device) for k, v in batch.items()}


def pair_logps(model, features: Sequence[dict], pad_token_id: int, batch_size: int = 4,
               show_progress: bool = True, desc: str = "preference log-probs") -> PairLogps:
    """log p(chosen|prompt) and log p(rejected|prompt) for every pair, with the model as it is (eval mode)."""
    device = next(model.parameters()).device
    logits_mask = supports_logits_mask(model)
    was_training = model.training
    model.eval()
    chosen: list[float] = []
    rejected: list[float] = []
    with torch.inference_mode(), tqdm(total=len(features), desc=desc, unit="pair", disable=not show_progress) as bar:
        for start in range(0, len(features), batch_size):
            batch = features[start:start + batch_size]
            logps = sequence_logps(model, _pair_batch(batch, pad_token_id, device), logits_mask).tolist()
            chosen += logps[:len(batch)]
            rejected += logps[len(batch):]
            bar.update(len(batch))
    model.train(was_training)
    return PairLogps(tuple(chosen), tuple(rejected))


def preference_metrics(policy: PairLogps, reference: PairLogps | None, beta: float = DEFAULT_BETA) -> dict:
    """Accuracy and margin of the implicit reward against ``reference`` (None: the model is the reference)."""
    n = len(policy.chosen)
    logp_wins = sum(c > r for c, r in zip(policy.chosen, policy.rejected))
    metrics = {
        "pref_pairs": n,
        "logp_correct": logp_wins,
        "logp_accuracy": logp_wins / n if n else None,
        "pref_correct": None,
        "pref_accuracy": None,
        "reward_margin": None,
        "reward_chosen": None,
        "reward_rejected": None,
    }
    if reference is None or not n:
        return metrics
    reward_chosen = [beta * (p - b) for p, b in zip(policy.chosen, reference.chosen)]
    reward_rejected = [beta * (p - b) for p, b in zip(policy.rejected, reference.rejected)]
    margins = [c - r for c, r in zip(reward_chosen, reward_rejected)]
    correct = sum(m > 0 for m in margins)
    metrics.update(
        pref_correct=correct,
        pref_accuracy=correct / n,
        reward_margin=math.fsum(margins) / n,
        reward_chosen=math.fsum(reward_chosen) / n,
        reward_rejected=math.fsum(reward_rejected) / n,
    )
    return metrics


PER_PAIR_KEY = "per_pair"  # evaluate_preferences' per-pair outcomes, for the report's intervals (not a metric)


def pair_outcomes(policy: PairLogps, reference: PairLogps | None, beta: float = DEFAULT_BETA) -> dict[str, list | None]:
    """Per pair, the items behind :func:`preference_metrics`: ``pref_correct`` (the implicit reward ranks chosen
    first), ``margins`` (its chosen - rejected difference; both None for the reference itself) and ``logp_correct``
    (the model alone finds chosen more likely)."""
    logp = [c > r for c, r in zip(policy.chosen, policy.rejected)]
    if reference is None:
        return {"pref_correct": None, "margins": None, "logp_correct": logp}
    margins = [beta * (pc - bc) - beta * (pr - br)
               for pc, bc, pr, br in zip(policy.chosen, reference.chosen, policy.rejected, reference.rejected)]
    return {"pref_correct": [m > 0 for m in margins], "margins": margins, "logp_correct": logp}


def load_pair_features(prefs_file: str, tokenizer, template: PromptTemplate, max_length: int,
                       max_pairs: int | None = None) -> EncodedPairs:
    """Read and tokenise a preference file (the first ``max_pairs`` pairs, when given)."""
    rows = read_pairs(prefs_file)
    return encode_pairs(rows[:max_pairs] if max_pairs else rows, prompt_format(template, tokenizer), max_length)


def evaluate_preferences(model, tokenizer, specs: Sequence, encoded: EncodedPairs, beta: float = DEFAULT_BETA,
                         batch_size: int = 4) -> dict[str, dict]:
    """Preference metrics for every evaluation column; ``specs[0]`` is the base model, the reference.

    A column is anything with a ``label`` and an ``active(model)`` context manager that makes its
    weights the active ones on the shared ``model`` (``sft.eval_sft``'s model specs).
    """
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    logps = {}
    for spec in specs:
        with spec.active(model):
            logps[spec.label] = pair_logps(model, encoded.features, pad_token_id, batch_size,
                                           desc=f"{spec.label}: preference log-probs")
    base = logps[specs[0].label]
    return {label: {**preference_metrics(value, None if label == specs[0].label else base, beta),
                    PER_PAIR_KEY: pair_outcomes(value, None if label == specs[0].label else base, beta)}
            for label, value in logps.items()}


# --------------------------------------------------------------------------- for sft.eval_sft


def _implicit_reward_runs(specs: Sequence) -> list[RunRecord]:
    """The saved runs among the evaluation columns whose stage trained an implicit reward (DPO; ``core/stages.py``)."""
    runs = []
    for spec in specs[1:]:
        info = find_stage(getattr(getattr(spec, "run", None), "kind", ""))
        if info is not None and info.implicit_reward:
            runs.append(read_run(spec.adapter_dir))
    return runs


def pairs_belong_to(path: Path, specs: Sequence) -> str | None:
    """None when the pairs in ``path`` were made for these columns' model, else why not (one phrase).

    They belong when their stats file records, as the SFT run they were sampled from, one of the
    columns' adapter dirs, or, as their base model, the evaluation's base model. Pairs from a file
    (HH-RLHF, ...) record neither: they are scored when a DPO column trained on them or when asked for.
    """
    from evaluation.models import same_model

    try:
        stats = json.loads((path.parent / PAIRS_STATS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"no readable {path.parent / PAIRS_STATS_FILE} says which model they were made for"
    if not isinstance(stats, dict):
        return f"{path.parent / PAIRS_STATS_FILE} is not a stats file"
    adapters = {Path(spec.adapter_dir).resolve() for spec in specs[1:] if getattr(spec, "adapter_dir", "")}
    if stats.get("sft_model") and Path(stats["sft_model"]).resolve() in adapters:
        return None
    base = getattr(specs[0], "model_name_or_path", "") if specs else ""
    if stats.get("base_model") and base and same_model(stats["base_model"], base):
        return None
    if stats.get("sft_model"):
        return f"they were sampled from the SFT run {stats['sft_model']} (base {stats.get('base_model')}), not from {base}"
    return f"they come from {stats.get('format', 'pairs')} file {stats.get('from_file')}, which no DPO column trained on"


def resolve_prefs_file(prefs_file: str | None, specs: Sequence = ()) -> Path | None:
    """The pairs to score, or None (switched off, or ``auto`` found none that belong to the run).

    ``auto``: the held-out pairs the first DPO column (any stage registered with an implicit reward)
    was trained against (its ``val_file``); else
    ``data/processed/prefs_val.jsonl`` when it exists *and* belongs to the evaluated model
    (:func:`pairs_belong_to`): pairs left there by another model's run are not scored unasked.
    An explicit path must exist and is always used.
    """
    from core.cli import UserError

    if prefs_file is None or prefs_file.lower() == "none":
        return None
    if prefs_file == AUTO:
        dpo_runs = _implicit_reward_runs(specs)
        trained_on = dpo_runs[0].local_path(dpo_runs[0].config["val_file"]) if dpo_runs else None
        if trained_on and Path(trained_on).is_file():
            return Path(trained_on)
        default = Path(DEFAULT_PREFS_FILE)
        if not default.is_file():
            print(f"note: no held-out preference pairs ({DEFAULT_PREFS_FILE}): preference metrics skipped "
                  "(python scripts/prepare_dpo_data.py makes them; --prefs_file FILE names them)")
            return None
        why_not = pairs_belong_to(default, specs)
        if why_not is None:
            return default
        print(f"note: {DEFAULT_PREFS_FILE} not scored: {why_not} (--prefs_file {DEFAULT_PREFS_FILE} scores them anyway)")
        return None
    path = Path(prefs_file)
    if not path.is_file():
        raise UserError(f"preference file {prefs_file} not found (--prefs_file none skips preference metrics)")
    return path


def preference_columns(prefs_file: Path, specs: Sequence, model, tokenizer, *, max_pairs: int | None, seed: int,
                       batch_size: int) -> tuple[dict[str, dict], dict]:
    """Per column, preference metrics on held-out pairs; and the settings used (for the report).

    beta and max_length are the first DPO column's (so the margins are on the scale DPO trained
    with), else the defaults and the first column's max_seq_length.
    """
    dpo_runs = _implicit_reward_runs(specs)
    beta = dpo_runs[0].config["beta"] if dpo_runs else DEFAULT_BETA
    max_length = dpo_runs[0].config["max_length"] if dpo_runs else specs[1].settings.max_seq_length
    rows = read_pairs(prefs_file)
    available = len(rows)
    if max_pairs is not None and max_pairs < len(rows):
        rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), max_pairs))]
    encoded = encode_pairs(rows, prompt_format(specs[1].settings.template, tokenizer), max_length)
    chosen = encoded.summary(available, f"--max_eval_samples {max_pairs}", how=f"{len(rows)} sampled with seed {seed}")
    print(f"preference pairs from {prefs_file}: {chosen}; "
          f"reward = {beta} x (log p_model - log p_base), the base model as reference")
    metrics = evaluate_preferences(model, tokenizer, specs, encoded, beta=beta, batch_size=batch_size) if encoded.features else {}
    settings = {"prefs_file": str(prefs_file), "prefs_beta": beta, "prefs_max_length": max_length,
                "prefs_in_file": available, "prefs_reference": "base model", **{
                    f"prefs_{key}": value for key, value in encoded.counts().items()}}
    return metrics, settings
