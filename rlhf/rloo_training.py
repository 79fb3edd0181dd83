"""The one place where RLOO is wired: policy, reference, reward, TRL's RLOOTrainer, outputs.

``python -m rlhf.train_rloo_mac`` and ``python -m rlhf.train_rloo_cuda`` both call :func:`run_rloo`. The run's
steps are every stage's (``core/stage.py``); the start point, policy and reference are ``core/policy.py``'s.

What happens, in order:

1. the config is resolved; the SFT run and the reward model's run are read and checked against
   each other (same base model, same tokenizer: one-line errors otherwise); the prompts are read
   (the SFT run's ``train_file`` or ``--prompt_file``); the output dir is checked. All before any
   model is loaded;
2. ``rloo_config.json`` is written (config, template, base model, SFT run, reward model run);
3. the policy is the SFT adapter loaded *trainable* on the base model; TRL's RLOOTrainer copies it
   into a frozen adapter named ``ref``, the reference (the SFT model, one base model in memory). An
   EOS row the SFT run trained (``--train_eos_embedding``) is folded into the base for both
   (core/token_rows.py) and put back into the saved adapter.
   The reward model is a separate frozen classifier (``rlhf/reward_model.py``);
4. each optimizer step samples ``num_generations`` completions for each of its prompts (prompts
   tokenised exactly as at generation time elsewhere, ``core.tokenization.encode_prompt``), scores
   prompt + completion (+ EOS when it stopped) with the reward model, subtracts the penalties and
   ``beta`` x the summed per-token log-ratio to the reference, and takes a REINFORCE step with
   the leave-one-out baseline (the policy's forward that scores the samples serves the loss too:
   ``rlhf/policy_forward.py``). Reward, KL, completion length and the share of completions that
   stopped are logged each ``logging_steps``, and on held-back monitoring prompts before the first
   step and every ``eval_steps``. Monitoring samples from a forked RNG, so it never changes the
   training samples: a resumed run samples exactly what an uninterrupted one does;
5. ``output_dir`` receives the policy's LoRA adapter (on the same base model, loadable like the SFT
   adapter), tokenizer, ``trainer_state.json``, ``metrics.json``, ``rloo_curves.png`` and a
   model-card ``README.md``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import TrainerCallback

from core.cli import UserError
from core.log import KL_NOTE, kl_text, say, use_readable_log
from core.modeling import torch_dtype, trainable_parameter_summary
from core.phases import ENGINE_START, WEIGHT_PUSH
from core.policy import (SFTStart, check_reference, load_trainable_policy, match_reference_dtype, read_sft_start,
                         save_policy_adapter)
from core.prompting import prompt_format
from core.reporting import adapter_load_code, base_phrase, first_and_last, fmt_value as fmt, format_table, plot_panels
from core.stage import RunFromSFT, tokenizer_with_pad
from core.tokenization import encode_prompt
from core.training import DevicePlan, run_facts, training_arguments, watch_run
from rlhf.policy_forward import PolicyForwardReuse
from rlhf.prompts import PromptSet, build_prompt_set, monitor_file_rows, read_prompt_rows
from rlhf.reward_model import RewardModel, check_reward_compatible, read_reward_run
from rlhf.rewards import load_reward, reward_functions, reward_phrase, reward_weights
from rlhf.verifiable_reward import (VerifiableReward, dataset_rows, mark_benchmark, monitor_set_metrics, monitor_sets_text,
                                    require_constraints, shown_keys)
from rlhf.rloo_config import CONFIG_FILENAME, RLOOConfig

CURVES_FILENAME = "rloo_curves.png"
# (name in the outputs, key TRL logs in training; "eval_" + key on the monitoring prompts)
LOGGED = [("reward", "reward"), ("reward_model", "rewards/reward_model/mean"), ("kl", "kl"),
          ("length", "completions/mean_length"), ("stop_rate", "completions/stop_rate")]
# What a printed log line shows, and its name there (the JSON log and TensorBoard keep all ~30 keys TRL logs)
SHOWN_KEYS = {"reward": "reward", "rewards/reward_model/mean": "RM score", "rewards/checker/mean": "checker", "kl": "KL",
              "completions/mean_length": "length", "completions/stop_rate": "stop rate", "grad_norm": "grad_norm",
              "learning_rate": "lr"}


# --------------------------------------------------------------------------- checks before loading


def resolve_start(config: RLOOConfig) -> SFTStart:
    return read_sft_start(config.sft_adapter_dir, need_adapter=True, why="RLOO (the policy starts from the SFT adapter)",
                          renders="RLOO renders prompts", template=config.template,
                          trust_remote_code=config.trust_remote_code)


def read_prompts(config: RLOOConfig, start: SFTStart, fmt) -> list[dict]:
    source = config.prompt_file or start.sft_train_file
    if not source:
        raise UserError(f"the SFT run in {start.sft_dir} records no train_file: pass --prompt_file")
    rows = mark_benchmark(read_prompt_rows(source, fmt), source)
    if config.uses_checker:
        require_constraints(rows, source)
    return rows


# --------------------------------------------------------------------------- models and trainer


def _rloo_trainer_class():
    from trl import RLOOTrainer

    class SeededRLOOTrainer(RLOOTrainer):
        """TRL's RLOOTrainer with the project's prompt tokenisation, a stop-rate metric, and monitoring
        that leaves the sampling RNG where it was."""

        rollouts = None  # rlhf.rollouts.VLLMRollouts when sampling goes through the vllm engine
        policy_forward = None  # rlhf.policy_forward.PolicyForwardReuse: one policy forward per batch

        # _tokenize_prompts and _generate_single_turn are private RLOOTrainer hooks: pinned by tests/test_trainer_hooks.py
        def _tokenize_prompts(self, prompts: list):
            return [encode_prompt(p, self._tokenizer) for p in prompts], None, {}

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
            if self.rollouts is None:
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields)
            return self.rollouts.generate(prompt_ids, self.state.global_step, evaluating=not self.model.training)

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                               compute_entropy=False, compute_aux_loss=False, **extra):
            """The policy's scoring forward serves its loss too (rlhf/policy_forward.py); every other forward is TRL's."""
            forward = super()._get_per_token_logps_and_entropies
            reuse = self.policy_forward
            if reuse is not None and not compute_aux_loss and all(value is None for value in extra.values()):
                if compute_entropy:  # the loss: the scoring forward's tensors when they are this batch's
                    kept = reuse.take(input_ids, attention_mask, logits_to_keep)
                    if kept is not None:
                        return kept
                elif not torch.is_grad_enabled() and reuse.is_policy(self, model):
                    return reuse.score(self, forward, model, input_ids, attention_mask, logits_to_keep, batch_size, extra)
            return forward(model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy=compute_entropy,
                           compute_aux_loss=compute_aux_loss, **extra)

        def evaluate(self, *args, **kwargs):
            devices = [self.args.device] if self.args.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                return super().evaluate(*args, **kwargs)

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            checker = next((f for f in self.reward_funcs if isinstance(f, VerifiableReward)), None)
            if checker is not None and not self.model.training:  # the monitoring sets' pass counts
                logs.update(checker.flush(self.accelerator))
            per_prompt = next((f.per_prompt for f in self.reward_funcs if getattr(f, "per_prompt", None)), None)
            if per_prompt is not None and not self.model.training:  # per-prompt means for the monitor's paired tests
                per_prompt.flush(self.state.global_step, self.args.output_dir, self.accelerator)
            metrics = self._metrics["train" if self.model.training else "eval"]
            clipped = metrics.get("completions/clipped_ratio")
            if clipped:  # "clipped" = cut at max_new_tokens without EOS
                metrics["completions/stop_rate"] = [1.0 - value for value in clipped]
            super().log(logs, start_time)

    return SeededRLOOTrainer


def rloo_arguments(config: RLOOConfig, plan: DevicePlan, *, resuming: bool, has_eval: bool, weights=None):
    from trl import RLOOConfig as TrlRLOOConfig

    return training_arguments(
        config, plan, resuming=resuming, has_eval=has_eval, args_class=TrlRLOOConfig,
        num_generations=config.num_generations, num_generations_eval=config.num_generations,
        max_completion_length=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
        top_k=config.top_k, beta=config.beta, normalize_advantages=config.normalize_advantages,
        disable_dropout=True,  # sampled and scored log-probs must come from the same function
        include_num_input_tokens_seen="no",  # RLOOTrainer counts prompt + completion tokens itself
        remove_unused_columns=False, log_completions=False, shuffle_dataset=True, reward_weights=weights,
    )


def build_rloo_trainer(config: RLOOConfig, model, tokenizer, reward: RewardModel | None, prompts: PromptSet, plan: DevicePlan,
                       fmt, *, resuming: bool = False, callbacks: Sequence[TrainerCallback] = ()):
    from datasets import Dataset

    monitor = Dataset.from_list(dataset_rows(prompts.monitor)) if prompts.monitor else None
    sets = list(dict.fromkeys(row["monitor_set"] for row in prompts.monitor if row.get("instruction_id_list")))
    functions = reward_functions(config, reward, tokenizer, fmt, monitor_sets=sets)
    trainer = _rloo_trainer_class()(
        model=model, reward_funcs=functions,
        args=rloo_arguments(config, plan, resuming=resuming, has_eval=monitor is not None, weights=reward_weights(functions)),
        train_dataset=Dataset.from_list(dataset_rows(prompts.train)), eval_dataset=monitor,
        processing_class=tokenizer, callbacks=list(callbacks),
    )
    trainer.policy_forward = PolicyForwardReuse.for_trainer(trainer)
    watch_run(trainer, plan, config.save_total_limit)
    use_readable_log(trainer, {**SHOWN_KEYS, **shown_keys(sets)})  # one short line, not TRL's 1,500-character dict
    match_reference_dtype(trainer.model)
    check_reference(trainer)
    return trainer


# --------------------------------------------------------------------------- rollouts


def rollout_engine(config: RLOOConfig, plan: DevicePlan, base_model: str | None = None):
    """The engine that samples completions (``--engine``); vllm needs a full-precision policy on one process."""
    from core.engines import EngineChoice, choose_engine

    choice = choose_engine(config.engine, plan.device, base_model)  # what vLLM refuses for the model: said here
    problem = None
    if choice.name == "vllm" and plan.load_in_4bit:
        problem = "the policy is 4-bit (QLoRA): its weights cannot be pushed to vLLM each step"
    elif choice.name == "vllm" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        problem = "several training processes: each would start its own engine"
    if problem is None:
        return choice
    if choice.requested == "vllm":
        raise UserError(f"--engine vllm: {problem}; use --engine hf")
    return EngineChoice("hf", choice.requested, f"auto: {problem}", choice.device)


def start_rollouts(choice, config: RLOOConfig, trainer, tokenizer, fmt, plan: DevicePlan):
    """The vllm engine on the policy's weights (or None: TRL's own hf sampling); under auto a model vLLM
    cannot run falls back to hf with a one-line note."""
    if choice.name != "vllm":
        return None
    from core.engines import fall_back, vllm_settings
    from core.generation import SamplingSettings
    from core.vllm_engine import VLLMUnavailable
    from rlhf.rollouts import VLLMRollouts

    sampling = SamplingSettings(do_sample=True, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
    say("vllm: starting an engine on the policy's weights (synced after every optimizer step) ...")
    try:
        return VLLMRollouts(trainer.model, tokenizer, sampling=sampling, max_new_tokens=config.max_new_tokens,
                            max_length=config.max_length, stop_ids=fmt.stop_ids, seed=config.seed,
                            settings=vllm_settings(config), choice=choice, dtype=torch_dtype(plan.precision))
    except VLLMUnavailable as exc:
        fall_back(choice, str(exc))
        return None


# --------------------------------------------------------------------------- the run


class RLOORun(RunFromSFT):
    """RLOO's part of a run (``core/stage.py`` has the steps and their order)."""

    config_class = RLOOConfig

    def check(self) -> bool:
        """The SFT run, the reward model's run and the prompts, checked against each other before anything is
        written; the engine that will sample."""
        config = self.config
        self.start = start = resolve_start(config)
        self.reward_run = read_reward_run(config.reward_model_dir) if config.uses_model else None
        self.tokenizer = tokenizer_with_pad(start.base_model, start.tokenizer_source, start.trust_remote_code)
        self.fmt = prompt_format(start.template, self.tokenizer)
        raw_prompts = read_prompts(config, start, self.fmt)
        if self.reward_run is not None:
            check_reward_compatible(self.reward_run, start.base_model, self.tokenizer)
        room = config.max_length - config.max_new_tokens
        self.prompts = build_prompt_set(raw_prompts, self.tokenizer, max_prompt_tokens=room, seed=config.seed,
                                        monitor=0 if config.monitor_files else config.monitor_prompts,
                                        max_prompts=config.max_prompts, need_constraints=config.reward == "checker")
        if config.monitor_files:
            self.prompts.monitor, self.monitor_counts = monitor_file_rows(
                config.monitor_files, lambda path: read_prompt_rows(path, self.fmt), self.tokenizer, room,
                config.monitor_prompts, config.seed)
        self.choice = rollout_engine(config, self.plan, start.base_model)
        return True

    def intro(self) -> list[str]:
        config, start, prompts = self.config, self.start, self.prompts
        lines = [self.choice.line(),
                 f"policy: the SFT adapter in {start.sft_dir} on {start.base_model}; reference: the frozen SFT model; "
                 f"reward: {reward_phrase(config)}",
                 f"prompts ({config.prompt_file or start.sft_train_file}): {prompts.summary()}"]
        for name, c in getattr(self, "monitor_counts", {}).items():
            lines.append(f"monitoring {name}: {c['used']} of {c['read']} prompts (seeded; {c['without_constraints']} "
                         f"without constraints and {c['too_long']} too long left out)")
        if config.monitor_prompts and not prompts.monitor:
            lines.append("note: too few prompts to hold any back: no held-out monitoring (train-time metrics only)")
        return lines

    def record(self) -> dict:
        """What eval and later readers need beyond the config: base model, the SFT run, the reward model, the engine."""
        start, prompts = self.start, self.prompts
        return {**start.record(self.entry_point, reference=f"frozen SFT model ({start.sft_dir})"),
                "reward_model_dir": str(self.reward_run.run_dir) if self.reward_run else None,
                "reward_run": self.reward_run.payload.get("config") if self.reward_run else None,
                "monitor_files": getattr(self, "monitor_counts", None),
                "prompts": {**prompts.counts, "train": len(prompts.train), "monitor": len(prompts.monitor)},
                "generation": self.choice.record()}

    def load_data(self) -> PromptSet:
        return self.prompts

    def load_model(self):
        model = load_trainable_policy(self.config, self.start, self.plan)
        # TRL stops a completion at the generation config's EOS ids: a chat model's end-of-turn is one of them.
        model.generation_config.eos_token_id = self.fmt.stop_ids
        return model

    def model_loaded(self, model) -> None:
        """Its trainable parameters are said once the trainer holds it (with TRL's reference copy)."""

    def build_trainer(self, model):
        reward = load_reward(self.config, self.plan) if self.config.uses_model else None
        return build_rloo_trainer(self.config, model, self.tokenizer, reward, self.prompts, self.plan, self.fmt,
                                  resuming=self.resume_from is not None, callbacks=self.callbacks)

    def trainer_built(self, trainer) -> None:
        say(trainable_parameter_summary(trainer.model))
        with self.clock.phase(ENGINE_START):
            trainer.rollouts = start_rollouts(self.choice, self.config, trainer, self.tokenizer, self.fmt, self.plan)
        if trainer.rollouts is not None:
            self.clock.wrap(trainer.rollouts, "sync", WEIGHT_PUSH)

    def train(self, trainer) -> None:
        try:
            super().train(trainer)
        finally:
            if trainer.rollouts is not None:
                trainer.rollouts.close()

    def save_model(self, trainer, output_dir: Path) -> None:
        if trainer.is_world_process_zero():
            save_policy_adapter(trainer.model, self.tokenizer, output_dir, self.start.sft_dir)

    def metrics(self, trainer, session_seconds: float) -> dict:
        metrics = run_metrics(trainer, self.prompts, self.plan, resumed_from=self.resume_from, session_seconds=session_seconds)
        return {**metrics, "monitor_sets": monitor_set_metrics(trainer.state.log_history, self.monitor_sets())}

    def plot(self, log_history: list, output_dir: Path) -> None:
        titles = {"kl": "KL (sampling estimate, can dip below 0)"}
        panels = [(titles.get(name, name.replace("_", " ")), key, "eval_" + key) for name, key in LOGGED
                  if name != "reward_model"]
        panels += [(f"{name} pass rate", None, f"eval_{name}/pass") for name in self.monitor_sets()]
        plot_panels(log_history, output_dir / CURVES_FILENAME, "RLOO", panels)

    def card(self, metrics: dict, output_dir: Path) -> tuple[str, dict[str, str]]:
        return (f"LoRA RLOO policy adapter for {self.start.base_model}",
                model_card_sections(self.config, self.start, metrics, self.preset))

    def summary_line(self, metrics: dict, output_dir: Path) -> str:
        m = metrics
        return (f"done: {m['global_step']} steps; monitoring prompts: reward {fmt(m['monitor_reward_before'])} -> "
                f"{fmt(m['monitor_reward_after'])}, KL {kl_text(m['monitor_kl_before'])} -> {kl_text(m['monitor_kl_after'])} "
                f"({KL_NOTE}), "
                f"length {fmt(m['monitor_length_before'], '.1f')} -> {fmt(m['monitor_length_after'], '.1f')}, stop rate "
                f"{fmt(m['monitor_stop_rate_before'], '.2f')} -> {fmt(m['monitor_stop_rate_after'], '.2f')}; training reward "
                f"{fmt(m['train_reward_first_logged'])} -> {fmt(m['train_reward_last_logged'])}"
                f"{monitor_sets_text(m.get('monitor_sets', {}))}; outputs in {output_dir}")

    def monitor_sets(self) -> list[str]:
        return list(dict.fromkeys(r["monitor_set"] for r in self.prompts.monitor if r.get("instruction_id_list")))


