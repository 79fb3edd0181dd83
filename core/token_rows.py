"""DPO and RLOO from an SFT run that trained token rows (SFT's ``--train_eos_embedding``).

TRL's DPOTrainer and RLOOTrainer score tokens with ``lm_head.weight`` directly (DPO through a fused
log-prob head, see ``trl.trainer.utils.add_fused_lm_head``) and refuse or ignore a PEFT wrapper on
the output embedding. The SFT adapter's trained EOS row therefore has to live in the base weight
while they train: :func:`fold_token_rows` writes the trained rows into the base embedding matrix
and removes PEFT's wrapper, so the policy *and* TRL's frozen reference copy both score with the SFT
model's EOS row (DPO's reward margin and RLOO's KL are exactly 0 at step 0). The row stays frozen:
only the LoRA weights move.

The saved adapter must still load on the *original* base model, so :func:`copy_token_rows` puts
the SFT adapter's rows (unchanged by training) back into it: ``adapter_config.json`` names the rows
and ``adapter_model.safetensors`` carries them, exactly as PEFT saved them for SFT.
"""
from __future__ import annotations

import json
from pathlib import Path

TOKEN_ROW_KEY = "token_adapter"  # part of every PEFT state-dict key holding trainable-token rows


def trained_token_rows(adapter_dir: str | Path) -> dict | None:
    """The adapter's ``trainable_token_indices`` ({module name: token ids}), or None without any."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    return config.get("trainable_token_indices") or None


def fold_token_rows(model, adapter_name: str) -> int:
    """Write ``adapter_name``'s trained token rows into the base weights and unwrap the modules.

    Returns how many modules were unwrapped (0 when the adapter has no token rows). Afterwards the
    adapter is plain LoRA: TRL's reference copy of it and the base model share the folded rows.
    """
    from peft.utils.other import TrainableTokensWrapper

    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, TrainableTokensWrapper)]
    for name, module in wrapped:
        layer = module.token_adapter
        if adapter_name not in layer.merged_adapters:
            layer.merge(adapter_names=[adapter_name])  # index_copy of the trained rows into base_layer.weight
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    if wrapped:
        model.peft_config[adapter_name].trainable_token_indices = None
    return len(wrapped)


def copy_token_rows(sft_dir: str | Path, output_dir: str | Path) -> list[str]:
    """Put the SFT adapter's token rows into the adapter saved in ``output_dir``; returns the keys copied."""
    from safetensors.torch import load_file, save_file

    sft_dir, output_dir = Path(sft_dir), Path(output_dir)
    rows = {k: v for k, v in load_file(str(sft_dir / "adapter_model.safetensors")).items() if TOKEN_ROW_KEY in k}
    weights_path = output_dir / "adapter_model.safetensors"
    weights = load_file(str(weights_path))
    weights.update(rows)
    save_file(weights, str(weights_path), metadata={"format": "pt"})
    config_path = output_dir / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["trainable_token_indices"] = trained_token_rows(sft_dir)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return sorted(rows)
