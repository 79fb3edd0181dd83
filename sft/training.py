"""The one place where SFT training is wired: Trainer, loss, samplers, resume, outputs.

``python -m sft.train_sft_mac`` and ``python -m sft.train_sft_cuda`` both call :func:`run_sft`; they
differ only in the :class:`core.training.DevicePlan` they return (where the model runs and how the
base is loaded). The run's steps are every stage's (``core/stage.py``), the Trainer is ``sft/trainer.py``'s;
what SFT brings to the steps:

1. checks before loading: the data files, the model and tokenizer sources, Liger kernels;
   ``--preview N`` prints examples as the model sees them and stops there;
2. ``<output_dir>/sft_config.json`` holds the config and the exact template text;
3. tokenizer, datasets (tokenised once, cached: ``sft/dataset.py``) and model (LoRA adapter
   created right after seeding) are loaded;
4. a Hugging Face ``Trainer`` trains with the shared collator, a length-grouped sampler whose order
   depends only on (seed, epoch), response-token loss computed only where there are labels,
   periodic validation, TensorBoard logs and crash-safe checkpoints (``core/checkpoints.py``);
5. ``output_dir`` receives the adapter, tokenizer, ``trainer_state.json``, ``metrics.json``,
   ``loss_curve.png`` and a model-card ``README.md``.

Speed: batches are padded per batch (not to max_seq_length), similar lengths are batched together,
and the LM head and cross-entropy run only at positions whose next token carries a label
(``logits_to_keep`` with a boolean mask), which skips the prompt and the padding, a chunk of rows at
a time (``core/losses.py``: the labelled rows' logits over the vocabulary never exist at once). With
``--packing true`` training rows hold several examples and no padding at all (core/packing.py;
evaluation stays unpacked). The step reads nothing back from the device that it does not need:
token counters are summed on the device and read only when the Trainer logs, evaluates or saves.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from transformers import TrainerCallback

from core import checkpoints
from core.kernels import apply_liger_kernels, check_liger_kernels
from core.log import say, use_readable_log
from core.modeling import attach_lora, load_tokenizer, resolve_model_source
from core.packing import token_budget
from core.reporting import (LOSS_CURVE_FILENAME, PeakMemory, adapter_load_code, base_phrase, effective_batch,
                            format_table, loss_points, plot_loss_curve)
from core.stage import StageRun, tokenizer_with_pad
from core.training import DevicePlan, load_base_for, run_facts, training_arguments
from sft.budget import StopAtTokenBudget, budget_metrics, check_init_adapter, steps_for_budget, tokens_to_train
from sft.sft_config import SFTConfig
from sft.trainer import SFTTrainer


# --------------------------------------------------------------------------- model


def build_lora_model(config: SFTConfig, plan: DevicePlan):
    """Base model (full precision or 4-bit, as the plan says) plus fresh LoRA adapters, as the config describes."""
    base = load_base_for(config, config.model_name_or_path, plan)
    if config.liger_kernels:
        apply_liger_kernels(base, plan.device)
    if config.init_adapter_dir:  # the study's control: the SFT run's adapter, trained further (sft/budget.py)
        return continued_adapter(base, config)
    model = attach_lora(base, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                       target_modules=config.lora_target_modules, seed=config.seed,
                       trainable_tokens=eos_output_rows(base) if config.train_eos_embedding else None)
    return model


def continued_adapter(base, config):
    """The adapter of ``--init_adapter_dir``, trainable, on ``base``; the seed set first (its dropout, as for a fresh one)."""
    from peft import PeftModel
    from transformers import set_seed

    from core.modeling import quiet_peft_probe

    set_seed(config.seed)
    with quiet_peft_probe():
        model = PeftModel.from_pretrained(base, config.init_adapter_dir, is_trainable=True)
    model.config.use_cache = False
    return model


def eos_output_rows(model) -> dict[str, list[int]]:
    """{module name: EOS id(s)} for the matrix whose EOS row decides when the model stops.

    That is the output embedding (the EOS logit); an input-embedding row of EOS gets no gradient,
    since nothing after the final EOS carries a label. With tied embeddings the two are one matrix,
    and PEFT trains the row through the input embedding.
    """
    eos = model.config.eos_token_id
    ids = [] if eos is None else sorted({eos} if isinstance(eos, int) else set(eos))
    tied = getattr(model.config, "tie_word_embeddings", False)
    target = model.get_input_embeddings() if tied else model.get_output_embeddings()
    name = next(name for name, module in model.named_modules() if module is target)
    return {name.split(".")[-1]: ids}


# --------------------------------------------------------------------------- trainer construction


def build_trainer(config: SFTConfig, model, tokenizer, datasets, plan: DevicePlan, *,
                  resuming: bool = False, callbacks: Sequence[TrainerCallback] = ()) -> SFTTrainer:
    from core.tokenization import PaddingCollator

    has_eval = datasets.val is not None and len(datasets.val) > 0
    args = training_arguments(config, plan, resuming=resuming, has_eval=has_eval)
    budget = tokens_to_train(config)
    if budget is not None:  # a budget in tokens (sft/budget.py): max_steps from the data's mean length, a stop at the budget
        args.max_steps = steps_for_budget(budget, datasets.train["length"], config.per_device_train_batch_size
                                          * config.gradient_accumulation_steps * int(os.environ.get("WORLD_SIZE", "1")))
        callbacks = [*callbacks, StopAtTokenBudget(budget)]
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.train,
        eval_dataset=datasets.val if has_eval else None,
        data_collator=PaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of=config.pad_to_multiple_of),
        processing_class=tokenizer,
        train_lengths=datasets.train["length"],
        eval_lengths=datasets.val["length"] if has_eval else None,
        group_by_length=config.group_by_length,
        packing_tokens=token_budget(config.per_device_train_batch_size, config.max_seq_length,
                                    config.max_tokens_per_batch) if config.packing else None,
        memory=PeakMemory(plan.device),
        callbacks=list(callbacks),
    )
    trainer.add_callback(checkpoints.CheckpointCompletionCallback(config.save_total_limit, trainer.progress.to_marker))
    use_readable_log(trainer)
    return trainer


# --------------------------------------------------------------------------- the run


class SFTRun(StageRun):
    """SFT's part of a run (``core/stage.py`` has the steps and their order)."""

    config_class = SFTConfig

    def check(self) -> bool:
        from sft.dataset import check_data_files

        config = self.config
        check_data_files(config)
        if config.init_adapter_dir:
            check_init_adapter(config)
        tokens_to_train(config)  # --match_tokens_of names a finished run
        for source in filter(None, (config.model_name_or_path, config.tokenizer_name_or_path)):
            resolve_model_source(source)  # a wrong path fails here, before the config is printed
        if config.liger_kernels:
            check_liger_kernels(self.plan.device)  # before anything is loaded
        if config.preview:
            from sft.preview import preview

            preview(config, load_tokenizer(config.model_name_or_path, config.tokenizer_name_or_path,
                                           config.trust_remote_code), log=say)
            return False
        return True

    def template(self):
        return self.config.prompt_template()

    def record(self) -> dict:
        return {"entry_point": self.entry_point, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                "token_budget": tokens_to_train(self.config)}

    def load_tokenizer(self):
        config = self.config
        return tokenizer_with_pad(config.model_name_or_path, config.tokenizer_name_or_path, config.trust_remote_code)

    def load_data(self):
        from sft.dataset import load_sft_datasets

        return load_sft_datasets(self.config, self.tokenizer, log=say)  # prints its own one-line summary

    def load_model(self):
        return build_lora_model(self.config, self.plan)

    def build_trainer(self, model) -> SFTTrainer:
        return build_trainer(self.config, model, self.tokenizer, self.data, self.plan,
                             resuming=self.resume_from is not None, callbacks=self.callbacks)

    def trainer_built(self, trainer: SFTTrainer) -> None:
        if self.resume_from is not None:
            trainer.progress.restore(checkpoints.read_marker(self.resume_from) or {})

    def save_model(self, trainer, output_dir: Path) -> None:
        trainer.save_model(str(output_dir))  # adapter (safetensors) + tokenizer; rank 0 only

    def metrics(self, trainer, session_seconds: float) -> dict:
        return {**run_metrics(trainer, self.data.stats, self.plan, resumed_from=self.resume_from,
                              session_seconds=session_seconds),
                **budget_metrics(tokens_to_train(self.config), self.config, trainer.args.max_steps)}

    def plot(self, log_history: list, output_dir: Path) -> None:
        title = f"SFT of {Path(self.config.model_name_or_path).name}"
        plot_loss_curve(log_history, output_dir / LOSS_CURVE_FILENAME, title=title)

    def card(self, metrics: dict, output_dir: Path) -> tuple[str, dict[str, str]]:
        return (f"LoRA SFT adapter for {self.config.model_name_or_path}",
                model_card_sections(self.config, metrics, self.preset, output_dir))

    def summary_line(self, metrics: dict, output_dir: Path) -> str:
        def fmt(value, spec=".4f"):
            return format(value, spec) if isinstance(value, (int, float)) else "n/a"

        return (f"done: {metrics['global_step']} steps, val loss {fmt(metrics['val_loss_before'])} -> "
                f"{fmt(metrics['val_loss_after'])}, {fmt(metrics['train_tokens_per_second'], '.0f')} tokens/s (training "
                f"time only, without evaluation and checkpoints), "
                f"peak memory {metrics['peak_memory_mb']} MiB; outputs in {output_dir}")


