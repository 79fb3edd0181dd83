"""Preference pairs: reading ``prefs_*.jsonl`` and tokenising them exactly as SFT tokenises an example.

Used by DPO training and by the preference metrics of the evaluation, so the log-probs that
training optimises and the ones evaluation reports are over the same tokens.

Each pair becomes ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` (the input TRL's DPOTrainer
collator takes). Rows are template-free (``instruction``/``input`` or ``messages``, ``chosen``,
``rejected``) and rendered with the run's format (``core.prompting``). The prompt is tokenised as the
model sees it at generation time and each response in context after it, with its end token (EOS, or
the chat template's end-of-turn), by ``core.tokenization.encode_examples``: the same code as SFT,
which handles Llama's spurious leading space and BPE merges across the prompt/response boundary
(TRL's own tokenisation would let the prompt's last tokens merge into the response instead).

``max_length`` bounds prompt + response: a response that does not fit loses its tail (and its end token);
a pair whose prompt alone fills ``max_length`` is dropped. Both are counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from core.cli import UserError
from core.prompting import PromptFormat, record_problem
from core.tokenization import IGNORE_INDEX, STATUS_DROPPED, STATUS_TRUNCATED, encode_examples, read_jsonl_objects

RESPONSE_FIELDS = ("chosen", "rejected")
PREPARE_HINT = "run `python scripts/prepare_dpo_data.py` first"
PAIRS_STATS_FILE = "prefs_stats.json"  # written next to the pairs by scripts/prepare_dpo_data.py: their origin


def pairs_origin(pairs_file: str | Path) -> dict | None:
    """The stats ``prepare_dpo_data.py`` wrote next to ``pairs_file`` (``sft_model`` when the pairs were
    sampled from an SFT run, ``base_model``, ...); None when there is no readable one."""
    import json

    try:
        stats = json.loads((Path(pairs_file).parent / PAIRS_STATS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) else None


def read_pairs(path: str | Path) -> list[dict]:
    """Template-free pairs ({instruction, input | messages, chosen, rejected}), or a one-line UserError naming the row."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"preference file {path} not found; {PREPARE_HINT}")
    rows = []
    for line, row in enumerate(read_jsonl_objects(path, RESPONSE_FIELDS), start=1):
        problem = record_problem(row)
        if problem is not None:
            raise UserError(f"{path}: row {line}: {problem}")
        prompt = {"messages": row["messages"]} if "messages" in row else {"instruction": row["instruction"],
                                                                          "input": row.get("input") or ""}
        rows.append({**prompt, "chosen": row["chosen"], "rejected": row["rejected"]})
    if not rows:
        raise UserError(f"{path} holds no pairs; {PREPARE_HINT}")
    return rows


@dataclass
class EncodedPairs:
    """Tokenised pairs (dropped ones removed) and what happened on the way."""

    features: list[dict[str, list[int]]] = field(default_factory=list)
    kept_rows: list[int] = field(default_factory=list)  # index in the input of each feature
    pairs: int = 0
    dropped_prompt_too_long: int = 0
    chosen_truncated: int = 0
    rejected_truncated: int = 0
    round_trip_inexact: int = 0

    def counts(self) -> dict[str, int]:
        return {"pairs": self.pairs, "used": len(self.features), "dropped_prompt_too_long": self.dropped_prompt_too_long,
                "chosen_truncated": self.chosen_truncated, "rejected_truncated": self.rejected_truncated,
                "round_trip_inexact": self.round_trip_inexact}

    def summary(self, available: int | None = None, flag: str | None = None, how: str | None = None) -> str:
        """What was read and used, a cap said: ``13 pairs, first 10 used (--max_eval_samples 10; 0 dropped ...)``.

        ``available``: the pairs in the file, when only ``self.pairs`` of them were taken; ``flag``: the
        option that capped them; ``how``: how they were chosen (default: the first ones).
        """
        used = len(self.features)
        details = [f"{self.dropped_prompt_too_long} dropped: prompt fills max_length",
                   f"{self.chosen_truncated} chosen and {self.rejected_truncated} rejected responses cut at max_length"]
        if self.round_trip_inexact:
            details.append(f"{self.round_trip_inexact} whose tokens do not decode back to the exact text")
        if available is not None and available > self.pairs:
            taken = f"{available} pairs, {how or f'first {self.pairs}'}"
            head = f"{taken} used" if used == self.pairs else f"{taken} taken -> {used} used"
            details = ([flag] if flag else []) + details
        else:
            head = f"{self.pairs} pairs -> {used} used"
        return f"{head} ({'; '.join(details)})"