run_rloo = RLOORun.launch


# --------------------------------------------------------------------------- outputs


def run_metrics(trainer, prompts: PromptSet, plan: DevicePlan, *, resumed_from: Path | None, session_seconds: float) -> dict:
    history = trainer.state.log_history
    metrics: dict[str, Any] = {"global_step": trainer.state.global_step, "epoch": trainer.state.epoch}
    for name, key in LOGGED:
        metrics[f"monitor_{name}_before"], metrics[f"monitor_{name}_after"] = first_and_last(history, "eval_" + key)
        points = [entry[key] for entry in history if key in entry]
        metrics[f"train_{name}_first_logged"] = points[0] if points else None
        metrics[f"train_{name}_last_logged"] = points[-1] if points else None
    metrics.update({
        "tokens_sampled_and_prompted": int(trainer.state.num_input_tokens_seen),
        **run_facts(trainer, plan, resumed_from=resumed_from, session_seconds=session_seconds),
        "metrics_note": ("reward = the --reward score (weighted) + penalties (without the KL term); kl = mean per-token "
                         "log p_policy - log p_SFT of sampled tokens (a sampling estimate: can be slightly negative; ~0 means the "
                         "policy has not moved); stop_rate = share of completions ending with EOS; "
                         "monitor_* = on the held-back prompts, before the first step and at the end"),
        "prompts": {**prompts.counts, "train": len(prompts.train), "monitor": len(prompts.monitor)},
        "generation": ({"engine": "vllm", "weight_syncs": trainer.rollouts.sync_count} if trainer.rollouts is not None
                       else {"engine": "hf"}),
    })
    return metrics


