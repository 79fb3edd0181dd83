"""The one place where reward-model training is wired: start point, model, TRL's RewardTrainer, outputs.

``python -m rlhf.train_reward_mac`` and ``python -m rlhf.train_reward_cuda`` both call :func:`run_reward`;
they differ only in the :class:`DevicePlan` they pass. The run's steps are every stage's (``core/stage.py``).

What happens, in order:

1. the config is resolved; the SFT run named by ``--sft_adapter_dir`` is read (base model,
   template, tokenizer); the pair files are read and checked; the output dir is checked. All
   before any model is loaded;
2. ``reward_config.json`` is written (config, template, base model, the SFT run's config);
3. pairs are tokenised exactly as SFT tokenises an example (``core.pairs.encode_pairs``): each
   side is prompt + response + EOS, cut at ``max_length`` (counted, never dropped silently);
4. the model: ``AutoModelForSequenceClassification`` (one output) on the base model with a LoRA
   adapter, the score head trainable through ``modules_to_save``. ``--init sft`` loads the SFT
   adapter's weights into that adapter (the body starts as the SFT model); ``--init base`` starts
   from a fresh adapter;
5. TRL's ``RewardTrainer`` trains with the Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected)``,
   evaluating on the held-out pairs before the first step and every ``eval_steps``: exact
   pairwise accuracy (ties count as wrong) and mean margin over all held-out pairs;
6. ``output_dir`` receives the adapter + score head, tokenizer, ``trainer_state.json``,
   ``metrics.json``, ``loss_curve.png``, ``accuracy_curves.png`` and a model-card ``README.md``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from transformers import TrainerCallback

from core.cli import UserError
from core.log import say, use_readable_log
from core.modeling import torch_dtype
from core.pairs import EncodedPairs, PairData, encode_pair_files, pairs_phrase, read_pair_files
from core.policy import SFTStart, read_sft_start
from core.prompting import prompt_format
from core.reporting import (LOSS_CURVE_FILENAME, base_phrase, effective_batch, first_and_last, fmt_value as fmt,
                            format_table, fraction_text, loss_points, plot_loss_curve, plot_panels)
from core.stage import RunFromSFT, tokenizer_with_pad
from core.token_rows import trained_token_rows
from core.training import DevicePlan, run_facts, training_arguments, watch_run
from rlhf.reward_config import CONFIG_FILENAME, RewardConfig
from rlhf.reward_model import attach_reward_lora, load_classifier_base

ACCURACY_CURVES_FILENAME = "accuracy_curves.png"


# --------------------------------------------------------------------------- start, data, model


def resolve_start(config: RewardConfig) -> SFTStart:
    start = read_sft_start(config.sft_adapter_dir, need_adapter=config.init == "sft", why="--init sft",
                           renders="the reward model renders pairs", model_name_or_path=config.model_name_or_path,
                           tokenizer_name_or_path=config.tokenizer_name_or_path, template=config.template,
                           trust_remote_code=config.trust_remote_code)
    if config.init == "sft" and trained_token_rows(start.sft_dir):
        raise UserError(f"the SFT run in {start.sft_dir} trained the EOS output row (train_eos_embedding), which a "
                        "classifier has no place for: use --init base, or an SFT run without it")
    return start


def as_sequences(encoded: EncodedPairs):
    """TRL's pre-tokenised format: whole sequences (prompt + response + EOS) per side."""
    from datasets import Dataset

    rows = [{"chosen_ids": f["prompt_ids"] + f["chosen_ids"], "rejected_ids": f["prompt_ids"] + f["rejected_ids"]}
            for f in encoded.features]
    return Dataset.from_list(rows) if rows else None


