"""One measured training run, in its own process (started by bench/bench_train.py).

    python -m bench.train_worker SPEC.json RESULT.json

SPEC names the configuration (``ours``, ``ours_packed``, ``ceiling``, ``original``, ``trl_*``; see
CONFIGURATIONS) and what all share (model folder, data file, warm-up and timed steps, batch size,
device, precision, 4-bit). RESULT holds the
training-loop time, the tokens that loop fed the model, the loss and the settings read back from
the trainer. The parent adds this process's peak memory.

One :class:`ThroughputMeter` (a TrainerCallback) measures every configuration the same way: the
clock runs over the training loop only, and tokens are counted where they enter the model, on the
batches each configuration really built (its own sampler, padding and masking).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import TrainerCallback  # noqa: E402

from bench.common import gpu_peak_mb, peak_rss_mb  # noqa: E402

IGNORE_INDEX = -100


class ThroughputMeter(TrainerCallback):
    """Times the training loop and counts the tokens that enter the model, the same way for
    every configuration.

    The clock runs from ``on_train_begin`` (or, with ``warmup_steps``, from the end of that many
    optimizer steps) to ``on_train_end``, CUDA-synchronised at both ends, so model loading,
    tokenization, warm-up (allocator, kernel selection, autotuning) and the final save are outside
    it. A forward pre-hook on the model counts, for timed training forwards only: useful = real
    (non-padding) tokens, processed = batch x padded length, supervised = next-token targets with a
    label (when the model receives labels).
    """

    def __init__(self, warmup_steps: int = 0):
        self.warmup_steps = warmup_steps
        self.useful = self.processed = self.supervised = self.forwards = 0
        self.train_s = self.cpu_s = 0.0
        self.timing = False
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
        if self.warmup_steps == 0:
            self._start()

    def on_step_end(self, args, state, control, **kwargs):
        if not self.timing and state.global_step >= self.warmup_steps:
            self._start()

    def _start(self) -> None:
        _synchronize()
        self.timing = True
        self._started, self._cpu_started = time.perf_counter(), time.process_time()

    def on_train_end(self, args, state, control, **kwargs):
        _synchronize()
        self.train_s = time.perf_counter() - self._started
        self.cpu_s = time.process_time() - self._cpu_started
        self._hook.remove()

    def _count(self, module, args, kwargs):
        if not module.training or not self.timing:  # evaluation and warm-up forwards are not counted
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self.forwards += 1
        self.processed += input_ids.numel()
        mask = kwargs.get("attention_mask")
        # Padding-free batches (one flattened row, no mask) carry no padding at all. Sums stay on
        # the device (adding tensors does not wait for the GPU); `counts` reads them after the clock.
        self.useful += mask.sum() if mask is not None else input_ids.numel()
        labels = kwargs.get("labels")
        if labels is not None:
            self.supervised += (labels[..., 1:] != IGNORE_INDEX).sum()

    def counts(self) -> dict[str, Any]:
        return {"train_s": self.train_s, "cpu_s": self.cpu_s, "useful_tokens": int(self.useful),
                "processed_tokens": self.processed, "supervised_tokens": int(self.supervised) or None,
                "forwards": self.forwards}


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def read_rows(train_file: str) -> list[dict]:
    """The benchmark's template-free rows, with ``prompt``/``response`` rendered as our training renders them."""
    from core.prompting import load_template

    template = load_template()
    with open(train_file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{**row, "prompt": template.render(row["instruction"], row["input"]), "response": row["output"]} for row in rows]


def lora_config(spec: dict):
    from peft import LoraConfig

    lora = spec["lora"]
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=lora["target_modules"], bias="none", task_type="CAUSAL_LM")


