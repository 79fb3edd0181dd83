"""The one place where DPO training is wired: start point, reference, TRL's DPOTrainer, outputs.

``python -m dpo.train_dpo_mac`` and ``python -m dpo.train_dpo_cuda`` both call :func:`run_dpo`; they
differ only in the :class:`DevicePlan` they pass (where the model runs, 4-bit or not).

What happens, in order:

1. the config is resolved; the SFT run named by ``--sft_adapter_dir`` is read (base model,
   template, tokenizer); the pair files are read and checked; the output dir is checked (another run
   is refused unless ``--resume`` or ``--overwrite_output_dir``). All before any model is loaded;
2. ``dpo_config.json`` is written: the config, the template (same shape as ``sft_config.json``),
   the base model, the SFT run's config and which reference is used;
3. pairs are tokenised exactly as SFT tokenises an example (``core/pairs.py``), counts printed;
4. the policy is built: ``--init sft`` loads the SFT adapter *trainable* onto the base model, and
   TRL's DPOTrainer copies it into a frozen adapter named ``ref``, which is the reference: the SFT
   model, with one base model in memory (an SFT run's trained EOS row, ``--train_eos_embedding``, is
   folded into the base for both: see core/token_rows.py). ``--init base`` attaches a fresh LoRA adapter (zero
   update at start), so the reference (TRL's frozen copy of it) is exactly the base model;
5. TRL's ``DPOTrainer`` trains (its loss, its reward metrics), evaluating on the held-out pairs
   before the first step and every ``eval_steps``: ``trainer_state.json`` holds the reward accuracy
   and margin (relative to the reference) before and after. Checkpoints are crash-safe and
   resumable (``core/checkpoints.py``);
6. ``output_dir`` receives the DPO LoRA adapter (on the same base model, loadable like the SFT
   adapter), tokenizer, ``trainer_state.json``, ``metrics.json``, ``loss_curve.png``,
   ``reward_curves.png``, TensorBoard logs and a model-card ``README.md``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from transformers import TrainerCallback

from core.cli import UserError
from core.config import ConfigError
from core.modeling import attach_lora, load_adapter_model, load_tokenizer, pick_device, trainable_parameter_summary
from core.prompting import PromptTemplate, load_template, prompt_format
from core.reporting import (first_and_last, fmt_value, format_table, fraction_text, loss_points, plot_loss_curve, plot_panels,
                            write_metrics, write_model_card)
from core.runs import RunRecord, prepare_output_dir, read_run, run_stage
from core.log import is_main_process, say, use_readable_log
from core.training import (DevicePlan, load_base_for, train_or_finish, training_arguments, run_facts, watch_run)
from dpo.dpo_config import CONFIG_FILENAME, DPOConfig, describe, parse_dpo_config, save_dpo_config
from dpo.trainer import SHOWN_KEYS, dpo_trainer_class
from core.pairs import PAIRS_STATS_FILE, EncodedPairs, PairData, encode_pair_files, pairs_origin, read_pair_files
from core.token_rows import copy_token_rows, fold_token_rows, trained_token_rows

METRICS_FILENAME = "metrics.json"
LOSS_CURVE_FILENAME = "loss_curve.png"
REWARD_CURVES_FILENAME = "reward_curves.png"
REFERENCE_ADAPTER = "ref"  # the name TRL gives its frozen copy of a pretrained adapter
POLICY_ADAPTER = "default"


# --------------------------------------------------------------------------- where a run starts


@dataclass(frozen=True)
class StartPoint:
    """What the SFT run (if any) fixes for DPO: base model, tokenizer, template, adapter."""

    base_model: str
    tokenizer_source: str | None  # None: the base model's tokenizer
    template: PromptTemplate
    sft_dir: Path | None  # the SFT run's output dir, when there is one
    sft_payload: dict | None  # its sft_config.json

    def reference_model(self, init: str) -> str:
        return f"base + SFT adapter {self.sft_dir}" if init == "sft" else f"base model {self.base_model}"


def _sft_run(config: DPOConfig) -> RunRecord | None:
    sft_dir = Path(config.sft_adapter_dir)
    return read_run(sft_dir, expect="sft") if run_stage(sft_dir) == "sft" else None


def resolve_start(config: DPOConfig) -> StartPoint:
    """Read the SFT run; fail in one line when the start point the config asks for does not exist."""
    run = _sft_run(config)
    if config.init == "sft" and not (run and run.has_adapter):
        raise UserError(f"--init sft needs a finished SFT run in {config.sft_adapter_dir} (adapter_config.json and "
                        "sft_config.json): train one with python -m sft.train_sft_mac, pass --sft_adapter_dir, or use --init base")
    if run is None and config.model_name_or_path is None:
        raise UserError(f"no SFT run in {config.sft_adapter_dir} to take the base model from: pass --sft_adapter_dir "
                        "or --model_name_or_path")
    template = run.template if run else load_template(config.template or "alpaca")
    if run and config.template is not None and load_template(config.template).to_dict() != template.to_dict():
        raise UserError(f"--template {config.template} differs from the template the SFT run in {run.run_dir} trained with "
                        f"({template.name}): DPO renders pairs with the SFT run's template (drop --template)")
    return StartPoint(config.model_name_or_path or run.base_model,
                      config.tokenizer_name_or_path or (run.tokenizer_source if run else None),
                      template, run.run_dir if run else None, run.payload if run else None)


# --------------------------------------------------------------------------- model


def load_policy(config: DPOConfig, start: StartPoint, plan: DevicePlan):
    """The trainable policy as a PeftModel: the SFT adapter (trainable) or a fresh LoRA adapter."""
    from peft import PeftModel

    base = load_base_for(config, start.base_model, plan)
    if config.init == "sft":
        model = PeftModel.from_pretrained(base, str(start.sft_dir), adapter_name=POLICY_ADAPTER, is_trainable=True)
        if fold_token_rows(model, POLICY_ADAPTER):  # TRL scores with lm_head.weight: see core/token_rows.py
            say(f"the SFT run trained token rows {trained_token_rows(start.sft_dir)}: kept (frozen) for policy and reference")
    else:
        model = attach_lora(base, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                            target_modules=config.lora_target_modules, seed=config.seed)
    model.config.use_cache = False
    if plan.device_map is None:
        model.to(plan.device)
    return model


def load_policy_for_sampling(sft_dir: str | Path, device: str = "auto"):
    """(SFT model in eval mode, its tokenizer, its run record) for sampling rejected responses."""
    run = read_run(sft_dir, expect="sft")
    target = pick_device(device)
    model = load_adapter_model(run.run_dir, base_model=run.base_model, trust_remote_code=run.trust_remote_code).to(target)
    tokenizer = load_tokenizer(run.base_model, run.tokenizer_source, trust_remote_code=run.trust_remote_code)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------- data


def _as_dataset(encoded: EncodedPairs):
    from datasets import Dataset

    return Dataset.from_list(encoded.features) if encoded.features else None


# --------------------------------------------------------------------------- trainer


def dpo_arguments(config: DPOConfig, plan: DevicePlan, *, resuming: bool, has_eval: bool):
    """TRL DPOConfig: SFT's TrainingArguments (same names, same checkpoint policy) plus DPO's own keys."""
    from trl import DPOConfig as TrlDPOConfig

    return training_arguments(
        config, plan, resuming=resuming, has_eval=has_eval, args_class=TrlDPOConfig,
        beta=config.beta, loss_type=[config.loss_type], label_smoothing=config.label_smoothing,
        max_length=config.max_length, truncation_mode="keep_start",
        prediction_loss_only=True,  # TRL's metrics come from the loss pass; logits would cost a second forward
        disable_dropout=True,  # DPO compares log-probs of two forwards: dropout would add noise to the reward
    )


def build_dpo_trainer(config: DPOConfig, model, tokenizer, data: PairData, plan: DevicePlan, *,
                      resuming: bool = False, callbacks: Sequence[TrainerCallback] = ()):
    """TRL's DPOTrainer on pre-tokenised pairs, with crash-safe checkpoints; the reference is set up by TRL."""
    val = _as_dataset(data.val)
    trainer = dpo_trainer_class()(
        model=model,
        args=dpo_arguments(config, plan, resuming=resuming, has_eval=val is not None),
        train_dataset=_as_dataset(data.train),
        eval_dataset=val,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    watch_run(trainer, plan, config.save_total_limit)
    use_readable_log(trainer, SHOWN_KEYS)  # TRL's entropy, logits and token counts stay in the JSON log
    check_reference(config, trainer)
    match_reference_dtype(trainer.model)
    return trainer


def match_reference_dtype(model) -> int:
    """Give each reference weight its policy twin's dtype; returns how many were cast.

    With a 4-bit base TRL casts the trainable (policy) adapter to bf16 but leaves its frozen copy in
    fp32, so at step 0 policy and reference would differ by rounding and the "before" rewards would
    be noise instead of exactly 0. Casting the copy makes the reference exactly the starting policy.
    """
    cast = 0
    for name, param in model.named_parameters():
        if f".{REFERENCE_ADAPTER}." in name:
            twin = model.get_parameter(name.replace(f".{REFERENCE_ADAPTER}.", f".{POLICY_ADAPTER}."))
            if param.dtype != twin.dtype:
                param.data = param.data.to(twin.dtype)
                cast += 1
    return cast


def check_reference(config: DPOConfig, trainer) -> None:
    """Fail loudly if TRL did not set the reference up as this run states it."""
    adapters = set(getattr(trainer.model, "peft_config", {}))
    if trainer.ref_model is not None or REFERENCE_ADAPTER not in adapters:
        raise RuntimeError(f"expected TRL to keep the reference as a frozen '{REFERENCE_ADAPTER}' adapter; got adapters "
                           f"{sorted(adapters)} and ref_model={type(trainer.ref_model).__name__} (TRL version change?)")
    frozen = all(not p.requires_grad for n, p in trainer.model.named_parameters() if f".{REFERENCE_ADAPTER}." in n)
    if not frozen:
        raise RuntimeError("the reference adapter has trainable weights: the reference would move during training")


# --------------------------------------------------------------------------- the run


def check_before_loading(config: DPOConfig) -> tuple[StartPoint, tuple[list[dict], list[dict]]]:
    try:
        start = resolve_start(config)
    except ValueError as exc:  # an unknown --template
        raise ConfigError(str(exc)) from None
    rows = read_pair_files(config)
    check_pairs_origin(config, start)
    return start, rows


def check_pairs_origin(config: DPOConfig, start: StartPoint) -> None:
    """Refuse pairs sampled from another SFT run (their ``prefs_stats.json`` says which), unless
    ``--allow_foreign_pairs``; say where the pairs come from either way. Pairs imported from a file
    record no model and are used as they are."""
    for pairs_file in dict.fromkeys((config.train_file, config.val_file)):
        stats = pairs_origin(pairs_file) or {}
        sampled_from = stats.get("sft_model")
        if not sampled_from:
            continue
        if start.sft_dir is not None:
            ours, same = f"--sft_adapter_dir {start.sft_dir}", Path(sampled_from).resolve() == Path(start.sft_dir).resolve()
        else:
            ours, same = f"the base model {start.base_model}", stats.get("base_model") == start.base_model
        if same:
            say(f"pairs in {pairs_file}: sampled from the SFT run {sampled_from} ({PAIRS_STATS_FILE})")
        elif config.allow_foreign_pairs:
            say(f"note: --allow_foreign_pairs: {pairs_file} was sampled from the SFT run {sampled_from}, not from {ours}")
        else:
            raise UserError(
                f"{pairs_file} holds pairs sampled from the SFT run {sampled_from} ({PAIRS_STATS_FILE}), not from {ours}: "
                "their rejected answers are another model's, so DPO would push this model away from text it never "
                "wrote (and eval does not score such pairs for it). Make pairs from this run (python "
                f"scripts/prepare_dpo_data.py --from_sft_model {start.sft_dir or 'SFT_DIR'}), or pass "
                "--allow_foreign_pairs to train on them anyway")


def run_dpo(argv: Sequence[str] | None, *, preset: str, plan_model: Callable[[DPOConfig], DevicePlan],
            prog: str, description: str, entry_point: str = "", callbacks: Sequence[TrainerCallback] = (),
            config: DPOConfig | None = None) -> int:
    """Everything both entry points do; ``plan_model`` is the only part that differs. ``config``: already
    parsed by the entry point (else parsed from ``argv``)."""
    session_start = time.perf_counter()
    from core.tokenization import ensure_pad_token

    config = config or parse_dpo_config(argv, preset=preset, prog=prog, description=description)
    plan = plan_model(config)
    start, rows = check_before_loading(config)
    resume_from = prepare_output_dir(config, CONFIG_FILENAME, log=say, is_main=is_main_process())
    say(describe(config))
    say(plan.line())
    say(f"policy starts from: {'the SFT adapter in ' + str(start.sft_dir) if config.init == 'sft' else 'a fresh LoRA adapter'} "
        f"on {start.base_model}; reference: {config.reference_description()}")
    if is_main_process():
        save_dpo_config(config, config.output_dir, start.template, preset=preset, base_model=start.base_model,
                        extra=run_record(config, start, entry_point or prog))

    tokenizer = load_tokenizer(start.base_model, start.tokenizer_source, config.trust_remote_code)
    ensure_pad_token(tokenizer)
    data = encode_pair_files(config, rows, prompt_format(start.template, tokenizer))
    say(f"pairs: {data.summary()}")
    model = load_policy(config, start, plan)
    say(trainable_parameter_summary(model))

    trainer = build_dpo_trainer(config, model, tokenizer, data, plan, resuming=resume_from is not None, callbacks=callbacks)
    train_or_finish(trainer, resume_from)
    finish_run(config, start, trainer, tokenizer, data, plan, preset=preset, resumed_from=resume_from,
               session_seconds=time.perf_counter() - session_start)
    return 0


def run_record(config: DPOConfig, start: StartPoint, entry_point: str) -> dict:
    """What eval and later readers need beyond the config: the resolved base model and the SFT run."""
    return {
        "entry_point": entry_point,
        "base_model": start.base_model,
        "reference_model": start.reference_model(config.init),
        "sft_run_dir": str(start.sft_dir) if start.sft_dir else None,
        "sft_run": start.sft_payload,
    }


# --------------------------------------------------------------------------- outputs


def _rewards_note(init: str) -> str:
    start = ("with --init sft the policy starts as the SFT adapter, which is the reference" if init == "sft" else
             "with --init base the fresh adapter adds exactly zero, so the policy starts as the reference (the base model)")
    return (f"rewards are beta * (log p_policy - log p_reference) of the response tokens; {start}: before step 1 every "
            "reward is 0, all pairs tie and the accuracy is undefined (null), not 0")


def run_metrics(trainer, data: PairData, plan: DevicePlan, *, resumed_from: Path | None, session_seconds: float,
                init: str = "sft") -> dict:
    history = trainer.state.log_history
    metrics: dict[str, Any] = {"global_step": trainer.state.global_step, "epoch": trainer.state.epoch}
    for name, key in (("val_loss", "eval_loss"), ("val_reward_accuracy", "eval_rewards/accuracies"),
                      ("val_reward_margin", "eval_rewards/margins"), ("val_reward_chosen", "eval_rewards/chosen"),
                      ("val_reward_rejected", "eval_rewards/rejected")):
        metrics[f"{name}_before"], metrics[f"{name}_after"] = first_and_last(history, key)
    # exact counts over the held-out pairs (dpo/trainer.py), with the reference they are measured against
    correct = [int(v) if v is not None else None for v in first_and_last(history, "eval_pairs_correct")]
    metrics["val_pairs_correct_before"], metrics["val_pairs_correct_after"] = correct
    metrics["val_pairs"] = int(first_and_last(history, "eval_pairs")[1] or 0) or None
    metrics["val_reward_reference"] = reference_name(init)
    if metrics["val_reward_chosen_before"] == 0 and metrics["val_reward_rejected_before"] == 0:
        metrics["val_reward_accuracy_before"] = None  # every pair ties: TRL counts ties as wrong, which says nothing
        metrics["val_pairs_correct_before"] = None
    train = loss_points(history, "loss")
    metrics.update({
        "train_loss_first_logged": train[0][1] if train else None,
        "train_loss_last_logged": train[-1][1] if train else None,
        "train_tokens_seen": int(trainer.state.num_input_tokens_seen),
        **run_facts(trainer, plan, resumed_from=resumed_from, session_seconds=session_seconds),
        "rewards_note": _rewards_note(init),
        "data": data.stats(),
    })
    return metrics


def plot_reward_curves(log_history, path: str | Path, title: str) -> Path:
    """Reward accuracy and mean reward margin against step, train and held-out, as one PNG."""
    return plot_panels(log_history, path, title, [("reward accuracy", "rewards/accuracies", "eval_rewards/accuracies"),
                                                  ("reward margin", "rewards/margins", "eval_rewards/margins")])


def save_policy_adapter(trainer, tokenizer, output_dir: Path, start: StartPoint | None = None, init: str = "sft") -> None:
    """The DPO adapter alone (not TRL's reference copy) + tokenizer: loads like an SFT adapter.

    With ``--init sft`` from a run with trained token rows, the rows (folded into the base during
    DPO, never changed by it) go back into the adapter, so it loads on the original base model.
    """
    trainer.model.save_pretrained(str(output_dir), selected_adapters=[POLICY_ADAPTER])
    if init == "sft" and start is not None and start.sft_dir is not None and trained_token_rows(start.sft_dir):
        copy_token_rows(start.sft_dir, output_dir)
    tokenizer.save_pretrained(str(output_dir))


def finish_run(config: DPOConfig, start: StartPoint, trainer, tokenizer, data: PairData, plan: DevicePlan, *,
               preset: str, resumed_from: Path | None, session_seconds: float) -> dict:
    output_dir = Path(config.output_dir)
    trainer.save_state()
    metrics = run_metrics(trainer, data, plan, resumed_from=resumed_from, session_seconds=session_seconds, init=config.init)
    if trainer.is_world_process_zero():
        save_policy_adapter(trainer, tokenizer, output_dir, start, config.init)
        write_metrics(output_dir / METRICS_FILENAME, metrics)
        name = Path(start.base_model).name
        plot_loss_curve(trainer.state.log_history, output_dir / LOSS_CURVE_FILENAME, title=f"DPO of {name} (init {config.init})",
                        ylabel="DPO loss")
        plot_reward_curves(trainer.state.log_history, output_dir / REWARD_CURVES_FILENAME, title=f"DPO ({config.init})")
        write_model_card(output_dir / "README.md", f"LoRA DPO adapter for {start.base_model}",
                         model_card_sections(config, start, metrics, preset, output_dir))
        say(summary_line(metrics, output_dir))
    return metrics


def reference_name(init: str) -> str:
    return "SFT" if init == "sft" else "base"


def accuracy_title(metrics: dict) -> str:
    """The held-out accuracy's name, with its reference: DPO's (vs the SFT model) is not eval's "pref acc" (vs base)."""
    return f"held-out DPO reward accuracy (vs {metrics.get('val_reward_reference', 'SFT')} reference)"


def accuracy_text(metrics: dict, when: str) -> str:
    """``12/13 = 0.923``; "n/a (every pair ties)" before training, when policy and reference are one model."""
    correct, pairs = metrics.get(f"val_pairs_correct_{when}"), metrics.get("val_pairs")
    if correct is not None and pairs:
        return fraction_text(correct, pairs)
    if when == "before" and metrics.get("val_reward_chosen_before") == 0:
        return "n/a (every pair ties)"
    return fmt_value(metrics.get(f"val_reward_accuracy_{when}"), ".3f")


def summary_line(metrics: dict, output_dir: Path) -> str:
    return (f"done: {metrics['global_step']} steps; {accuracy_title(metrics)} {accuracy_text(metrics, 'before')} -> "
            f"{accuracy_text(metrics, 'after')}, margin {fmt_value(metrics['val_reward_margin_before'])} -> "
            f"{fmt_value(metrics['val_reward_margin_after'])}, loss {fmt_value(metrics['val_loss_before'])} -> "
            f"{fmt_value(metrics['val_loss_after'])}; peak memory {metrics['peak_memory_mb']} MiB; outputs in {output_dir}")


def model_card_sections(config: DPOConfig, start: StartPoint, metrics: dict, preset: str,
                        output_dir: Path | None = None) -> dict[str, str]:
    quant = f"4-bit {config.bnb_4bit_quant_type} base (QLoRA)" if config.load_in_4bit else "full-precision base"
    policy = f"the SFT adapter from `{start.sft_dir}`" if config.init == "sft" else \
        f"a fresh LoRA adapter (r={config.lora_r}, alpha={config.lora_alpha}) on {', '.join(config.lora_target_modules)}"
    how = (f"Direct Preference Optimization (TRL `DPOTrainer`, loss `{config.loss_type}`, beta {config.beta}) of "
           f"`{start.base_model}`; the policy started from {policy} (`--init {config.init}`) and the reference was the "
           f"{config.reference_description()}. {quant}, {metrics['precision']} compute on {metrics['device']} (preset "
           f"`{preset}`). Pairs: `{config.train_file}` (held-out `{config.val_file}`), template `{start.template.name}`, "
           f"max_length {config.max_length}. {metrics['global_step']} optimizer steps, learning rate {config.learning_rate} "
           f"({config.lr_scheduler_type}), effective batch {config.per_device_train_batch_size * config.gradient_accumulation_steps * metrics['world_size']} "
           f"pairs, seed {config.seed}. The full config is in `{CONFIG_FILENAME}`.")
    results = format_table({
        f"{accuracy_title(metrics)}, before": accuracy_text(metrics, "before"),
        f"{accuracy_title(metrics)}, after": accuracy_text(metrics, "after"),
        "held-out reward margin before": metrics["val_reward_margin_before"],
        "held-out reward margin after": metrics["val_reward_margin_after"],
        "held-out DPO loss before": metrics["val_loss_before"], "held-out DPO loss after": metrics["val_loss_after"],
        "peak memory (MiB)": metrics["peak_memory_mb"],
    })
    here = str(output_dir or config.output_dir)
    load = ("```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"base = AutoModelForCausalLM.from_pretrained({start.base_model!r})\n"
            f"model = PeftModel.from_pretrained(base, {here!r})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({here!r})\n```\n\n"
            f"Prompt with the template saved in `{CONFIG_FILENAME}`. Compare with the base and SFT models:\n"
            f"`python -m sft.eval_sft --adapter_dir {start.sft_dir or 'SFT_DIR'} {here}`.")
    files = ("`adapter_model.safetensors` + `adapter_config.json` (the DPO LoRA adapter), tokenizer files, "
             f"`{CONFIG_FILENAME}` (resolved config, template, reference, SFT run), `trainer_state.json` (log history "
             "with held-out rewards), `metrics.json`, `loss_curve.png`, `reward_curves.png`, `runs/` (TensorBoard), "
             "`checkpoint-*/` (resumable checkpoints, with TRL's reference copy in `ref/`).")
    return {"How it was trained": how, "Results": results, "How to load it": load, "Files": files}