def build_model(config: RewardConfig, start: SFTStart, plan: DevicePlan, pad_token_id: int):
    quantization = ({"quant_type": config.bnb_4bit_quant_type, "double_quant": config.bnb_4bit_use_double_quant}
                    if plan.load_in_4bit else None)
    base = load_classifier_base(start.base_model, dtype=torch_dtype(plan.precision), device_map=plan.device_map,
                                quantization=quantization, trust_remote_code=start.trust_remote_code, seed=config.seed)
    base.config.pad_token_id = pad_token_id  # the score is read at the last non-pad token
    model = attach_reward_lora(base, sft_dir=start.sft_dir if config.init == "sft" else None, r=config.lora_r,
                               alpha=config.lora_alpha, dropout=config.lora_dropout,
                               target_modules=config.lora_target_modules, seed=config.seed)
    if plan.device_map is None:
        model.to(plan.device)
    return model


# --------------------------------------------------------------------------- trainer


# What a printed log line shows (the JSON log and TensorBoard keep every key TRL logs)
SHOWN_KEYS = ("loss", "accuracy", "margin", "mean_reward", "grad_norm", "learning_rate", "num_input_tokens_seen",
              "train_tokens_per_second")


def _reward_trainer_class():
    import torch
    from trl import RewardTrainer

    class PairwiseRewardTrainer(RewardTrainer):
        """TRL's RewardTrainer whose accuracy and margin are exact over all pairs, with the counts logged.

        TRL averages per-batch means, which weighs a short last batch like a full one. Here the pairs
        ranked right, the margin and reward sums and the pairs are summed (train: since the last log
        line; held-out: over every pair), and the counts logged as ``pairs_correct`` / ``pairs``
        (``eval_`` on the held-out pairs).
        """

        def _counts(self) -> dict[str, list[float]]:
            if not hasattr(self, "_pair_counts"):
                # correct, margin sum, pairs, sum of every score (chosen and rejected)
                self._pair_counts = {"train": [0.0, 0.0, 0, 0.0], "eval": [0.0, 0.0, 0, 0.0]}
            return self._pair_counts

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            chosen, rejected = outputs.logits.detach().squeeze(-1).float().chunk(2)
            counts = self._counts()["train" if self.model.training else "eval"]
            counts[0] += (chosen > rejected).sum().item()
            counts[1] += (chosen - rejected).sum().item()
            counts[2] += len(chosen)
            counts[3] += (chosen.sum() + rejected.sum()).item()
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            mode = "train" if self.model.training else "eval"
            counts = self._counts()[mode]
            if counts[2]:
                totals = torch.tensor(counts, dtype=torch.float32, device=self.args.device)  # MPS has no float64
                correct, margin, pairs, scores = self.accelerator.reduce(totals, reduction="sum").tolist()
                self._metrics[mode]["accuracy"] = [correct / pairs]
                self._metrics[mode]["margin"] = [margin / pairs]
                self._metrics[mode]["mean_reward"] = [scores / (2 * pairs)]
                prefix = "eval_" if mode == "eval" else ""
                logs[f"{prefix}pairs"] = int(pairs)
                logs[f"{prefix}pairs_correct"] = int(correct)
                self._counts()[mode] = [0.0, 0.0, 0, 0.0]
            super().log(logs, start_time)

    return PairwiseRewardTrainer


def build_reward_trainer(config: RewardConfig, model, tokenizer, data: PairData, plan: DevicePlan, *,
                         resuming: bool = False, callbacks: Sequence[TrainerCallback] = ()):
    from trl import RewardConfig as TrlRewardConfig

    val = as_sequences(data.val)
    args = training_arguments(
        config, plan, resuming=resuming, has_eval=val is not None, args_class=TrlRewardConfig,
        max_length=None,  # pairs are already cut to max_length (and counted) by core.pairs; TRL would drop them
        center_rewards_coefficient=config.center_rewards_coefficient or None,
        disable_dropout=True,  # a pair's two scores come from two forwards: dropout would add noise to the margin
        prediction_loss_only=True,  # the metrics come from the loss pass
    )
    trainer = _reward_trainer_class()(model=model, args=args, train_dataset=as_sequences(data.train), eval_dataset=val,
                                      processing_class=tokenizer, callbacks=list(callbacks))
    watch_run(trainer, plan, config.save_total_limit)
    use_readable_log(trainer, SHOWN_KEYS)  # not TRL's dict of numbers as strings; min/max reward stay in the JSON log
    return trainer


