"""The one place where DPO training is wired: start point, reference, TRL's DPOTrainer, outputs.

``python -m dpo.train_dpo_mac`` and ``python -m dpo.train_dpo_cuda`` both call :func:`run_dpo`; they
differ only in the :class:`DevicePlan` they pass (where the model runs, 4-bit or not). The run's steps
are every stage's (``core/stage.py``); the start point, policy and reference are ``core/policy.py``'s.

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
   and margin (relative to the reference) before and after. Each pair's reference log-probs are
   computed once, at its first use, and reused at every later evaluation and epoch
   (``dpo/reference_cache.py``, ``--reference_cache``). Checkpoints are crash-safe and resumable
   (``core/checkpoints.py``), and hold those log-probs for the resumed run;
6. ``output_dir`` receives the DPO LoRA adapter (on the same base model, loadable like the SFT
   adapter), tokenizer, ``trainer_state.json``, ``metrics.json``, ``loss_curve.png``,
   ``reward_curves.png``, TensorBoard logs and a model-card ``README.md``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from transformers import TrainerCallback

from core.cli import UserError
from core.log import pair_accuracy_text, say, use_readable_log
from core.pairs import (PAIRS_STATS_FILE, EncodedPairs, PairData, encode_pair_files, pairs_origin, pairs_phrase,
                        read_pair_files)
from core.policy import REFERENCE_ADAPTER  # the reference adapter of a DPO run (tests import it from here)
from core.policy import (SFTStart, check_reference, load_trainable_policy, match_reference_dtype, read_sft_start,
                         save_policy_adapter)
from core.prompting import prompt_format
from core.reporting import (LOSS_CURVE_FILENAME, adapter_load_code, base_phrase, effective_batch, first_and_last,
                            fmt_value, format_table, loss_points, plot_loss_curve, plot_panels)
from core.stage import RunFromSFT, tokenizer_with_pad
from core.training import DevicePlan, run_facts, training_arguments, watch_run
from dpo.dpo_config import CONFIG_FILENAME, DPOConfig
from dpo.reference_cache import ReferenceCache, reference_fingerprint
from dpo.trainer import SHOWN_KEYS, dpo_trainer_class, time_reference_forwards, use_reference_cache

REWARD_CURVES_FILENAME = "reward_curves.png"


# --------------------------------------------------------------------------- where a run starts


def resolve_start(config: DPOConfig) -> SFTStart:
    """Read the SFT run; fail in one line when the start point the config asks for does not exist."""
    return read_sft_start(config.sft_adapter_dir, need_adapter=config.init == "sft", why="--init sft",
                          or_else=", pass --sft_adapter_dir, or use --init base", renders="DPO renders pairs",
                          model_name_or_path=config.model_name_or_path,
                          tokenizer_name_or_path=config.tokenizer_name_or_path, template=config.template)


def load_policy(config: DPOConfig, start: SFTStart, plan: DevicePlan):
    """The trainable policy as a PeftModel: the SFT adapter (trainable) or, with ``--init base``, a fresh LoRA adapter."""
    return load_trainable_policy(config, start, plan, fresh=config.init == "base")


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
    check_reference(trainer)
    match_reference_dtype(trainer.model)
    return trainer


# --------------------------------------------------------------------------- the run


def check_before_loading(config: DPOConfig) -> tuple[SFTStart, tuple[list[dict], list[dict]]]:
    """The start point and both pair files, checked (one-line errors) before any model is loaded."""
    start = resolve_start(config)
    rows = read_pair_files(config)
    check_pairs_origin(config, start)
    return start, rows


def check_pairs_origin(config: DPOConfig, start: SFTStart) -> None:
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


class DPORun(RunFromSFT):
    """DPO's part of a run (``core/stage.py`` has the steps and their order)."""

    config_class = DPOConfig
    reference_cache: ReferenceCache | None = None  # set once the trainer is built (--reference_cache)

    def check(self) -> bool:
        self.start, self.rows = check_before_loading(self.config)
        return True

    def intro(self) -> list[str]:
        config, start = self.config, self.start
        policy = "the SFT adapter in " + str(start.sft_dir) if config.init == "sft" else "a fresh LoRA adapter"
        return [f"policy starts from: {policy} on {start.base_model}; reference: {config.reference_description()}"]

    def record(self) -> dict:
        """What eval and later readers need beyond the config: the reference, the resolved base model and the SFT run."""
        return {"reference": self.config.reference_description(),
                **self.start.record(self.entry_point, reference_model=self.start.reference_model(self.config.init))}

    def load_tokenizer(self):
        return tokenizer_with_pad(self.start.base_model, self.start.tokenizer_source, self.config.trust_remote_code)

    def load_data(self) -> PairData:
        data = encode_pair_files(self.config, self.rows, prompt_format(self.start.template, self.tokenizer))
        say(f"pairs: {data.summary()}")
        return data

    def load_model(self):
        return load_policy(self.config, self.start, self.plan)

    def build_trainer(self, model):
        return build_dpo_trainer(self.config, model, self.tokenizer, self.data, self.plan,
                                 resuming=self.resume_from is not None, callbacks=self.callbacks)

    def trainer_built(self, trainer) -> None:
        time_reference_forwards(trainer, self.clock)  # metrics.json's phases: the reference's share apart
        self.reference_cache = attach_reference_cache(trainer, self.config, self.start, self.resume_from)

    def train(self, trainer) -> None:
        super().train(trainer)
        if self.reference_cache is not None and (line := self.reference_cache.summary()):
            say(line)

    def save_model(self, trainer, output_dir: Path) -> None:
        if trainer.is_world_process_zero():  # the DPO adapter alone, not TRL's reference copy
            save_policy_adapter(trainer.model, self.tokenizer, output_dir,
                                self.start.sft_dir if self.config.init == "sft" else None)

    def metrics(self, trainer, session_seconds: float) -> dict:
        metrics = run_metrics(trainer, self.data, self.plan, resumed_from=self.resume_from,
                              session_seconds=session_seconds, init=self.config.init)
        if self.reference_cache is not None:
            metrics["reference_cache"] = self.reference_cache.record()
        return metrics

    def plot(self, log_history: list, output_dir: Path) -> None:
        init = self.config.init
        plot_loss_curve(log_history, output_dir / LOSS_CURVE_FILENAME,
                        title=f"DPO of {Path(self.start.base_model).name} (init {init})", ylabel="DPO loss")
        plot_reward_curves(log_history, output_dir / REWARD_CURVES_FILENAME, title=f"DPO ({init})")

    def card(self, metrics: dict, output_dir: Path) -> tuple[str, dict[str, str]]:
        return (f"LoRA DPO adapter for {self.start.base_model}",
                model_card_sections(self.config, self.start, metrics, self.preset, output_dir))

    def summary_line(self, metrics: dict, output_dir: Path) -> str:
        return (f"done: {metrics['global_step']} steps; {accuracy_title(metrics)} {accuracy_text(metrics, 'before')} -> "
                f"{accuracy_text(metrics, 'after')}, margin {fmt_value(metrics['val_reward_margin_before'])} -> "
                f"{fmt_value(metrics['val_reward_margin_after'])}, loss {fmt_value(metrics['val_loss_before'])} -> "
                f"{fmt_value(metrics['val_loss_after'])}; peak memory {metrics['peak_memory_mb']} MiB; outputs in {output_dir}")