def bnb_config(spec: dict):
    import torch
    from transformers import BitsAndBytesConfig

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec["precision"], torch.float32)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def precision_flags(precision: str) -> dict[str, bool]:
    """TrainingArguments mixed-precision flags for a precision name."""
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def total_steps(spec: dict) -> int:
    """Warm-up steps (outside the clock) plus timed steps: the same for every configuration."""
    return spec.get("warmup_steps", 0) + spec["steps"]


def common_training_args(spec: dict, output_dir: str) -> dict[str, Any]:
    """What every configuration shares: steps, batch, seed, and no logging/eval/saving noise."""
    return {
        "output_dir": output_dir, "max_steps": total_steps(spec), "per_device_train_batch_size": spec["batch_size"],
        "gradient_accumulation_steps": 1, "seed": spec["seed"], "report_to": "none", "save_strategy": "no",
        "eval_strategy": "no", "disable_tqdm": True, "use_cpu": spec["device"] == "cpu",
        "dataloader_num_workers": 0,
    }


# ----------------------------------------------------------------------------- configurations


def run_ours(spec: dict, output_dir: str, meter: ThroughputMeter) -> dict[str, Any]:
    """Our pipeline as users run it: the entry point's own plan, preset and ``run_sft``, driven by
    config flags. The only addition is the meter callback (``run_sft`` takes callbacks)."""
    from sft import train_sft_cuda, train_sft_mac
    from sft.training import run_sft

    entry, plan = (train_sft_cuda, train_sft_cuda.plan_cuda) if spec["device"] == "cuda" else (train_sft_mac, train_sft_mac.plan_mac)
    argv = ours_argv(spec, output_dir)
    run_sft(argv, preset=entry.PRESET, plan_model=plan, prog=f"python -m {entry.__name__}", description=entry.__doc__,
            entry_point=entry.__name__, callbacks=[meter])
    metrics = json.loads((Path(output_dir) / "metrics.json").read_text(encoding="utf-8"))
    return {"train_loss": metrics.get("train_loss_last_logged"), "steps": metrics["global_step"],
            "supervised_tokens": metrics.get("supervised_tokens_seen"),
            "settings": {"trainer": "sft.training.SFTTrainer", "precision": metrics.get("precision"),
                         "gradient_checkpointing": "--gradient_checkpointing=true" in argv,
                         "sampling": "packed" if metrics.get("packing_tokens_per_row") else "group_by_length",
                         "packing_tokens_per_row": metrics.get("packing_tokens_per_row"),
                         "optimizer": metrics.get("optimizer"),
                         "logits_only_at_labelled_positions": metrics.get("logits_only_at_labelled_positions")},
            "argv": argv}


def run_ours_packed(spec: dict, output_dir: str, meter: ThroughputMeter) -> dict[str, Any]:
    """Ours with ``--packing true`` and rows of ``batch_size`` x the examples' mean length tokens:
    per forward, the real tokens of an average unpacked batch (and of a ``ceiling`` step), no padding."""
    from bench.ceiling import mean_example_tokens

    budget = spec["batch_size"] * mean_example_tokens(spec)
    flags = {**(spec.get("ours_flags") or {}), "packing": True, "max_tokens_per_batch": budget}
    return run_ours({**spec, "ours_flags": flags}, output_dir, meter)


def run_ceiling_row(spec: dict, output_dir: str, meter: ThroughputMeter) -> dict[str, Any]:
    """The plain-PyTorch ``ceiling`` (bench/ceiling.py) on the same model, adapter, precision and
    tokens, with the same warm-up steps outside its clock."""
    from bench.ceiling import run_ceiling

    base = spec["precision"]  # as ours loads its base (core.training.load_base_for): in the compute precision
    result = run_ceiling({**spec, "ceiling_base_dtype": base})
    result["settings"] = {"trainer": "bench.ceiling (plain PyTorch loop)", "precision": spec["precision"],
                          "gradient_checkpointing": False, "sampling": f"dense blocks of {result['block_len']} tokens",
                          "optimizer": result["optimizer"], "base_dtype": base}
    result["forwards"] = result["timed_steps"]
    return result