# --------------------------------------------------------------------------- the run


class RewardRun(RunFromSFT):
    """The reward model's part of a run (``core/stage.py`` has the steps and their order)."""

    config_class = RewardConfig

    def check(self) -> bool:
        self.start = resolve_start(self.config)
        self.rows = read_pair_files(self.config)
        return True

    def intro(self) -> list[str]:
        body = "the SFT adapter in " + str(self.start.sft_dir) if self.config.init == "sft" else "a fresh LoRA adapter"
        return [f"reward model: {body} + a one-output score head on {self.start.base_model}"]

    def load_tokenizer(self):
        return tokenizer_with_pad(self.start.base_model, self.start.tokenizer_source, self.start.trust_remote_code)

    def load_data(self) -> PairData:
        if self.tokenizer.pad_token_id == self.tokenizer.eos_token_id:
            say("note: the pad token is EOS, so scores are read at the last token before a final EOS")
        data = encode_pair_files(self.config, self.rows, prompt_format(self.start.template, self.tokenizer))
        say(f"pairs: {data.summary()}")
        return data

    def load_model(self):
        return build_model(self.config, self.start, self.plan, self.tokenizer.pad_token_id)

    def build_trainer(self, model):
        return build_reward_trainer(self.config, model, self.tokenizer, self.data, self.plan,
                                    resuming=self.resume_from is not None, callbacks=self.callbacks)

    def save_model(self, trainer, output_dir: Path) -> None:
        if trainer.is_world_process_zero():
            trainer.model.save_pretrained(str(output_dir))  # LoRA + the score head (modules_to_save)
            self.tokenizer.save_pretrained(str(output_dir))  # with its pad token: where the score is read depends on it

    def metrics(self, trainer, session_seconds: float) -> dict:
        return run_metrics(trainer, self.data, self.plan, resumed_from=self.resume_from, session_seconds=session_seconds)

    def plot(self, log_history: list, output_dir: Path) -> None:
        plot_loss_curve(log_history, output_dir / LOSS_CURVE_FILENAME, ylabel="Bradley-Terry loss",
                        title=f"reward model on {Path(self.start.base_model).name} (init {self.config.init})")
        plot_panels(log_history, output_dir / ACCURACY_CURVES_FILENAME, "reward model",
                    [("pairwise accuracy", "accuracy", "eval_accuracy"), ("mean margin", "margin", "eval_margin")])

    def card(self, metrics: dict, output_dir: Path) -> tuple[str, dict[str, str]]:
        return (f"LoRA reward model for {self.start.base_model}",
                model_card_sections(self.config, self.start, metrics, self.preset, self.tokenizer.pad_token_id))

    def summary_line(self, metrics: dict, output_dir: Path) -> str:
        return (f"done: {metrics['global_step']} steps; held-out pairwise accuracy {accuracy_text(metrics, 'before')} -> "
                f"{accuracy_text(metrics, 'after')}, margin {fmt(metrics['val_margin_before'])} -> "
                f"{fmt(metrics['val_margin_after'])}, loss {fmt(metrics['val_loss_before'])} -> "
                f"{fmt(metrics['val_loss_after'])}; peak memory {metrics['peak_memory_mb']} MiB; outputs in {output_dir}")


run_reward = RewardRun.launch


# --------------------------------------------------------------------------- outputs


def run_metrics(trainer, data: PairData, plan: DevicePlan, *, resumed_from: Path | None, session_seconds: float) -> dict:
    history = trainer.state.log_history
    metrics: dict[str, Any] = {"global_step": trainer.state.global_step, "epoch": trainer.state.epoch}
    for name, key in (("val_loss", "eval_loss"), ("val_accuracy", "eval_accuracy"), ("val_margin", "eval_margin"),
                      ("val_mean_reward", "eval_mean_reward")):
        metrics[f"{name}_before"], metrics[f"{name}_after"] = first_and_last(history, key)
    correct = [int(v) if v is not None else None for v in first_and_last(history, "eval_pairs_correct")]
    metrics["val_pairs_correct_before"], metrics["val_pairs_correct_after"] = correct
    metrics["val_pairs"] = int(first_and_last(history, "eval_pairs")[1] or 0) or None
    train = loss_points(history, "loss")
    metrics.update({
        "train_loss_first_logged": train[0][1] if train else None,
        "train_loss_last_logged": train[-1][1] if train else None,
        "train_tokens_seen": int(trainer.state.num_input_tokens_seen),
        **run_facts(trainer, plan, resumed_from=resumed_from, session_seconds=session_seconds),
        "accuracy_note": "held-out accuracy = share of pairs scored chosen > rejected (ties wrong), over all held-out pairs",
        "data": data.stats(),
    })
    return metrics


