"""The eval stage's config: which runs to compare, on what, how long to generate.

    python -m sft.eval_sft --help        # every key, default and meaning
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from core.config import ConfigError, key, resolve_config
from core.keys import EngineKeys, check_engine_keys
from core.model_source import MODEL_SOURCE_HELP
from evaluation.seeds import parse_contrasts

AUTO = "auto"


@dataclass
class EvalConfig(EngineKeys):
    adapter_dir: list[str] = key(["models/sft_output"], "adapter dir(s) to compare; each becomes a column after the base model")
    base_model: Optional[str] = key(None, f"base model: {MODEL_SOURCE_HELP} (default: the one recorded in the first adapter's "
                                         "sft_config.json)")
    val_file: Optional[str] = key(None, "validation JSONL (default: the val_file the first adapter was trained with)")
    num_examples: int = key(20, "held-out validation examples to generate for (with their reference answers)")
    prompts: Optional[str] = key(None, "extra instructions: a text file (one per line, '#' = comment) or JSONL with 'instruction' [, 'input', 'reference']")
    builtin_prompts: bool = key(True, "include the built-in instructions (evaluation/eval_prompts.txt)")
    max_new_tokens: int = key(128, "longest generation, in tokens")
    batch_size: int = key(8, "prompts per generation batch (hf engine) and examples per loss batch")
    max_eval_samples: Optional[int] = key(500, "validation loss over at most N examples, sampled with --seed (none = all)")
    out_dir: Optional[str] = key(None, "where report.md, generations.jsonl, metrics.json go (default: <first adapter_dir>/eval "
                                       "for one adapter, <first adapter_dir>/eval_<labels> for several, e.g. eval_sft_dpo)")
    overwrite: bool = key(False, "replace an evaluation of other columns already in out_dir (the same columns are "
                                 "always replaced)")
    seed: int = key(42, "seed for choosing validation examples and for the bootstrap intervals of the report")
    device: str = key("auto", "where to run: auto = cuda, else mps, else cpu", choices=["auto", "cuda", "mps", "cpu"])
    precision: str = key("auto", "weights dtype: auto = bf16/fp16 on CUDA; bf16 on a CPU with AVX512_BF16/AMX-BF16 "
                                 "where it measures faster; fp32 elsewhere", choices=["auto", "fp32", "bf16", "fp16"])
    show_width: int = key(0, "width of the side-by-side view (side_by_side.txt and the console; 0 = the terminal's)")
    prefs_file: Optional[str] = key(AUTO, "held-out preference pairs for preference accuracy and reward margin (auto = the "
                                     "DPO column's val_file, else data/processed/prefs_val.jsonl if made for this base model; none = off)")
    # Off unless named: a hub id needs the network, so nothing is fetched behind a user's back.
    ifeval: Optional[str] = key(None, "IFEval prompts: a local JSONL in the release format (key, prompt, "
                                      "instruction_id_list, kwargs) or the hub id google/IFEval (none = off)")
    ifbench: Optional[str] = key(None, "IFBench prompts: a local JSONL in the release format or the hub id "
                                       "allenai/IFBench_test (none = off)")
    if_sets: Optional[str] = key(None, "IF prompt files (the out_dir of scripts/prepare_if_prompts.py): score if_val_seen, "
                                       "if_val_heldout (IFEval checkers) and if_val_ood (IFBench's) beside IFEval, and "
                                       "split IFEval by the types training saw vs held out (none = off)")
    if_sets_limit: Optional[int] = key(None, "evaluate only the first N prompts of each IF set (none = all)")
    ifeval_limit: Optional[int] = key(None, "evaluate only the first N IFEval prompts (quick runs; none = all 541)")
    ifbench_limit: Optional[int] = key(None, "evaluate only the first N IFBench prompts (none = all)")
    # Many IFEval prompts ask for 300+ words (~400+ tokens): a shorter cap fails them for length alone.
    if_max_new_tokens: int = key(1024, "longest response to an IFEval/IFBench prompt, in tokens")
    vllm_adapters: str = key("auto", "vllm: serve adapter columns as merged copies or as LoRA on one engine (auto = "
                                     "merged on a CPU, where LoRA measured 4x slower; LoRA on a GPU)",
                             choices=["auto", "merged", "lora"])
    primary_contrasts: Optional[str] = key(None, "the primary contrasts, declared before the run: a comma list of "
                                                 "arm:reference (e.g. sft:base,dpo_if:control); a column <arm>_s<k> is seed k "
                                                 "of <arm>. They are tested on the primary metric, IFEval prompt-level strict, "
                                                 "Holm-adjusted over exactly these; every other p-value is exploratory "
                                                 "(uncorrected). Needs --ifeval (none = no primary contrasts)")
    reward_model: Optional[str] = key(None, "a trained reward model (python -m rlhf.train_reward_mac): report each "
                                            "model's mean reward on its generations (none = off)")

    def validate(self) -> None:
        check_engine_keys(self)
        if not self.adapter_dir:
            raise ConfigError("adapter_dir is empty: name at least one adapter directory")
        for name in ("max_new_tokens", "batch_size", "if_max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_examples < 0:
            raise ConfigError(f"num_examples must be >= 0, got {self.num_examples}")
        if self.max_eval_samples is not None and self.max_eval_samples <= 0:
            raise ConfigError(f"max_eval_samples must be > 0 or none, got {self.max_eval_samples}")
        if self.primary_contrasts is not None:
            try:
                parse_contrasts(self.primary_contrasts)
            except ValueError as exc:
                raise ConfigError(f"primary_contrasts: {exc}") from None
            if not self.ifeval:
                raise ConfigError("primary_contrasts: the primary metric is IFEval prompt-level strict: pass --ifeval too")
        for name in ("ifeval_limit", "ifbench_limit", "if_sets_limit"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0 or none, got {getattr(self, name)}")


def parse_eval_config(argv: Sequence[str] | None = None) -> EvalConfig:
    return resolve_config(EvalConfig, argv, prog="python -m sft.eval_sft", description=__doc__.split("\n\n")[0])


