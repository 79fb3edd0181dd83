"""The SFT run as a start point, the policy trained from it and the frozen reference: one copy for every stage.

DPO, the reward model, RLOO and DPO's pair sampling (``scripts/prepare_dpo_data.py``) all start from an
SFT run, read through ``core.runs`` (never by importing ``sft/``):

- :func:`read_sft_start`: what the SFT run fixes (base model, tokenizer, template, adapter), with
  one-line errors when it is missing or when ``--template`` differs from the one it trained with;
- :func:`load_trainable_policy`: the SFT adapter loaded *trainable* on the base model (a trained EOS
  row folded into the base, ``core/token_rows.py``), or a fresh LoRA adapter (``--init base``);
- the reference: TRL's trainers copy the policy adapter into a frozen adapter named ``ref``
  (:data:`REFERENCE_ADAPTER`), so the reference is the starting policy with one base model in memory.
  :func:`check_reference` fails loudly when TRL did otherwise, :func:`match_reference_dtype` makes the
  copy exactly the policy on a 4-bit base (KL and rewards exactly 0 at step 0);
- :func:`save_policy_adapter`: the trained adapter alone (not the reference copy), with the SFT run's
  token rows put back, so it loads on the original base model like the SFT adapter;
- :func:`load_policy_for_sampling`: the SFT model in eval mode, to sample from.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.cli import UserError
from core.config import ConfigError
from core.log import say
from core.prompting import PromptTemplate, load_template
from core.runs import read_run, run_stage

REFERENCE_ADAPTER = "ref"  # the name TRL gives its frozen copy of a pretrained adapter
POLICY_ADAPTER = "default"


# --------------------------------------------------------------------------- the SFT run to start from


@dataclass(frozen=True)
class SFTStart:
    """What the SFT run (if any) fixes for a later stage."""

    base_model: str
    tokenizer_source: str | None  # None: the base model's tokenizer
    template: PromptTemplate
    sft_dir: Path | None  # the SFT run's output dir, when there is one
    sft_payload: dict | None  # its sft_config.json
    trust_remote_code: bool = False
    sft_train_file: str | None = None  # the SFT run's training data, as a path from here

    def reference_model(self, init: str) -> str:
        return f"base + SFT adapter {self.sft_dir}" if init == "sft" else f"base model {self.base_model}"

    def start_phrase(self, config) -> str:
        """What the trained adapter started as, for a model card (``--init sft`` or a fresh adapter)."""
        if config.init == "sft":
            return f"the SFT adapter from `{self.sft_dir}`"
        modules = ", ".join(config.lora_target_modules)
        return f"a fresh LoRA adapter (r={config.lora_r}, alpha={config.lora_alpha}) on {modules}"

    def record(self, entry_point: str, **after_base_model) -> dict:
        """What a later run saves about where it started (``core.runs`` reads ``sft_run_dir`` and ``sft_run``)."""
        return {"entry_point": entry_point, "base_model": self.base_model, **after_base_model,
                "sft_run_dir": str(self.sft_dir) if self.sft_dir else None, "sft_run": self.sft_payload}


def read_sft_start(sft_adapter_dir: str, *, need_adapter: bool, why: str, renders: str,
                   or_else: str = " or pass --sft_adapter_dir", model_name_or_path: str | None = None,
                   tokenizer_name_or_path: str | None = None, template: str | None = None,
                   trust_remote_code: bool = False) -> SFTStart:
    """Read the SFT run in ``sft_adapter_dir``; one-line errors when what the config asks for is not there.

    ``why``: who needs the adapter (``--init sft``); ``or_else``: the other ways out, after "train one";
    ``renders``: what the stage renders with the run's template (``DPO renders pairs``), for the refusal
    of a ``--template`` that differs from it. Without an SFT run, ``template`` (default alpaca) is used.
    """
    sft_dir = Path(sft_adapter_dir)
    run = read_run(sft_dir, expect="sft") if run_stage(sft_dir) == "sft" else None
    if need_adapter and not (run and run.has_adapter):
        raise UserError(f"{why} needs a finished SFT run in {sft_adapter_dir} (adapter_config.json and "
                        f"sft_config.json): train one with python -m sft.train_sft_mac{or_else}")
    if run is None and model_name_or_path is None:
        raise UserError(f"no SFT run in {sft_adapter_dir} to take the base model from: pass --sft_adapter_dir "
                        "or --model_name_or_path")
    try:
        given = load_template(template) if template is not None else None
    except ValueError as exc:  # an unknown --template
        raise ConfigError(str(exc)) from None
    if run is None:
        return SFTStart(model_name_or_path, tokenizer_name_or_path, given or load_template(), None, None, trust_remote_code)
    if given is not None and given.to_dict() != run.template.to_dict():
        raise UserError(f"--template {template} differs from the template the SFT run in {run.run_dir} trained with "
                        f"({run.template.name}): {renders} with the SFT run's template (drop --template)")
    return SFTStart(model_name_or_path or run.base_model, tokenizer_name_or_path or run.tokenizer_source, run.template,
                    run.run_dir, run.payload, trust_remote_code or run.trust_remote_code,
                    run.local_path(run.config.get("train_file")))


# --------------------------------------------------------------------------- the policy and its reference


def load_trainable_policy(config, start: SFTStart, plan, *, fresh: bool = False):
    """The policy as a PeftModel on the base model (as ``plan`` loads it): the SFT adapter, trainable, or with
    ``fresh`` a new LoRA adapter from the config's LoRA keys (zero update at start: the reference is the base)."""
    from peft import PeftModel

    from core.modeling import attach_lora, quiet_peft_probe
    from core.token_rows import fold_token_rows, trained_token_rows
    from core.training import load_base_for

    base = load_base_for(config, start.base_model, plan)
    if fresh:
        model = attach_lora(base, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                            target_modules=config.lora_target_modules, seed=config.seed)
    else:
        with quiet_peft_probe():
            model = PeftModel.from_pretrained(base, str(start.sft_dir), adapter_name=POLICY_ADAPTER, is_trainable=True)
        if fold_token_rows(model, POLICY_ADAPTER):  # TRL samples and scores with lm_head.weight: see core/token_rows.py
            say(f"the SFT run trained token rows {trained_token_rows(start.sft_dir)}: kept (frozen) for policy and reference")
    model.config.use_cache = False
    if plan.device_map is None:
        model.to(plan.device)
    return model