def accuracy_text(metrics: dict, when: str) -> str:
    """``12/13 = 0.923``: the held-out pairs the reward model ranks right (no reference model involved)."""
    correct, pairs = metrics.get(f"val_pairs_correct_{when}"), metrics.get("val_pairs")
    return fraction_text(correct, pairs) if correct is not None else fmt(metrics.get(f"val_accuracy_{when}"), ".3f")


def model_card_sections(config: RewardConfig, start: SFTStart, metrics: dict, preset: str, pad_id: int) -> dict[str, str]:
    how = (f"Bradley-Terry reward model (TRL `RewardTrainer`, loss -log sigmoid(r_chosen - r_rejected)) on `{start.base_model}` "
           f"as a one-output sequence classifier; the body started from {start.start_phrase(config)} (`--init {config.init}`), "
           f"the score head was new and trained in full. {base_phrase(config)}, {metrics['precision']} compute on "
           f"{metrics['device']} (preset `{preset}`). {pairs_phrase(config, start.template.name)} {metrics['global_step']} "
           f"optimizer steps, learning rate {config.learning_rate}, effective batch {effective_batch(config, metrics)} pairs, "
           f"seed {config.seed}. The full config is in `{CONFIG_FILENAME}`.")
    results = format_table({
        "held-out pairwise accuracy before": accuracy_text(metrics, "before"),
        "held-out pairwise accuracy after": accuracy_text(metrics, "after"),
        "held-out mean margin before": metrics["val_margin_before"], "held-out mean margin after": metrics["val_margin_after"],
        "held-out loss before": metrics["val_loss_before"], "held-out loss after": metrics["val_loss_after"],
        "peak memory (MiB)": metrics["peak_memory_mb"],
    })
    load = ("```python\nimport torch\nfrom peft import PeftModel\n"
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            f"tokenizer = AutoTokenizer.from_pretrained({str(config.output_dir)!r})\n"
            f"base = AutoModelForSequenceClassification.from_pretrained({start.base_model!r}, num_labels=1)\n"
            f"base.config.pad_token_id = tokenizer.pad_token_id  # {pad_id}: the score is read at the last non-pad token\n"
            f"model = PeftModel.from_pretrained(base, {str(config.output_dir)!r}).eval()\n"
            "ids = tokenizer(prompt + response, return_tensors=\"pt\").input_ids\n"
            "ids = torch.cat([ids, torch.tensor([[tokenizer.eos_token_id]])], dim=1)  # responses were scored with their EOS\n"
            "reward = model(input_ids=ids).logits[0, 0].item()\n```\n\n"
            f"Render `prompt` with the template saved in `{CONFIG_FILENAME}`. Use it for RLOO "
            f"(`python -m rlhf.train_rloo_mac --reward_model_dir {config.output_dir}`) or to score models in the evaluation "
            f"(`python -m sft.eval_sft --reward_model {config.output_dir}`).")
    files = ("`adapter_model.safetensors` + `adapter_config.json` (LoRA and the score head, `modules_to_save`), tokenizer "
             f"files (with the pad token), `{CONFIG_FILENAME}` (resolved config, template, SFT run), `trainer_state.json`, "
             f"`metrics.json`, `{LOSS_CURVE_FILENAME}`, `{ACCURACY_CURVES_FILENAME}`, `runs/` (TensorBoard), `checkpoint-*/`.")
    return {"How it was trained": how, "Results": results, "How to load it": load, "Files": files}
