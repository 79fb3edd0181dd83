"""Compare a base model with its fine-tuned adapter(s): side by side, and in numbers.

    python -m sft.eval_sft                                   # models/sft_output vs its base model
    python -m sft.eval_sft --adapter_dir models/sft_output --num_examples 50 --prompts my_prompts.txt
    python -m sft.eval_sft --adapter_dir models/sft_output models/dpo_output   # base | sft | dpo

Every prompt is rendered with the template the adapter was trained with (the copy saved in its
``sft_config.json``, or ``dpo_config.json`` for a DPO run). One copy of the base model is loaded:
adapter columns switch adapters on it and the base column runs the same object with adapters
disabled (see ``ModelSpec`` for adding a column type).

Per model: response-token validation loss and perplexity (teacher-forced, tokenized exactly as in
training), and on the generations: the share that stopped with EOS, the share that are empty, the
mean length in tokens and ROUGE-L F1 against the reference. Written to ``--out_dir`` (default
``<first adapter_dir>/eval``): ``report.md``, ``generations.jsonl``, ``metrics.json``.
"""
from __future__ import annotations

import json
import math
import random
import re
import shutil
import textwrap
import unicodedata
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from dpo.dpo_config import CONFIG_FILENAME as DPO_CONFIG_FILENAME
from dpo.preference_metrics import AUTO, preference_columns, resolve_prefs_file
from sft.cli import UserError, run_cli
from sft.config_cli import ConfigError, resolve_config, write_json_atomic
from sft.dataset import STATUS_DROPPED, STATUS_TRUNCATED, SFTDataCollator, encode_examples, read_jsonl_objects
from sft.generation import Generation, encode_prompts, generate_from_ids, special_token_ids
from sft.modeling import load_base_model, load_tokenizer, pick_device, resolve_precision, torch_dtype
from sft.prompting import PromptTemplate
from sft.sft_config import CONFIG_FILENAME, load_sft_run

BUILTIN_PROMPTS_FILE = Path(__file__).with_name("eval_prompts.txt")
BASE_LABEL = "base"
IGNORE_INDEX = -100


# --------------------------------------------------------------------------- config