run_sft = SFTRun.launch


def run_metrics(trainer: SFTTrainer, data_stats: dict, plan: DevicePlan, *, resumed_from: Path | None,
                session_seconds: float) -> dict[str, Any]:
    state, progress = trainer.state, trainer.progress
    train = loss_points(state.log_history, "loss")
    evals = loss_points(state.log_history, "eval_loss")
    seconds = progress.current_train_seconds()
    return {
        "global_step": state.global_step,
        "epoch": state.epoch,
        "val_loss_before": evals[0][1] if evals and evals[0][0] == 0 else None,
        "val_loss_after": evals[-1][1] if evals else None,
        "train_loss_first_logged": train[0][1] if train else None,
        "train_loss_last_logged": train[-1][1] if train else None,
        "train_tokens_seen": int(state.num_input_tokens_seen),
        "supervised_tokens_seen": progress.supervised_tokens_seen,
        "train_seconds": seconds,
        "train_tokens_per_second": state.num_input_tokens_seen / seconds if seconds > 0 else None,
        "supervised_tokens_per_second": progress.supervised_tokens_seen / seconds if seconds > 0 else None,
        "eval_seconds_this_session": progress.eval_seconds,
        "checkpoint_seconds_this_session": progress.save_seconds,
        **run_facts(trainer, plan, resumed_from=resumed_from, session_seconds=session_seconds),
        "logits_only_at_labelled_positions": trainer.logits_mask,
        "packing_tokens_per_row": trainer.packing_tokens,
        "optimizer": str(getattr(trainer.args.optim, "value", trainer.args.optim)),
        "tokens_note": ("train_tokens_seen counts non-padding tokens (prompt + response) of all processes; "
                        "supervised_tokens_seen counts tokens that carry a loss (packed rows have no padding); per-second figures divide by "
                        "train_seconds, which excludes evaluation and checkpoint writing"),
        "data": data_stats,
    }