def ours_argv(spec: dict, output_dir: str) -> list[str]:
    """The config flags a user would pass (on CPU the mac preset decides everything else);
    evaluation and checkpoints pushed past the last step and logging only at the end, so the loop
    times training alone (one 1-row validation at start)."""
    lora = spec["lora"]
    flags = {
        "model_name_or_path": spec["model_dir"], "train_file": spec["train_file"], "val_file": spec["val_file"],
        "max_seq_length": spec["max_seq_length"], "max_steps": total_steps(spec),
        "per_device_train_batch_size": spec["batch_size"], "gradient_accumulation_steps": 1, "seed": spec["seed"],
        "lora_r": lora["r"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"],
        "lora_target_modules": ",".join(lora["target_modules"]), "precision": spec["precision"],
        "load_in_4bit": spec["load_in_4bit"],
        "report_to": "none", "logging_steps": total_steps(spec), "eval_steps": 10 ** 6, "save_steps": 10 ** 6,
        "max_eval_samples": 1, "output_dir": output_dir, "overwrite_output_dir": True,
    }
    if spec["device"] == "cuda":
        # The cuda preset is tuned for 7B models on small GPUs (checkpointing, paged 8-bit AdamW);
        # here every configuration gets the same optimizer and no checkpointing (but TRL defaults).
        flags.update(gradient_checkpointing=False, optim="adamw_torch_fused")
    flags.update(spec.get("ours_flags") or {})  # what-if runs: bench_train --ours_flag KEY=VALUE
    return [f"--{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in flags.items()]


def run_original(spec: dict, output_dir: str, meter: ThroughputMeter) -> dict[str, Any]:
    """The original study's recipe on the plain transformers Trainer: every example padded to
    ``max_seq_length``, prompt tokens in the loss, random order. Tokenization is ours (the same
    examples give the same tokens); only the recipe differs."""
    from transformers import Trainer, TrainingArguments

    from core.tokenization import PaddingCollator, ensure_pad_token

    from sft.dataset import load_sft_datasets
    from core.modeling import load_tokenizer
    from sft.sft_config import SFTConfig

    tokenizer = load_tokenizer(spec["model_dir"])
    ensure_pad_token(tokenizer)
    config = SFTConfig(model_name_or_path=spec["model_dir"], train_file=spec["train_file"], val_file=spec["val_file"],
                       max_seq_length=spec["max_seq_length"], train_on_inputs=True)
    train_dataset = load_sft_datasets(config, tokenizer, use_cache=False).train
    args = TrainingArguments(**common_training_args(spec, output_dir), learning_rate=2e-4,
                             train_sampling_strategy="random", **precision_flags(spec["precision"]))
    # Rounding every batch up to a multiple of max_seq_length pads every row to exactly that length.
    collator = PaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of=spec["max_seq_length"])
    trainer = Trainer(model=load_peft_model(spec), args=args, train_dataset=train_dataset, data_collator=collator,
                      callbacks=[meter])
    return train_with(trainer)


def load_peft_model(spec: dict):
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if spec["load_in_4bit"]:
        kwargs.update(quantization_config=bnb_config(spec), device_map={"": 0})
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], **kwargs)
    if spec["load_in_4bit"]:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, lora_config(spec))


