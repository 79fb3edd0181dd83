"""What an evaluation generates for and scores: prompts, held-out examples, validation loss, generation metrics."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from core.cli import UserError
from core.generation import Generation, special_token_ids
from core.losses import sequence_logps, supports_logits_mask
from core.prompting import PromptFormat, prompt_file_rows, record_problem
from core.tokenization import (IGNORE_INDEX, STATUS_DROPPED, STATUS_TRUNCATED, PaddingCollator, encode_records,
                               read_jsonl_objects)

BUILTIN_PROMPTS_FILE = Path(__file__).with_name("eval_prompts.txt")


# --------------------------------------------------------------------------- prompts and data


@dataclass(frozen=True)
class EvalPrompt:
    """One thing to generate for: a template-free record (instruction + input, or a conversation)."""

    prompt_id: str
    source: str  # builtin | file | val
    instruction: str  # for a conversation: its last user turn (what the report shows)
    input: str = ""
    reference: Optional[str] = None
    messages: Optional[tuple] = None  # ((role, content), ...) up to the answer, for conversation rows

    @property
    def record(self) -> dict:
        if self.messages is not None:
            return {"messages": [{"role": role, "content": content} for role, content in self.messages]}
        return {"instruction": self.instruction, "input": self.input}

    def render(self, fmt: PromptFormat) -> str:
        """The prompt text exactly as the run's format renders it for generation."""
        return fmt.prompt(self.record)


def _prompt_from_row(row: dict, prompt_id: str, source: str, reference: Optional[str]) -> EvalPrompt:
    if "messages" in row:
        messages = [m for m in row["messages"]]
        if messages[-1]["role"] == "assistant":
            reference = reference if reference is not None else messages[-1]["content"]
            messages = messages[:-1]
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        return EvalPrompt(prompt_id, source, last_user, "", reference, tuple((m["role"], m["content"]) for m in messages))
    return EvalPrompt(prompt_id, source, row["instruction"], row.get("input") or "", reference)


def read_prompt_file(path: str | Path, source: str = "file") -> list[EvalPrompt]:
    """Instructions from a text file (one per line, '#' lines skipped) or a JSONL file of records."""
    prompts = []
    for i, row in enumerate(prompt_file_rows(path, "prompts file", "instructions")):
        problem = record_problem(row)
        if problem is None and "messages" not in row and not row["instruction"].strip():
            problem = "has an empty 'instruction'"
        if problem is not None:
            raise UserError(f"{path}: row {i + 1} {problem}")
        reference = row.get("reference", row.get("response", row.get("output")))
        prompts.append(_prompt_from_row(row, f"{source}-{i}", source, reference))
    return prompts


@dataclass(frozen=True)
class ValExample:
    """A held-out example: its record (with the reference answer) for the loss, and as a prompt."""

    example_id: str
    record: dict  # template-free, with "output" (or the conversation with its answers)
    reference: str

    def as_prompt(self) -> EvalPrompt:
        return _prompt_from_row(self.record, f"val-{self.example_id}", "val", self.reference)