def _from_pretrained_args(model_name_or_path: str) -> str:
    """How a user's own code loads this base: a GGUF file needs its directory plus ``gguf_file=``."""
    source = resolve_model_source(model_name_or_path)
    return f"{source.path!r}, gguf_file={source.gguf_file!r}" if source.gguf_file else repr(source.path)


def model_card_sections(config: SFTConfig, metrics: dict[str, Any], preset: str, output_dir: Path) -> dict[str, str]:
    lora = (f"the LoRA adapter of `{config.init_adapter_dir}`, continued" if config.init_adapter_dir else
            f"LoRA (r={config.lora_r}, alpha={config.lora_alpha}, dropout={config.lora_dropout}) on "
            f"{', '.join(config.lora_target_modules)}")
    data = f"the chosen answers of `{config.train_file}`" if config.response_key == "chosen" else f"`{config.train_file}`"
    how = (f"Supervised fine-tuning of `{config.model_name_or_path}` with {lora}; "
           f"{base_phrase(config)}, {metrics['precision']} compute on {metrics['device']} (preset `{preset}`). "
           f"Data: {data} (validation `{config.val_file}`), prompt template `{config.template}`, "
           f"loss on {'prompt and response' if config.train_on_inputs else 'response tokens only'}, "
           f"max_seq_length {config.max_seq_length}. {metrics['global_step']} optimizer steps, learning rate "
           f"{config.learning_rate} ({config.lr_scheduler_type}), effective batch {effective_batch(config, metrics)}, "
           f"seed {config.seed}"
           + (f", until {metrics['token_budget']:,} tokens (from {metrics['token_budget_from']})" if "token_budget" in metrics else "")
           + ". The full config is in `sft_config.json`.")
    results = format_table({
        "validation loss before": metrics["val_loss_before"], "validation loss after": metrics["val_loss_after"],
        "tokens seen (non-padding)": metrics["train_tokens_seen"], "supervised tokens": metrics["supervised_tokens_seen"],
        "tokens/s": metrics["train_tokens_per_second"], "peak memory (MiB)": metrics["peak_memory_mb"],
    })
    load = (adapter_load_code(_from_pretrained_args(config.model_name_or_path), str(output_dir))
            + "Prompt with the template saved in `sft_config.json`. To get a standalone model:\n"
            f"`python scripts/merge_adapter.py --adapter_dir {output_dir} --out_dir MERGED_DIR`.")
    files = ("`adapter_model.safetensors` + `adapter_config.json` (LoRA adapter), tokenizer files, "
             "`sft_config.json` (resolved config and template), `trainer_state.json` (log history), "
             "`metrics.json`, `loss_curve.png`, `runs/` (TensorBoard), `checkpoint-*/` (resumable checkpoints).")
    return {"How it was trained": how, "Results": results, "How to load it": load, "Files": files}