run_dpo = DPORun.launch


def attach_reference_cache(trainer, config: DPOConfig, start: SFTStart, resume_from: Path | None) -> ReferenceCache | None:
    """The reference log-probs cache (``--reference_cache``), with a resumed run's checkpoint's read back."""
    if not config.reference_cache:
        return None
    model = trainer.accelerator.unwrap_model(trainer.model)
    cache = ReferenceCache(reference_fingerprint(model, start.base_model, REFERENCE_ADAPTER))
    if resume_from is not None and (why_not := cache.load(resume_from)):
        say(f"reference log-probs: computed afresh: {why_not}")
    use_reference_cache(trainer, cache)
    return cache


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


def reference_name(init: str) -> str:
    return "SFT" if init == "sft" else "base"


def accuracy_title(metrics: dict) -> str:
    """The held-out accuracy's name, with its reference: DPO's (vs the SFT model) is not eval's "pref acc" (vs base)."""
    return f"held-out DPO reward accuracy (vs {metrics.get('val_reward_reference', 'SFT')} reference)"


def accuracy_text(metrics: dict, when: str) -> str:
    """``12/13 = 0.923``; "n/a (every pair ties)" where policy and reference are one model (before training),
    worded by the function that writes the held-out log lines, so the step-0 line and the summary agree."""
    return (pair_accuracy_text(metrics.get(f"val_pairs_correct_{when}"), metrics.get("val_pairs"),
                               metrics.get(f"val_reward_chosen_{when}"), metrics.get(f"val_reward_rejected_{when}"))
            or fmt_value(metrics.get(f"val_reward_accuracy_{when}"), ".3f"))


def model_card_sections(config: DPOConfig, start: SFTStart, metrics: dict, preset: str,
                        output_dir: Path | None = None) -> dict[str, str]:
    how = (f"Direct Preference Optimization (TRL `DPOTrainer`, loss `{config.loss_type}`, beta {config.beta}) of "
           f"`{start.base_model}`; the policy started from {start.start_phrase(config)} (`--init {config.init}`) and the "
           f"reference was the {config.reference_description()}. {base_phrase(config)}, {metrics['precision']} compute on "
           f"{metrics['device']} (preset `{preset}`). {pairs_phrase(config, start.template.name)} {metrics['global_step']} "
           f"optimizer steps, learning rate {config.learning_rate} ({config.lr_scheduler_type}), effective batch "
           f"{effective_batch(config, metrics)} pairs, seed {config.seed}. The full config is in `{CONFIG_FILENAME}`.")
    results = format_table({
        f"{accuracy_title(metrics)}, before": accuracy_text(metrics, "before"),
        f"{accuracy_title(metrics)}, after": accuracy_text(metrics, "after"),
        "held-out reward margin before": metrics["val_reward_margin_before"],
        "held-out reward margin after": metrics["val_reward_margin_after"],
        "held-out DPO loss before": metrics["val_loss_before"], "held-out DPO loss after": metrics["val_loss_after"],
        "peak memory (MiB)": metrics["peak_memory_mb"],
    })
    here = str(output_dir or config.output_dir)
    load = (adapter_load_code(repr(start.base_model), here)
            + f"Prompt with the template saved in `{CONFIG_FILENAME}`. Compare with the base and SFT models:\n"
            f"`python -m sft.eval_sft --adapter_dir {start.sft_dir or 'SFT_DIR'} {here}`.")
    files = ("`adapter_model.safetensors` + `adapter_config.json` (the DPO LoRA adapter), tokenizer files, "
             f"`{CONFIG_FILENAME}` (resolved config, template, reference, SFT run), `trainer_state.json` (log history "
             "with held-out rewards), `metrics.json`, `loss_curve.png`, `reward_curves.png`, `runs/` (TensorBoard), "
             "`checkpoint-*/` (resumable checkpoints, with TRL's reference copy in `ref/` and the reference log-probs "
             "computed so far in `reference_logps.json`).")
    return {"How it was trained": how, "Results": results, "How to load it": load, "Files": files}