def run_trl(spec: dict, output_dir: str, meter: ThroughputMeter, best: bool, padding_free: bool = False,
            packing: bool = False) -> dict[str, Any]:
    """TRL's SFTTrainer on prompt/completion rows. ``best=False``: its defaults (gradient
    checkpointing on, bf16 mixed precision, random order); ``best=True``: what is fastest for the
    device (no checkpointing, length-grouped batches, completion-only loss, the spec's precision),
    optionally with its ``padding_free`` rows (the batch's examples flattened into one row) or its
    ``packing`` (best-fit decreasing into rows of ``max_length`` tokens; padding-free too)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    rows = read_rows(spec["train_file"])
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["response"]} for r in rows])
    kwargs = common_training_args(spec, output_dir)
    kwargs["max_length"] = spec["max_seq_length"]
    if spec["load_in_4bit"]:
        kwargs["model_init_kwargs"] = {"quantization_config": bnb_config(spec), "device_map": {"": 0}}
    if best:
        kwargs.update(gradient_checkpointing=False, train_sampling_strategy="group_by_length",
                      completion_only_loss=True, **precision_flags(spec["precision"]))
        if padding_free:  # TRL refuses max_length without packing here: examples are not cut (few exceed it)
            kwargs.update(padding_free=True, max_length=None)
        if packing:  # packed rows are all about max_length long: grouping by length buys nothing
            kwargs.update(packing=True, train_sampling_strategy="random")
    trainer = SFTTrainer(model=spec["model_dir"], args=TRLConfig(**kwargs), train_dataset=dataset,
                         processing_class=AutoTokenizer.from_pretrained(spec["model_dir"]),
                         peft_config=lora_config(spec), callbacks=[meter])
    return train_with(trainer)


def train_with(trainer) -> dict[str, Any]:
    result = trainer.train()
    args = trainer.args
    return {"train_loss": result.metrics.get("train_loss"), "steps": result.global_step,
            "settings": {"trainer": f"{type(trainer).__module__}.{type(trainer).__name__}",
                         "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
                         "gradient_checkpointing": bool(args.gradient_checkpointing),
                         "sampling": args.train_sampling_strategy,
                         "padding_free": bool(getattr(trainer, "padding_free", False)),
                         "packing": bool(getattr(args, "packing", False))}}


CONFIGURATIONS: dict[str, Callable[[dict, str, ThroughputMeter], dict[str, Any]]] = {
    "ours": run_ours,
    "ours_bf16": lambda spec, out, meter: run_ours({**spec, "precision": "bf16"}, out, meter),
    "original": run_original,
    "trl_default": lambda spec, out, meter: run_trl(spec, out, meter, best=False),
    "trl_best": lambda spec, out, meter: run_trl(spec, out, meter, best=True),
    "trl_best_bf16": lambda spec, out, meter: run_trl({**spec, "precision": "bf16"}, out, meter, best=True),
    "trl_padding_free": lambda spec, out, meter: run_trl(spec, out, meter, best=True, padding_free=True),
    "trl_packed": lambda spec, out, meter: run_trl(spec, out, meter, best=True, packing=True),
    "ours_packed": run_ours_packed,
    "ours_liger": lambda spec, out, meter: run_ours({**spec, "ours_flags": {**(spec.get("ours_flags") or {}), "liger_kernels": True}},
                                                    out, meter),
    "ceiling": run_ceiling_row,
}


def run(spec: dict) -> dict[str, Any]:
    import tempfile

    import torch
    from transformers import set_seed

    torch.set_num_threads(spec["threads"])
    set_seed(spec["seed"])
    started = time.perf_counter()
    meter = ThroughputMeter(spec.get("warmup_steps", 0))
    with tempfile.TemporaryDirectory(prefix=f"bench_{spec['config']}_") as output_dir:
        outcome = CONFIGURATIONS[spec["config"]](spec, output_dir, meter)
    counts = meter.counts()
    if outcome.get("supervised_tokens") is not None:
        counts.pop("supervised_tokens")  # ours computes its loss without passing labels to the model
    return {"config": spec["config"], **counts, **outcome, "process_s": time.perf_counter() - started,
            "peak_rss_mb_self": peak_rss_mb(), "gpu_peak_mb": gpu_peak_mb()}


def main(argv: Sequence[str] | None = None) -> int:
    spec_path, result_path = (sys.argv[1:] if argv is None else list(argv))
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    result = run(spec)
    Path(result_path).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