def read_val_file(path: str | Path) -> list[ValExample]:
    """Rows of ``scripts/prepare_sft_data.py``'s output (template-free; older rows with a rendered prompt work too)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"validation file {path} not found: run python scripts/prepare_sft_data.py or pass --val_file")
    examples = []
    for i, row in enumerate(read_jsonl_objects(path)):
        problem = record_problem(row)
        if problem is not None:
            raise UserError(f"{path}: row {i + 1}: {problem}")
        if "messages" in row:
            answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
            if not answers:
                raise UserError(f"{path}: row {i + 1}: a conversation without an assistant turn has no reference")
            examples.append(ValExample(str(row.get("id", i)), {"messages": row["messages"]}, answers[-1]))
            continue
        output = row.get("output", row.get("response"))
        if not isinstance(output, str):
            raise UserError(f"{path}: row {i + 1} needs an 'output' (the reference answer)")
        record = {"instruction": row["instruction"], "input": row.get("input") or "", "output": output}
        examples.append(ValExample(str(row.get("id", i)), record, output))
    if not examples:
        raise UserError(f"validation file {path} holds no examples")
    return examples


def sample_indices(total: int, limit: int | None, seed: int) -> list[int]:
    """``limit`` indices out of ``total``, chosen with ``seed``, in file order (all when limit is None or larger)."""
    if limit is None or limit >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), limit))


# --------------------------------------------------------------------------- validation loss


@dataclass(frozen=True)
class LossResult:
    loss: float  # mean over supervised tokens (not a mean of batch means)
    perplexity: float
    num_examples: int
    num_tokens: int
    num_truncated: int  # examples whose response was cut at max_seq_length
    num_skipped: int  # examples whose prompt alone fills max_seq_length: nothing to score
    per_example: tuple[tuple[float, int], ...] = ()  # (summed nll, tokens) per feature, in order: for intervals


def tokenize_for_loss(examples: Sequence[ValExample], fmt: PromptFormat, max_seq_length: int) -> tuple[list[dict], int, int]:
    """Features exactly as training builds them (core.tokenization); returns (features, truncated, dropped).

    The loss is over the response and its EOS only, whatever ``train_on_inputs`` was in training,
    so every column's number means the same thing: how well it predicts the reference answer.
    """
    encoded = encode_records([example.record for example in examples], fmt, max_seq_length, train_on_inputs=False)
    features = [e.as_features() for e in encoded if e.status != STATUS_DROPPED]
    truncated = sum(e.status == STATUS_TRUNCATED for e in encoded)
    return features, truncated, len(encoded) - len(features)


def validation_loss(model, tokenizer, features: Sequence[dict], batch_size: int = 8, show_progress: bool = True,
                    desc: str = "val loss", num_truncated: int = 0, num_skipped: int = 0) -> LossResult:
    """Teacher-forced loss over tokenized features: summed token losses / supervised tokens."""
    # Any in-vocabulary id pads: the collator masks padding by position. (No new pad token here:
    # one beyond the embedding matrix would crash the lookup.)
    pad_id, _ = special_token_ids(tokenizer)
    collator = PaddingCollator(pad_token_id=pad_id)
    device = next(model.parameters()).device
    logits_mask = supports_logits_mask(model)
    was_training = model.training
    model.eval()  # no dropout in the measurement
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))  # little padding per batch
    per_example: list[tuple[float, int]] = [(0.0, 0)] * len(features)
    with torch.inference_mode(), tqdm(total=len(order), desc=desc, unit="ex", disable=not show_progress) as bar:
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collator([features[i] for i in index]).items()
                     if k in ("input_ids", "attention_mask", "labels")}
            # Per example (summed nll, tokens): the totals below, and what the report's interval resamples.
            nll = (-sequence_logps(model, batch, logits_mask)).tolist()
            counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
            for i, value, count in zip(index, nll, counts):
                per_example[i] = (value, int(count))
            bar.update(len(index))
    model.train(was_training)
    total, tokens = math.fsum(e[0] for e in per_example), sum(e[1] for e in per_example)
    loss = total / tokens if tokens else float("nan")
    return LossResult(loss, math.exp(loss) if tokens else float("nan"), len(features), tokens, num_truncated, num_skipped,
                      tuple(per_example))


# --------------------------------------------------------------------------- generation metrics


def generation_metrics(generations: Sequence[Generation], references: Sequence[Optional[str]]) -> dict:
    """Stop rate, empty share and mean length over all generations; ROUGE-L F1 where a reference exists."""
    from rouge_score import rouge_scorer

    n = len(generations)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, gen.text)["rougeL"].fmeasure for gen, ref in zip(generations, references) if ref is not None]
    return {
        "num_generated": n,
        "stop_rate": sum(g.stopped_with_eos for g in generations) / n if n else None,
        "empty_rate": sum(not g.text.strip() for g in generations) / n if n else None,
        "mean_output_tokens": sum(g.num_tokens for g in generations) / n if n else None,
        "num_with_reference": len(scores),
        "rouge_l_f1": sum(scores) / len(scores) if scores else None,
    }


def rouge_l(reference: Optional[str], text: str) -> Optional[float]:
    from rouge_score import rouge_scorer

    if reference is None:
        return None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, text)["rougeL"].fmeasure