def _key(default, help: str, **extra):
    metadata = {"help": help, **extra}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class EvalConfig:
    adapter_dir: list[str] = _key(["models/sft_output"], "adapter dir(s) to compare; each becomes a column after the base model")
    base_model: Optional[str] = _key(None, "base model (default: the one recorded in the first adapter's sft_config.json)")
    val_file: Optional[str] = _key(None, "validation JSONL (default: the val_file the first adapter was trained with)")
    num_examples: int = _key(20, "held-out validation examples to generate for (with their reference answers)")
    prompts: Optional[str] = _key(None, "extra instructions: a text file (one per line, '#' = comment) or JSONL with 'instruction' [, 'input', 'reference']")
    builtin_prompts: bool = _key(True, "include the built-in instructions (sft/eval_prompts.txt)")
    max_new_tokens: int = _key(128, "longest generation, in tokens")
    batch_size: int = _key(8, "prompts per generation batch and examples per loss batch")
    max_eval_samples: Optional[int] = _key(500, "validation loss over at most N examples, sampled with --seed (none = all)")
    out_dir: Optional[str] = _key(None, "where report.md, generations.jsonl, metrics.json go (default: <first adapter_dir>/eval)")
    seed: int = _key(42, "seed for choosing validation examples")
    device: str = _key("auto", "where to run: auto = cuda, else mps, else cpu", choices=["auto", "cuda", "mps", "cpu"])
    precision: str = _key("auto", "weights dtype: auto = bf16/fp16 on CUDA, fp32 elsewhere", choices=["auto", "fp32", "bf16", "fp16"])
    show_width: int = _key(0, "terminal width for the side-by-side view (0 = detect)")
    prefs_file: Optional[str] = _key(AUTO, "held-out preference pairs for preference accuracy and reward margin (auto = the "
                                     "DPO column's val_file, else data/processed/prefs_val.jsonl, if present; none = off)")

    def validate(self) -> None:
        if not self.adapter_dir:
            raise ConfigError("adapter_dir is empty: name at least one adapter directory")
        for key in ("max_new_tokens", "batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.num_examples < 0:
            raise ConfigError(f"num_examples must be >= 0, got {self.num_examples}")
        if self.max_eval_samples is not None and self.max_eval_samples <= 0:
            raise ConfigError(f"max_eval_samples must be > 0 or none, got {self.max_eval_samples}")


def parse_eval_config(argv: Sequence[str] | None = None) -> EvalConfig:
    return resolve_config(EvalConfig, argv, prog="python -m sft.eval_sft", description=__doc__.split("\n\n")[0])


# --------------------------------------------------------------------------- columns ("model specs")


@dataclass(frozen=True)
class PromptSettings:
    """How a column's model saw text in training: the prompt is rendered and tokenized like this."""

    template: PromptTemplate
    max_seq_length: int
    train_on_inputs: bool


@dataclass(frozen=True)
class ModelSpec:
    """One column of the comparison.

    A spec knows how to put its weights onto the one shared model (``attach``, once) and how to
    make them the active ones (``active``, a context manager). To add a column type later (e.g. a
    DPO adapter stacked on the SFT adapter), subclass and override these two methods.
    """

    label: str
    settings: PromptSettings

    def attach(self, model):
        return model

    @contextmanager
    def active(self, model) -> Iterator[None]:
        yield

    def describe(self) -> dict:
        return {"label": self.label, "kind": "model", "template": self.settings.template.name}


@dataclass(frozen=True)
class BaseModelSpec(ModelSpec):
    """The base model: the shared model with every adapter switched off."""

    model_name_or_path: str = ""
    trust_remote_code: bool = False

    @contextmanager
    def active(self, model) -> Iterator[None]:
        context = model.disable_adapter() if hasattr(model, "disable_adapter") and hasattr(model, "peft_config") else nullcontext()
        with context:
            yield

    def describe(self) -> dict:
        return {**super().describe(), "kind": "base", "model": self.model_name_or_path}


@dataclass(frozen=True)
class AdapterRun:
    """What a training run saved next to its adapter, as far as evaluation needs it."""

    kind: str  # sft | dpo: which trainer wrote it
    base_model: str  # the model the adapter was trained on
    settings: PromptSettings
    tokenizer_name_or_path: Optional[str] = None  # for adapter dirs saved without a tokenizer
    trust_remote_code: bool = False
    val_file: Optional[str] = None  # the SFT validation file, the default --val_file


def _read_sft_run(path: Path) -> AdapterRun:
    config, template, _ = load_sft_run(path)
    return AdapterRun("sft", config.model_name_or_path, PromptSettings(template, config.max_seq_length, config.train_on_inputs),
                      config.tokenizer_name_or_path, config.trust_remote_code, config.val_file)


def _read_dpo_run(path: Path) -> AdapterRun:
    """A DPO run: a LoRA adapter on the same base model (continued from the SFT adapter, or fresh)."""
    from dpo.dpo_config import load_dpo_run

    config, template, payload = load_dpo_run(path)
    sft_config = (payload.get("sft_run") or {}).get("config") or {}
    base = payload.get("base_model") or config.model_name_or_path or sft_config.get("model_name_or_path")
    if not base:
        raise UserError(f"{path}/{DPO_CONFIG_FILENAME} does not record its base model; pass --base_model")
    return AdapterRun("dpo", base, PromptSettings(template, config.max_length, False),
                      config.tokenizer_name_or_path or sft_config.get("tokenizer_name_or_path"),
                      config.trust_remote_code, sft_config.get("val_file"))


# Which saved run config a directory holds decides how it is read. A new trainer adds a line here.
RUN_READERS = {CONFIG_FILENAME: _read_sft_run, DPO_CONFIG_FILENAME: _read_dpo_run}


def read_adapter_run(adapter_dir: str) -> AdapterRun:
    """The saved run of an adapter dir, or a one-line error saying what is missing."""
    path = Path(adapter_dir)
    if not path.is_dir():
        raise UserError(f"adapter dir {adapter_dir} not found: train one first (python -m sft.train_sft_mac) or pass --adapter_dir")
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir} holds no adapter_config.json: is it the output_dir of a training run?")
    for filename, reader in RUN_READERS.items():
        if (path / filename).is_file():
            return reader(path)
    raise UserError(f"{adapter_dir} holds neither {' nor '.join(RUN_READERS)}, so the prompt template it was trained with is unknown")