def model_card_sections(config: RLOOConfig, start: SFTStart, metrics: dict, preset: str) -> dict[str, str]:
    penalties = ", ".join(f"{name} {value}" for name, value in (("missing-EOS penalty", config.missing_eos_penalty),
                                                               ("length penalty per token", config.length_penalty)) if value)
    how = (f"RLOO (TRL `RLOOTrainer`: REINFORCE with a leave-one-out baseline over {config.num_generations} samples per "
           f"prompt) of `{start.base_model}`, starting from the SFT adapter in `{start.sft_dir}`; reward = "
           f"{reward_phrase(config)}{' with ' + penalties if penalties else ''}, minus beta={config.beta} x the "
           f"summed log-ratio to the frozen SFT model. Sampling: temperature {config.temperature}, top_p {config.top_p}, "
           f"top_k {config.top_k}, at most {config.max_new_tokens} new tokens. {base_phrase(config)}, {metrics['precision']} on "
           f"{metrics['device']} (preset `{preset}`). {metrics['prompts']['train']} training prompts from "
           f"`{config.prompt_file or start.sft_train_file}`, template `{start.template.name}`; {metrics['global_step']} "
           f"optimizer steps, learning rate {config.learning_rate}, seed {config.seed}. Full config: `{CONFIG_FILENAME}`.")
    rows: dict[str, Any] = {}
    for name, _ in LOGGED:
        for when in ("before", "after"):
            value = metrics[f"monitor_{name}_{when}"]
            note = f" ({KL_NOTE})" if when == "after" else ""  # said once
            rows[f"held-out {name} {when}"] = f"{kl_text(value)}{note}" if name == "kl" else value
    rows["training reward, first logged"] = metrics["train_reward_first_logged"]
    rows["training reward, last logged"] = metrics["train_reward_last_logged"]
    results = format_table(rows)
    load = (adapter_load_code(repr(start.base_model), str(config.output_dir))
            + f"Prompt with the template saved in `{CONFIG_FILENAME}`. Compare with the other stages:\n"
            f"`python -m sft.eval_sft --adapter_dir {start.sft_dir} DPO_DIR {config.output_dir}"
            f"{' --reward_model ' + config.reward_model_dir if config.uses_model else ''}`.")
    files = ("`adapter_model.safetensors` + `adapter_config.json` (the policy's LoRA adapter), tokenizer files, "
             f"`{CONFIG_FILENAME}` (config, template, SFT run, reward model run, prompt counts), `trainer_state.json` "
             f"(log history), `metrics.json`, `{CURVES_FILENAME}` (reward, KL, length, stop rate), `runs/` (TensorBoard), "
             "`checkpoint-*/` (resumable, with TRL's reference copy in `ref/`).")
    return {"How it was trained": how, "Results": results, "How to load it": load, "Files": files}
