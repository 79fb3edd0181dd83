"""The reward model as a model: building it for training, loading a trained one, scoring sequences.

A reward model here is ``AutoModelForSequenceClassification`` (``num_labels=1``) on the run's base
model, with a LoRA adapter whose ``modules_to_save`` holds the score head, so the whole trained
part lives in the adapter dir and loads with stock calls::

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(REWARD_DIR)
    base = AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=1)
    base.config.pad_token_id = tokenizer.pad_token_id   # the score is read at the last non-pad token
    model = PeftModel.from_pretrained(base, REWARD_DIR).eval()

The score of a sequence is the head's output at its last non-padding token: for a prompt +
response that ended with EOS, at the EOS. Used by reward training, by RLOO (the reward) and by
the evaluation (each column's mean reward).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from core.cli import UserError
from core.modeling import (keep_cpu_4bit_layout_trainable, quiet_peft_probe, bnb_4bit_config, load_tokenizer,
                           resolve_model_source)
from core.runs import RunRecord, read_run

SCORE_HEAD = "score"  # the head's module name in transformers' *ForSequenceClassification models


# --------------------------------------------------------------------------- building (training)


def load_classifier_base(model_name_or_path: str, *, dtype: torch.dtype, device_map: Any = None,
                         quantization: dict | None = None, trust_remote_code: bool = False, seed: int = 0):
    """The base model with a fresh one-output score head (drawn with ``seed``), optionally 4-bit."""
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    source = resolve_model_source(model_name_or_path)
    kwargs: dict[str, Any] = {"num_labels": 1, "dtype": dtype, "trust_remote_code": trust_remote_code, **source.kwargs()}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantization is not None:
        kwargs["quantization_config"] = bnb_4bit_config(dtype, **quantization)
    set_seed(seed)  # the score head is initialised inside from_pretrained
    try:
        # The new score head and the unused LM head are expected, not worth a load report.
        with suppress_seqcls_warning():
            model = AutoModelForSequenceClassification.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load {model_name_or_path} as a sequence classifier: {str(exc).splitlines()[0]}") from None
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        keep_cpu_4bit_layout_trainable(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def attach_reward_lora(model, *, sft_dir: Path | None, r: int, alpha: int, dropout: float,
                       target_modules: Sequence[str], seed: int):
    """LoRA for a reward model: the SFT adapter's weights (``sft_dir``) or a fresh adapter; the score head trainable.

    With ``sft_dir`` the SFT adapter's LoRA config is reused as a sequence-classification adapter
    and its weights are loaded into it, so the reward model's body starts as the SFT model and is
    trained further (the way DPO's ``--init sft`` continues the SFT adapter).
    """
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from transformers import set_seed

    if sft_dir is None:
        lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                          bias="none", task_type="SEQ_CLS", modules_to_save=[SCORE_HEAD])
    else:
        lora = LoraConfig.from_pretrained(str(sft_dir))
        lora.task_type, lora.modules_to_save, lora.inference_mode = "SEQ_CLS", [SCORE_HEAD], False
    # The SFT adapter has no score head: keep the fresh one when its weights are loaded.
    head = {f"base_model.model.{SCORE_HEAD}.{k}": v.detach().clone()
            for k, v in getattr(model, SCORE_HEAD).state_dict().items()}
    set_seed(seed)
    with quiet_peft_probe():
        peft_model = get_peft_model(model, lora)
    if sft_dir is not None:
        weights = {**load_peft_weights(str(sft_dir), device="cpu"), **head}
        loaded = set_peft_model_state_dict(peft_model, weights)
        if loaded.unexpected_keys:
            raise RuntimeError(f"the SFT adapter in {sft_dir} has weights the reward model does not: "
                               f"{loaded.unexpected_keys[:3]} (architecture mismatch?)")
    peft_model.config.use_cache = False
    return peft_model


# --------------------------------------------------------------------------- loading (scoring)


@dataclass
class RewardModel:
    """A trained reward model ready to score: the model (eval mode), its tokenizer and its run."""

    model: Any
    tokenizer: Any
    run: RunRecord

    @property
    def template(self):
        return self.run.template

    def score(self, sequences: Sequence[Sequence[int]], batch_size: int = 8, show_progress: bool = False) -> list[float]:
        return score_sequences(self.model, sequences, self.tokenizer.pad_token_id, batch_size, show_progress)


def read_reward_run(reward_dir: str | Path) -> RunRecord:
    """The reward run in ``reward_dir``, or a one-line error when there is no finished one."""
    path = Path(reward_dir)
    if not path.is_dir():
        raise UserError(f"no reward model: {reward_dir} does not exist (train one with python -m rlhf.train_reward_mac "
                        "or pass --reward_model_dir)")
    run = read_run(path, expect="reward")
    if not run.has_adapter:
        raise UserError(f"no reward model in {reward_dir}: reward_config.json is there but adapter_config.json is not "
                        "(did the run finish? resume it with --resume)")
    return run


def reward_tokenizer(run: RunRecord):
    tokenizer = load_tokenizer(run.base_model, run.tokenizer_source, trust_remote_code=run.trust_remote_code)
    if tokenizer.pad_token_id is None:
        from core.tokenization import ensure_pad_token

        ensure_pad_token(tokenizer)
    return tokenizer


def _same_source(a: str, b: str) -> bool:
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def check_reward_compatible(run: RunRecord, base_model: str, tokenizer, who: str = "the policy") -> None:
    """A reward model scores token ids: it must share the base model and the exact vocabulary."""
    if not _same_source(run.base_model, base_model):
        raise UserError(f"the reward model in {run.run_dir} was trained on {run.base_model}, but {who} is {base_model}: "
                        "train the reward model from the same SFT run (--sft_adapter_dir)")
    theirs = reward_tokenizer(run)
    if theirs.get_vocab() != tokenizer.get_vocab() or theirs.eos_token_id != tokenizer.eos_token_id:
        raise UserError(f"the reward model in {run.run_dir} uses another tokenizer ({run.tokenizer_source or run.base_model}) "
                        f"than {who}: train the reward model from the same SFT run (--sft_adapter_dir)")


def load_reward_model(reward_dir: str | Path, *, device: torch.device, dtype: torch.dtype = torch.float32,
                      quantization: dict | None = None) -> RewardModel:
    """Base classifier + the trained adapter and score head, frozen, in eval mode on ``device``."""
    from peft import PeftModel

    run = read_reward_run(reward_dir)
    tokenizer = reward_tokenizer(run)
    device_map = {"": device.index or 0} if device.type == "cuda" else None
    base = load_classifier_base(run.base_model, dtype=dtype, device_map=device_map, quantization=quantization,
                                trust_remote_code=run.trust_remote_code)
    base.config.pad_token_id = tokenizer.pad_token_id
    with quiet_peft_probe():
        model = PeftModel.from_pretrained(base, str(run.run_dir), is_trainable=False)
    if device_map is None:
        model.to(device)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return RewardModel(model, tokenizer, run)


def score_sequences(model, sequences: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 8,
                    show_progress: bool = False) -> list[float]:
    """The reward of each token sequence (prompt + response [+ EOS]), right-padded in batches."""
    device = next(model.parameters()).device
    scores: list[float] = []
    with torch.inference_mode(), tqdm(total=len(sequences), desc="reward model", unit="seq", disable=not show_progress) as bar:
        for start in range(0, len(sequences), batch_size):
            batch = [list(s) for s in sequences[start:start + batch_size]]
            width = max(len(s) for s in batch)
            input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, :len(ids)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            scores += logits[:, 0].float().tolist()
            bar.update(len(batch))
    return scores