@dataclass(frozen=True)
class AdapterSpec(ModelSpec):
    """A LoRA adapter loaded by name onto the shared base model."""

    adapter_dir: str = ""
    adapter_name: str = ""
    run: Optional[AdapterRun] = None

    @property
    def trained_on(self) -> str:
        return self.run.base_model if self.run else ""

    def attach(self, model):
        from peft import PeftModel

        if isinstance(model, PeftModel):
            model.load_adapter(self.adapter_dir, adapter_name=self.adapter_name, is_trainable=False)
            return model
        return PeftModel.from_pretrained(model, self.adapter_dir, adapter_name=self.adapter_name, is_trainable=False)

    @contextmanager
    def active(self, model) -> Iterator[None]:
        model.set_adapter(self.adapter_name)
        yield

    def describe(self) -> dict:
        return {**super().describe(), "kind": f"{self.run.kind} adapter" if self.run else "adapter",
                "adapter_dir": self.adapter_dir, "trained_on": self.trained_on}


def _column_label(adapter_dir: Path, taken: set[str]) -> str:
    """``models/sft_output`` -> ``sft``; made unique among the columns."""
    name = adapter_dir.resolve().name
    label = re.sub(r"\W+", "_", name.removesuffix("_output") or name).strip("_") or "adapter"
    candidate, n = label, 2
    while candidate in taken:
        candidate, n = f"{label}_{n}", n + 1
    return candidate


def _adapter_spec(adapter_dir: str, taken: set[str]) -> AdapterSpec:
    run = read_adapter_run(adapter_dir)
    label = _column_label(Path(adapter_dir), taken)
    return AdapterSpec(label=label, settings=run.settings, adapter_dir=str(adapter_dir), adapter_name=label, run=run)


def build_model_specs(adapter_dirs: Sequence[str], base_model: str | None) -> list[ModelSpec]:
    """The columns: the base model first, then one per adapter dir, in the order given.

    The base column is prompted with the first adapter's template, so base and fine-tuned see the
    same text.
    """
    taken = {BASE_LABEL}
    adapters = []
    for adapter_dir in adapter_dirs:
        spec = _adapter_spec(adapter_dir, taken)
        taken.add(spec.label)
        adapters.append(spec)
    base = base_model or _common_base(adapters)
    base_spec = BaseModelSpec(label=BASE_LABEL, settings=adapters[0].settings, model_name_or_path=base,
                              trust_remote_code=adapters[0].run.trust_remote_code)
    return [base_spec, *adapters]


def _same_model(a: str, b: str) -> bool:
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def _common_base(adapters: Sequence[AdapterSpec]) -> str:
    first = adapters[0].trained_on
    for spec in adapters[1:]:
        if not _same_model(spec.trained_on, first):
            raise UserError(f"adapters were trained on different base models ({first} for {adapters[0].adapter_dir}, "
                            f"{spec.trained_on} for {spec.adapter_dir}); pass --base_model to choose one")
    return first


# --------------------------------------------------------------------------- loading


def load_eval_tokenizer(adapter: AdapterSpec, base_model: str, trust_remote_code: bool = False):
    """The tokenizer saved with the adapter (what training used), else the base model's."""
    saved_with_adapter = (Path(adapter.adapter_dir) / "tokenizer_config.json").is_file()
    return load_tokenizer(base_model, adapter.adapter_dir if saved_with_adapter else adapter.run.tokenizer_name_or_path,
                          trust_remote_code=trust_remote_code)


def build_shared_model(specs: Sequence[ModelSpec], device: torch.device, dtype: torch.dtype):
    """One copy of the base model with every column's weights attached, in eval mode, on ``device``."""
    base_spec = specs[0]
    assert isinstance(base_spec, BaseModelSpec)
    model = load_base_model(base_spec.model_name_or_path, dtype=dtype, device_map={"": str(device)},
                            trust_remote_code=base_spec.trust_remote_code)
    # peft 0.21 cannot load an adapter without trainable-token rows after one with them (KeyError on
    # the token delta), while the other order works: attach those last. Column order is unchanged.
    for spec in sorted(specs, key=_has_token_rows):
        model = spec.attach(model)
    model.eval()
    return model