def match_reference_dtype(model) -> int:
    """Give each reference weight its policy twin's dtype; returns how many were cast.

    With a 4-bit base TRL casts the trainable (policy) adapter to bf16 but leaves its frozen copy in
    fp32, so at step 0 policy and reference would differ by rounding (DPO's "before" rewards noise
    instead of exactly 0, RLOO's KL not 0). Casting the copy makes the reference exactly the starting policy.
    """
    cast = 0
    for name, param in model.named_parameters():
        if f".{REFERENCE_ADAPTER}." in name:
            twin = model.get_parameter(name.replace(f".{REFERENCE_ADAPTER}.", f".{POLICY_ADAPTER}."))
            if param.dtype != twin.dtype:
                param.data = param.data.to(twin.dtype)
                cast += 1
    return cast


def check_reference(trainer) -> None:
    """Fail loudly if TRL did not set the reference up as the run states it (a TRL version change)."""
    adapters = set(getattr(trainer.model, "peft_config", {}))
    if trainer.ref_model is not None or REFERENCE_ADAPTER not in adapters:
        raise RuntimeError(f"expected TRL to keep the reference as a frozen '{REFERENCE_ADAPTER}' adapter; got adapters "
                           f"{sorted(adapters)} and ref_model={type(trainer.ref_model).__name__} (TRL version change?)")
    if any(p.requires_grad for n, p in trainer.model.named_parameters() if f".{REFERENCE_ADAPTER}." in n):
        raise RuntimeError("the reference adapter has trainable weights: the reference would move during training")


def save_policy_adapter(model, tokenizer, output_dir: str | Path, sft_dir: Path | None) -> None:
    """The trained adapter alone (not TRL's reference copy) + tokenizer: loads like an SFT adapter.

    ``sft_dir``: the SFT run the adapter continued (None for a fresh one); its trained token rows,
    folded into the base while training and never changed by it, go back into the adapter, so it
    loads on the original base model.
    """
    from core.token_rows import copy_token_rows, trained_token_rows

    model.save_pretrained(str(output_dir), selected_adapters=[POLICY_ADAPTER])
    if sft_dir is not None and trained_token_rows(sft_dir):
        copy_token_rows(sft_dir, output_dir)
    tokenizer.save_pretrained(str(output_dir))


# --------------------------------------------------------------------------- sampling


def load_policy_for_sampling(sft_dir: str | Path, device: str = "auto", dtype=None):
    """(the SFT model in eval mode on ``device``, its tokenizer): to sample from, as DPO's rejected answers are.
    ``dtype``: its weights' (default fp32)."""
    from core.modeling import load_adapter_model, load_tokenizer, pick_device

    run = read_run(sft_dir, expect="sft")
    target = pick_device(device)
    weights = {"dtype": dtype} if dtype is not None else {}
    model = load_adapter_model(run.run_dir, base_model=run.base_model, trust_remote_code=run.trust_remote_code,
                               **weights).to(target)
    tokenizer = load_tokenizer(run.base_model, run.tokenizer_source, trust_remote_code=run.trust_remote_code)
    model.eval()
    return model, tokenizer