def pair_texts(row: dict, fmt: PromptFormat) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) as text, rendered by the run's format exactly as SFT renders an example."""
    texts = []
    for key in RESPONSE_FIELDS:
        segments = fmt.response_segments(row, row[key])
        texts.append(("".join(s.text for s in segments[:-1]), segments[-1].text))
    (prompt, chosen), (other_prompt, rejected) = texts
    if prompt != other_prompt:
        raise UserError("the chat template renders the same prompt differently for two answers: use --template alpaca")
    return prompt, chosen, rejected


def encode_pairs(rows: list[dict], fmt: PromptFormat, max_length: int, chunk_size: int = 1000) -> EncodedPairs:
    """Tokenise pairs like SFT examples (``fmt``: the run's template and tokenizer); the prompt tokens are shared.

    Works through the rows in chunks (batched fast-tokenizer calls), with a progress bar for large files.
    """
    encoded = EncodedPairs(pairs=len(rows))
    with tqdm(total=len(rows), desc="tokenizing pairs", unit="pair", disable=len(rows) < 5 * chunk_size) as bar:
        for start in range(0, len(rows), chunk_size):
            _encode_chunk(rows[start:start + chunk_size], start, fmt, max_length, encoded)
            bar.update(min(chunk_size, len(rows) - start))
    return encoded


def _encode_chunk(rows: list[dict], offset: int, fmt: PromptFormat, max_length: int, encoded: EncodedPairs) -> None:
    prompts, chosen_texts, rejected_texts = zip(*(pair_texts(row, fmt) for row in rows))
    chosen = encode_examples(prompts, chosen_texts, fmt.tokenizer, max_length, end_ids=fmt.end_ids)
    rejected = encode_examples(prompts, rejected_texts, fmt.tokenizer, max_length, end_ids=fmt.end_ids)
    for index, (good, bad) in enumerate(zip(chosen, rejected), start=offset):
        if good.status == STATUS_DROPPED or bad.status == STATUS_DROPPED:
            encoded.dropped_prompt_too_long += 1
            continue
        prompt_length = good.labels.count(IGNORE_INDEX)  # labels are -100 on the prompt only
        if good.input_ids[:prompt_length] != bad.input_ids[:prompt_length]:
            raise RuntimeError(f"bug: pair {index} got two different prompt tokenisations")
        encoded.chosen_truncated += good.status == STATUS_TRUNCATED
        encoded.rejected_truncated += bad.status == STATUS_TRUNCATED
        encoded.round_trip_inexact += not (good.round_trip_exact and bad.round_trip_exact)
        encoded.features.append({
            "prompt_ids": good.input_ids[:prompt_length],
            "chosen_ids": good.input_ids[prompt_length:],
            "rejected_ids": bad.input_ids[prompt_length:],
        })
        encoded.kept_rows.append(index)


@dataclass
class PairData:
    """A stage's train and held-out pairs, tokenised, with the file counts behind them."""

    train: EncodedPairs
    val: EncodedPairs
    train_file_pairs: int
    val_file_pairs: int
    train_cap: int | None = None  # --max_train_samples
    val_cap: int | None = None  # --max_eval_samples

    def stats(self) -> dict:
        return {"train": {"file_pairs": self.train_file_pairs, **self.train.counts()},
                "val": {"file_pairs": self.val_file_pairs, **self.val.counts()}}

    def summary(self) -> str:
        """One line for the log: both files, with any ``--max_*_samples`` cap said."""
        train = self.train.summary(self.train_file_pairs, f"--max_train_samples {self.train_cap}")
        val = self.val.summary(self.val_file_pairs, f"--max_eval_samples {self.val_cap}")
        return f"train {train}; val {val}"


def read_pair_files(config) -> tuple[list[dict], list[dict]]:
    """Both pair files of a stage's config, checked row by row (one-line errors) before any model is loaded."""
    return read_pairs(config.train_file), read_pairs(config.val_file)


def encode_pair_files(config, rows: tuple[list[dict], list[dict]], fmt: PromptFormat) -> PairData:
    """Tokenise the (limited) pair files for DPO or the reward model; a one-line error when no pair fits."""
    train_rows, val_rows = rows
    train_used = train_rows[:config.max_train_samples] if config.max_train_samples else train_rows
    val_used = val_rows[:config.max_eval_samples] if config.max_eval_samples else val_rows
    data = PairData(encode_pairs(train_used, fmt, config.max_length), encode_pairs(val_used, fmt, config.max_length),
                    len(train_rows), len(val_rows), config.max_train_samples, config.max_eval_samples)
    if not data.train.features:
        raise UserError(f"no training pair fits max_length={config.max_length} (every prompt fills it): raise --max_length")
    return data


def pairs_phrase(config, template_name: str) -> str:
    """The data sentence of a pair stage's model card."""
    return (f"Pairs: `{config.train_file}` (held-out `{config.val_file}`), template `{template_name}`, "
            f"max_length {config.max_length}.")