def _has_token_rows(spec: ModelSpec) -> bool:
    """True for an adapter trained with PEFT trainable-token rows (SFT's ``--train_eos_embedding``)."""
    config = Path(getattr(spec, "adapter_dir", "") or "/nonexistent") / "adapter_config.json"
    return config.is_file() and bool(json.loads(config.read_text(encoding="utf-8")).get("trainable_token_indices"))


# --------------------------------------------------------------------------- prompts and data


@dataclass(frozen=True)
class EvalPrompt:
    """One thing to generate for. ``instruction`` is None for rows that only carry a rendered prompt."""

    prompt_id: str
    source: str  # builtin | file | val
    instruction: Optional[str]
    input: str = ""
    reference: Optional[str] = None
    raw_prompt: Optional[str] = None

    def render(self, template: PromptTemplate) -> str:
        if self.instruction is None:
            return self.raw_prompt or ""
        return template.render(self.instruction, self.input)


def read_prompt_file(path: str | Path, source: str = "file") -> list[EvalPrompt]:
    """Instructions from a text file (one per line, '#' lines skipped) or a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file {path} not found")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix == ".jsonl" or text.lstrip().startswith("{"):
        prompts = []
        for i, row in enumerate(read_jsonl_objects(path)):
            if not str(row.get("instruction", "")).strip():
                raise UserError(f"{path}: row {i + 1} has no 'instruction'")
            reference = row.get("reference", row.get("response", row.get("output")))
            prompts.append(EvalPrompt(f"{source}-{i}", source, row["instruction"], row.get("input") or "", reference))
    else:
        lines = [line.strip() for line in text.splitlines()]
        prompts = [EvalPrompt(f"{source}-{i}", source, line)
                   for i, line in enumerate(line for line in lines if line and not line.startswith("#"))]
    if not prompts:
        raise UserError(f"prompts file {path} holds no instructions")
    return prompts


@dataclass(frozen=True)
class ValExample:
    example_id: str
    instruction: Optional[str]
    input: str
    response: str
    raw_prompt: Optional[str]  # used only for rows without an instruction
    stored_prompt: Optional[str] = None  # the prompt text the data file carries, if any

    def render(self, template: PromptTemplate) -> str:
        if self.instruction is None:
            return self.raw_prompt or ""
        return template.render(self.instruction, self.input)

    def as_prompt(self) -> EvalPrompt:
        return EvalPrompt(f"val-{self.example_id}", "val", self.instruction, self.input, self.response, self.raw_prompt)


def read_val_file(path: str | Path) -> list[ValExample]:
    """Rows of ``scripts/prepare_sft_data.py``'s output: instruction/input/response (or a rendered prompt)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"validation file {path} not found: run python scripts/prepare_sft_data.py or pass --val_file")
    examples = []
    for i, row in enumerate(read_jsonl_objects(path)):
        response = row.get("response", row.get("output"))
        if response is None or ("instruction" not in row and "prompt" not in row):
            raise UserError(f"{path}: row {i + 1} needs 'instruction' (or 'prompt') and 'response'")
        instruction = row.get("instruction")
        examples.append(ValExample(str(row.get("id", i)), instruction, row.get("input") or "", response,
                                   None if instruction is not None else row["prompt"], row.get("prompt")))
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


def tokenize_for_loss(examples: Sequence[ValExample], tokenizer, settings: PromptSettings) -> tuple[list[dict], int, int]:
    """Features exactly as training builds them (sft.dataset); returns (features, truncated, dropped).

    The loss is over the response and its EOS only, whatever ``train_on_inputs`` was in training,
    so every column's number means the same thing: how well it predicts the reference answer.
    """
    prompts = [example.render(settings.template) for example in examples]
    encoded = encode_examples(prompts, [example.response for example in examples], tokenizer,
                              settings.max_seq_length, train_on_inputs=False)
    features = [e.as_features() for e in encoded if e.status != STATUS_DROPPED]
    truncated = sum(e.status == STATUS_TRUNCATED for e in encoded)
    return features, truncated, len(encoded) - len(features)


