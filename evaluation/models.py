"""The columns of an evaluation: the base model and each run's adapter, on one shared base model.

Each run is read through ``core.runs.read_run`` (any stage: SFT, DPO, reward-model-free RL), so
a column is prompted with exactly the template its run trained with.
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from core.cli import UserError
from core.modeling import load_base_model, load_tokenizer
from core.generation import Generation
from core.prompting import PromptTemplate
from core.runs import RunRecord, read_run, run_stage
from core.stages import find_stage, stage_info
from evaluation.data import LossResult, generation_metrics

BASE_LABEL = "base"


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

    kind: str  # the stage that wrote it: sft | dpo | ...
    base_model: str  # the model the adapter was trained on
    settings: PromptSettings
    tokenizer_name_or_path: Optional[str] = None  # for adapter dirs saved without a tokenizer
    trust_remote_code: bool = False
    val_file: Optional[str] = None  # the SFT validation file, the default --val_file


def _sft_val_file(run: RunRecord) -> Optional[str]:
    """The SFT validation file behind a run, as a path from here: its own (a stage that starts from the base
    model, as SFT does) or that of the SFT run it started from."""
    info = find_stage(run.stage)
    if info is not None and info.starts_from is None:
        return run.local_path(run.config.get("val_file"))
    return run.start_run_path("val_file")


def adapter_run(run: RunRecord) -> AdapterRun:
    """What evaluation needs from any stage's saved run (the template is the run's, by construction)."""
    max_length = run.config.get("max_seq_length") or run.config.get("max_length")
    settings = PromptSettings(run.template, int(max_length), bool(run.config.get("train_on_inputs", False)))
    return AdapterRun(run.stage, run.base_model, settings, run.tokenizer_source, run.trust_remote_code, _sft_val_file(run))


def read_adapter_run(adapter_dir: str) -> AdapterRun:
    """The saved run of an adapter dir, or a one-line error saying what is missing."""
    path = Path(adapter_dir)
    if not path.is_dir():
        raise UserError(f"adapter dir {adapter_dir} not found: train one first (python -m sft.train_sft_mac) or pass --adapter_dir")
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir} holds no adapter_config.json: is it the output_dir of a training run?")
    stage = run_stage(path)
    if stage is None:
        raise UserError(f"{adapter_dir} holds no saved run config (sft_config.json, dpo_config.json, ...), so the "
                        "prompt template it was trained with is unknown")
    info = stage_info(stage)
    if not info.policy:  # a classifier (the reward model): it scores text, it does not write any
        raise UserError(f"{adapter_dir} is a {info.title} ({info.config_file}), not a policy to generate with: "
                        f"pass it as --reward_model {adapter_dir} to score each column's generations")
    run = read_run(path)
    if not run.base_model:
        raise UserError(f"{path} does not record its base model; pass --base_model")
    return adapter_run(run)


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


def same_model(a: str, b: str) -> bool:
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def _common_base(adapters: Sequence[AdapterSpec]) -> str:
    first = adapters[0].trained_on
    for spec in adapters[1:]:
        if not same_model(spec.trained_on, first):
            raise UserError(f"adapters were trained on different base models ({first} for {adapters[0].adapter_dir}, "
                            f"{spec.trained_on} for {spec.adapter_dir}); pass --base_model to choose one")
    return first


# --------------------------------------------------------------------------- a column's result


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


# --------------------------------------------------------------------------- loading


def load_eval_tokenizer(adapter: AdapterSpec, base_model: str, trust_remote_code: bool = False):
    """The tokenizer saved with the adapter's run (what training used), else the base model's."""
    return load_tokenizer(base_model, adapter.run.tokenizer_name_or_path, trust_remote_code=trust_remote_code)


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
