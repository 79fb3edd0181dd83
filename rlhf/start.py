"""Where an RLHF run starts: the SFT run it builds on (base model, tokenizer, template, adapter).

Both RLHF stages read the SFT run through ``core.runs.read_run`` (never by importing ``sft/``):
the reward model and the RLOO policy see prompts in exactly the template SFT trained with.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.cli import UserError
from core.config import ConfigError
from core.prompting import PromptTemplate, load_template
from core.runs import read_run, run_stage


@dataclass(frozen=True)
class SFTStart:
    """What the SFT run (if any) fixes for a later stage."""

    base_model: str
    tokenizer_source: str | None  # None: the base model's tokenizer
    template: PromptTemplate
    sft_dir: Path | None
    sft_payload: dict | None  # its sft_config.json
    trust_remote_code: bool = False

    @property
    def sft_train_file(self) -> str | None:
        return ((self.sft_payload or {}).get("config") or {}).get("train_file")


def read_sft_start(sft_adapter_dir: str, *, need_adapter: bool, model_name_or_path: str | None = None,
                   tokenizer_name_or_path: str | None = None, template: str | None = None,
                   trust_remote_code: bool = False, why: str = "") -> SFTStart:
    """Read the SFT run; one-line errors when what the config asks for is not there."""
    sft_dir = Path(sft_adapter_dir)
    run = read_run(sft_dir, expect="sft") if run_stage(sft_dir) == "sft" else None
    if need_adapter and not (run and run.has_adapter):
        raise UserError(f"{why or 'this run'} needs a finished SFT run in {sft_adapter_dir} (adapter_config.json and "
                        "sft_config.json): train one with python -m sft.train_sft_mac or pass --sft_adapter_dir")
    if run is None and model_name_or_path is None:
        raise UserError(f"no SFT run in {sft_adapter_dir} to take the base model from: pass --sft_adapter_dir "
                        "or --model_name_or_path")
    try:
        chosen = load_template(template) if template is not None else (run.template if run else load_template())
    except ValueError as exc:  # an unknown --template
        raise ConfigError(str(exc)) from None
    return SFTStart(model_name_or_path or run.base_model,
                    tokenizer_name_or_path or (run.tokenizer_source if run else None), chosen,
                    run.run_dir if run else None, run.payload if run else None,
                    trust_remote_code or bool(run and run.trust_remote_code))