def _accepts_logits_to_keep(model) -> bool:
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def _batch_loss_sum(model, batch: dict, use_logits_to_keep: bool) -> tuple[float, int]:
    """(sum of token losses, supervised tokens) for one right-padded batch."""
    labels = batch["labels"]
    # Position p predicts token p+1: keep only positions whose next token is supervised.
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][keep[:, :-1]]
    # A boolean logits_to_keep makes the model project only those positions onto the vocabulary
    # (a 32k-vocab logits tensor for a whole batch is the memory peak otherwise).
    kwargs = {"logits_to_keep": keep} if use_logits_to_keep else {}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits
    if logits.dim() == 3:  # full logits (model without logits_to_keep): pick the positions here
        logits = logits[keep]
    loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    return loss.item(), targets.numel()


def validation_loss(model, tokenizer, features: Sequence[dict], batch_size: int = 8, show_progress: bool = True,
                    desc: str = "val loss", num_truncated: int = 0, num_skipped: int = 0) -> LossResult:
    """Teacher-forced loss over tokenized features: summed token losses / supervised tokens."""
    # Any in-vocabulary id pads: the collator masks padding by position. (No new pad token here:
    # one beyond the embedding matrix would crash the lookup.)
    pad_id, _ = special_token_ids(tokenizer)
    collator = SFTDataCollator(pad_token_id=pad_id)
    device = next(model.parameters()).device
    use_keep = _accepts_logits_to_keep(model)
    was_training = model.training
    model.eval()  # no dropout in the measurement
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))  # little padding per batch
    total, tokens = 0.0, 0
    with torch.inference_mode(), tqdm(total=len(order), desc=desc, unit="ex", disable=not show_progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = [features[i] for i in order[start:start + batch_size]]
            batch = {k: v.to(device) for k, v in collator(chunk).items() if k in ("input_ids", "attention_mask", "labels")}
            batch_sum, batch_tokens = _batch_loss_sum(model, batch, use_keep)
            total, tokens = total + batch_sum, tokens + batch_tokens
            bar.update(len(chunk))
    model.train(was_training)
    loss = total / tokens if tokens else float("nan")
    return LossResult(loss, math.exp(loss) if tokens else float("nan"), len(features), tokens, num_truncated, num_skipped)


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


# --------------------------------------------------------------------------- evaluation


@dataclass
class ColumnResult:
    spec: ModelSpec
    loss: Optional[LossResult]
    generations: list[Generation]
    prompts: list[str]  # the rendered prompt text each generation continued

    def metrics(self, references: Sequence[Optional[str]]) -> dict:
        loss = self.loss
        return {
            "val_loss": loss.loss if loss else None,
            "val_perplexity": loss.perplexity if loss else None,
            "val_examples": loss.num_examples if loss else 0,
            "val_tokens": loss.num_tokens if loss else 0,
            "val_truncated": loss.num_truncated if loss else 0,  # scored on the part that fits
            "val_dropped": loss.num_skipped if loss else 0,  # prompt alone fills max_seq_length: not scored
            **generation_metrics(self.generations, references),
        }


def evaluate_column(spec: ModelSpec, model, tokenizer, prompts: Sequence[EvalPrompt], loss_examples: Sequence[ValExample],
                    config: EvalConfig, cache: dict) -> ColumnResult:
    """Validation loss and generations for one column, with its weights active."""
    settings = spec.settings
    if settings not in cache:  # columns trained with the same template share tokenization
        rendered = [p.render(settings.template) for p in prompts]
        cache[settings] = (rendered, encode_prompts(tokenizer, rendered), tokenize_for_loss(loss_examples, tokenizer, settings))
    rendered, prompt_ids, (features, truncated, skipped) = cache[settings]
    with spec.active(model):
        loss = validation_loss(model, tokenizer, features, config.batch_size, desc=f"{spec.label}: val loss",
                               num_truncated=truncated, num_skipped=skipped) if features else None
        generations = generate_from_ids(model, tokenizer, prompt_ids, config.max_new_tokens, config.batch_size,
                                        desc=f"{spec.label}: generating")
    return ColumnResult(spec, loss, generations, rendered)


def collect_prompts(config: EvalConfig, val_examples: Sequence[ValExample]) -> list[EvalPrompt]:
    prompts = read_prompt_file(BUILTIN_PROMPTS_FILE, "builtin") if config.builtin_prompts else []
    if config.prompts:
        prompts += read_prompt_file(config.prompts, "file")
    chosen = sample_indices(len(val_examples), config.num_examples, config.seed)
    prompts += [val_examples[i].as_prompt() for i in chosen]
    if not prompts:
        raise UserError("nothing to generate for: --builtin_prompts false, no --prompts file and --num_examples 0")
    return prompts


# --------------------------------------------------------------------------- output


def _fmt(value, digits: int = 3, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if percent:
        return f"{100 * value:.0f}%"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


METRIC_COLUMNS = [  # (header, key, formatter)
    ("val loss", "val_loss", lambda v: _fmt(v, 4)),
    ("val ppl", "val_perplexity", lambda v: _fmt(v, 2)),
    ("stop rate (EOS)", "stop_rate", lambda v: _fmt(v, percent=True)),
    ("empty", "empty_rate", lambda v: _fmt(v, percent=True)),
    ("mean tokens", "mean_output_tokens", lambda v: _fmt(v, 1)),
    ("ROUGE-L F1", "rouge_l_f1", lambda v: _fmt(v, 3)),
    ("pref acc", "pref_accuracy", lambda v: _fmt(v, percent=True)),  # dpo/preference_metrics.py
    ("reward margin", "reward_margin", lambda v: _fmt(v, 3)),
    ("chosen likelier", "logp_accuracy", lambda v: _fmt(v, percent=True)),
]


def metrics_table(metrics: dict[str, dict], markdown: bool = False) -> str:
    """One row per model, one column per metric that was measured (e.g. no preference columns without pairs)."""
    measured = [(h, key, fmt) for h, key, fmt in METRIC_COLUMNS if any(key in values for values in metrics.values())]
    header = ["model"] + [h for h, _, _ in measured]
    rows = [[label] + [fmt(values.get(key)) for _, key, fmt in measured] for label, values in metrics.items()]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + rows)


def _printable(text: str) -> str:
    """One line of text a terminal shows as is: whitespace runs become one space, control bytes '�'."""
    flat = " ".join(text.split())
    return "".join(c if not unicodedata.category(c).startswith("C") else "\ufffd" for c in flat)


def side_by_side(prompt: EvalPrompt, outputs: dict[str, str], width: int, max_lines: int = 6) -> str:
    """The instruction, then each model's output (and the reference) in columns, a few lines each."""
    columns = dict(outputs)
    if prompt.reference is not None:
        columns["reference"] = prompt.reference
    col_width = max(12, (width - 3 * (len(columns) - 1)) // len(columns))
    wrapped = {}
    for label, text in columns.items():
        lines = textwrap.wrap(_printable(text) or "(empty)", col_width) or ["(empty)"]
        if len(lines) > max_lines:
            lines = lines[: max_lines - 1] + [lines[max_lines - 1][: col_width - 1] + "…"]
        wrapped[label] = lines
    title = _printable(prompt.instruction or prompt.raw_prompt or "")
    if prompt.input:
        title += f"  [input: {_printable(prompt.input)}]"
    out = [f"── {prompt.prompt_id}: {textwrap.shorten(title, max(20, width - len(prompt.prompt_id) - 5))}"]
    out.append(" | ".join(label[:col_width].ljust(col_width) for label in wrapped).rstrip())
    for i in range(max(len(lines) for lines in wrapped.values())):
        out.append(" | ".join((lines[i] if i < len(lines) else "").ljust(col_width) for lines in wrapped.values()).rstrip())
    return "\n".join(out)


def generation_rows(prompts: Sequence[EvalPrompt], results: Sequence[ColumnResult]) -> list[dict]:
    """One row per (prompt, model), prompts in order, models in column order."""
    rows = []
    for i, prompt in enumerate(prompts):
        for result in results:
            gen = result.generations[i]
            rows.append({
                "prompt_id": prompt.prompt_id, "source": prompt.source, "model": result.spec.label,
                "instruction": prompt.instruction, "input": prompt.input, "prompt": result.prompts[i],
                "output": gen.text, "reference": prompt.reference, "num_tokens": gen.num_tokens,
                "stopped_with_eos": gen.stopped_with_eos, "rouge_l_f1": rouge_l(prompt.reference, gen.text),
            })
    return rows


def _fenced(text: str) -> list[str]:
    """A code block that survives backticks inside the text (the fence is longer than any run of them)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + "text", text, fence]


def report_markdown(settings: dict, metrics: dict[str, dict], prompts: Sequence[EvalPrompt], results: Sequence[ColumnResult]) -> str:
    lines = ["# Evaluation: base vs fine-tuned", ""]
    lines += [f"- {key}: `{value}`" for key, value in settings.items() if not isinstance(value, (dict, list))]
    lines += ["", "## Metrics", "", metrics_table(metrics, markdown=True), ""]
    templates = settings["templates"]
    lines += [f"Validation loss: response tokens + EOS, teacher-forced, over {settings['val_loss_examples']}. "
              f"Generation metrics over {len(prompts)} prompts (greedy, at most {settings['max_new_tokens']} new tokens); "
              "ROUGE-L only where a reference exists.", ""]
    cut = [f"{label}: {v['val_truncated']} cut at max_seq_length (scored on what fits), {v['val_dropped']} left out "
           "(prompt alone too long)" for label, v in metrics.items() if v.get("val_truncated") or v.get("val_dropped")]
    if cut:
        lines += ["Validation examples not scored whole: " + "; ".join(cut) + ".", ""]
    if "prefs_file" in settings:
        lines += [f"Preference metrics over the {settings['prefs_used']} pairs of `{settings['prefs_file']}`: pref acc = share where "
                  f"the implicit reward {settings['prefs_beta']} x (log p_model - log p_base) of the response ranks chosen above "
                  "rejected (undefined for the base model); reward margin = its mean chosen - rejected difference; "
                  "chosen likelier = share where the model alone gives chosen the higher log-prob.", ""]
    shared: dict[str, tuple[dict, list[str]]] = {}  # columns with the same template are listed together
    for label, template in templates.items():
        shared.setdefault(json.dumps(template, sort_keys=True), (template, []))[1].append(label)
    for template, labels in shared.values():  # the exact text the models were prompted with
        lines += [f"Prompt template for {', '.join(labels)} (`{template['name']}`, from the adapter's {CONFIG_FILENAME}):", ""]
        lines += _fenced(template["prompt_no_input"]) + [""]
    lines += ["## Generations", ""]
    for i, prompt in enumerate(prompts):
        lines += [f"### {i + 1}. `{prompt.prompt_id}` ({prompt.source})", "", f"**Instruction:** {prompt.instruction or prompt.raw_prompt}"]
        if prompt.input:
            lines += ["", f"**Input:** {prompt.input}"]
        for result in results:
            gen = result.generations[i]
            ending = "EOS" if gen.stopped_with_eos else "cut at max_new_tokens"
            lines += ["", f"**{result.spec.label}** ({gen.num_tokens} tokens, {ending}):", ""] + _fenced(gen.text.strip() or "(empty)")
        if prompt.reference is not None:
            lines += ["", "**reference:**", ""] + _fenced(prompt.reference.strip())
        lines.append("")
    return "\n".join(lines)


def write_outputs(out_dir: Path, settings: dict, metrics: dict, prompts: Sequence[EvalPrompt], results: Sequence[ColumnResult]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = generation_rows(prompts, results)
    tmp = out_dir / ".generations.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out_dir / "generations.jsonl")
    write_json_atomic(out_dir / "metrics.json", {"settings": settings, "models": metrics})
    tmp = out_dir / ".report.md.tmp"
    tmp.write_text(report_markdown(settings, metrics, prompts, results), encoding="utf-8")
    tmp.replace(out_dir / "report.md")


# --------------------------------------------------------------------------- main


def count_prompt_mismatches(examples: Sequence[ValExample], template: PromptTemplate) -> int:
    """Rows whose stored ``prompt`` is not what the training template renders (data prepared with another template)."""
    return sum(e.instruction is not None and e.stored_prompt is not None and e.stored_prompt != e.render(template)
               for e in examples)


def run_settings(config: EvalConfig, specs: Sequence[ModelSpec], val_file: str, loss_count: int, val_total: int) -> dict:
    loss_text = f"{loss_count} of {val_total} examples" + (f" (sampled with seed {config.seed})" if loss_count < val_total else "")
    first = specs[1]
    return {
        "base_model": specs[0].model_name_or_path,  # type: ignore[attr-defined]
        "adapters": ", ".join(s.adapter_dir for s in specs[1:]),  # type: ignore[attr-defined]
        "template": first.settings.template.name,
        "max_seq_length": first.settings.max_seq_length,
        "val_file": val_file,
        "val_loss_examples": loss_text,
        "num_examples": config.num_examples,
        "max_new_tokens": config.max_new_tokens,
        "seed": config.seed,
        "columns": [s.describe() for s in specs],
        "templates": {s.label: s.settings.template.to_dict() for s in specs},
    }


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_eval_config(argv)
    specs = build_model_specs(config.adapter_dir, config.base_model)
    prefs_file = resolve_prefs_file(config.prefs_file, specs)
    base_spec, adapters = specs[0], specs[1:]
    val_file = config.val_file or adapters[0].run.val_file
    if not val_file:
        raise UserError(f"{adapters[0].adapter_dir} does not record an SFT validation file: pass --val_file")
    val_examples = read_val_file(val_file)
    loss_examples = [val_examples[i] for i in sample_indices(len(val_examples), config.max_eval_samples, config.seed)]
    prompts = collect_prompts(config, val_examples)
    out_dir = Path(config.out_dir or Path(adapters[0].adapter_dir) / "eval")

    device = pick_device(config.device)
    tokenizer = load_eval_tokenizer(adapters[0], base_spec.model_name_or_path, base_spec.trust_remote_code)
    model = build_shared_model(specs, device, torch_dtype(resolve_precision(config.precision, device)))
    for spec in adapters:
        if not _same_model(spec.trained_on, base_spec.model_name_or_path):
            print(f"note: {spec.label} was trained on {spec.trained_on}; evaluating it on {base_spec.model_name_or_path}")
    mismatched = count_prompt_mismatches(val_examples, base_spec.settings.template)
    if mismatched:
        print(f"note: {mismatched} of {len(val_examples)} rows of {val_file} carry a 'prompt' that differs from the "
              f"adapter's template {base_spec.settings.template.name!r}; prompting with the template")
    print(f"evaluating {', '.join(s.label for s in specs)} on {device}: {len(prompts)} prompts, "
          f"validation loss over {len(loss_examples)} of {len(val_examples)} examples")

    cache: dict = {}
    results = [evaluate_column(spec, model, tokenizer, prompts, loss_examples, config, cache) for spec in specs]
    references = [p.reference for p in prompts]
    metrics = {r.spec.label: r.metrics(references) for r in results}
    settings = run_settings(config, specs, val_file, len(loss_examples), len(val_examples))
    _report_dropped(results)
    if prefs_file is not None:
        prefs, prefs_settings = preference_columns(prefs_file, specs, model, tokenizer, max_pairs=config.max_eval_samples,
                                                   seed=config.seed, batch_size=max(1, config.batch_size // 2))
        for label, values in prefs.items():
            metrics[label].update(values)
        settings.update(prefs_settings)

    width = config.show_width or shutil.get_terminal_size((120, 24)).columns
    for i, prompt in enumerate(prompts):
        print(side_by_side(prompt, {r.spec.label: r.generations[i].text for r in results}, width))
    print()
    print(metrics_table(metrics))
    write_outputs(out_dir, settings, metrics, prompts, results)
    print(f"wrote {out_dir / 'report.md'}, {out_dir / 'generations.jsonl'}, {out_dir / 'metrics.json'}")
    return 0


def _report_dropped(results: Sequence[ColumnResult]) -> None:
    """Say how many validation examples were cut or left out of the loss (nothing lost silently)."""
    seen = set()
    for result in results:
        loss = result.loss
        if loss is None or result.spec.settings in seen:
            continue
        seen.add(result.spec.settings)
        if loss.num_truncated or loss.num_skipped:
            print(f"note ({result.spec.label}): {loss.num_truncated} validation examples cut at max_seq_length="
                  f"{result.spec.settings.max_seq_length} (scored on what is left); {loss.num_skipped} left out: "
                  "the prompt alone fills max_seq_length")


if __name__ == "__main__":
    run_cli(main)
