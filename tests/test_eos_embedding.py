"""``--train_eos_embedding``: the EOS row of the embedding is trained (and only that row), and the
adapter carries it through reload and merge.

Why it exists: a base model whose pretraining never emitted EOS has an untrained EOS embedding, and
LoRA on the transformer blocks alone then barely learns to stop (see the config key's comment).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.training import DevicePlan
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft.train_sft_mac import plan_mac
from sft.training import run_sft

REPO = Path(__file__).resolve().parents[1]


def _embedding(model) -> torch.Tensor:
    return model.get_input_embeddings().weight.detach().clone()


def test_only_the_eos_row_is_trained_and_survives_reload_and_merge(tmp_path, tiny_llama_dir, sft_data):
    out = tmp_path / "out"
    argv = [f"--model_name_or_path={tiny_llama_dir}", f"--train_file={sft_data[0]}", f"--val_file={sft_data[1]}",
            f"--output_dir={out}", "--max_steps=4", "--per_device_train_batch_size=4", "--gradient_accumulation_steps=1",
            "--learning_rate=5e-2", "--warmup_ratio=0", "--eval_steps=4", "--save_steps=4", "--report_to=none", "--precision=fp32",
            "--train_eos_embedding=true"]
    run_sft(argv, preset="mac", plan_model=plan_mac, prog="test", description="")

    eos = AutoTokenizer.from_pretrained(out).eos_token_id
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert not base.config.tie_word_embeddings  # so the EOS *logit* row is the lm_head's
    before_in, before_out = _embedding(base), base.lm_head.weight.detach().clone()
    tuned = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    after = tuned.lm_head.weight.detach()

    changed = (after != before_out).any(dim=1).nonzero().flatten().tolist()
    assert changed == [eos]  # the EOS logit row moved, no other row did
    assert torch.equal(_embedding(tuned), before_in)

    merged_dir = tmp_path / "merged"
    subprocess.run([sys.executable, "scripts/merge_adapter.py", "--adapter_dir", str(out), "--out_dir", str(merged_dir)],
                   cwd=REPO, check=True, capture_output=True)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert torch.allclose(merged.lm_head.weight[eos], after[eos])


def test_off_by_default_leaves_the_embedding_frozen(tmp_path, tiny_llama_dir, sft_data):
    from sft.sft_config import parse_sft_config
    from sft.training import build_lora_model

    config = parse_sft_config([f"--model_name_or_path={tiny_llama_dir}", f"--output_dir={tmp_path}"])
    assert config.train_eos_embedding is False
    model = build_lora_model(config, DevicePlan(torch.device("cpu"), "fp32"))
    assert not any(p.requires_grad for n, p in model.named_parameters() if "embed" in n or "token" in n)


def _eos_row(adapter_dir: Path, base_dir: Path) -> torch.Tensor:
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    eos = AutoTokenizer.from_pretrained(adapter_dir).eos_token_id
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().lm_head.weight[eos].detach().clone()


def _sft_run_with_eos_row(tmp_path: Path, tiny_llama_dir: Path, sft_data) -> tuple[Path, Path, Path]:
    """(an SFT run that trained the EOS row, preference train file, preference val file)."""
    from tiny_assets import sft_rows, write_jsonl

    sft = tmp_path / "sft"
    run_sft([f"--model_name_or_path={tiny_llama_dir}", f"--train_file={sft_data[0]}", f"--val_file={sft_data[1]}",
             f"--output_dir={sft}", "--max_steps=2", "--learning_rate=5e-2", "--report_to=none", "--precision=fp32", "--train_eos_embedding=true"],
            preset="mac", plan_model=plan_mac, prog="test", description="")
    pairs = [{"instruction": r["instruction"], "input": r["input"], "chosen": r["output"], "rejected": "no no no"}
             for r in sft_rows(repeat=1)]
    return sft, write_jsonl(tmp_path / "p_train.jsonl", pairs[:6]), write_jsonl(tmp_path / "p_val.jsonl", pairs[6:10])


@pytest.mark.slow
def test_dpo_from_an_sft_run_with_a_trained_eos_row_keeps_the_row(tmp_path, tiny_llama_dir, sft_data):
    """TRL scores with lm_head.weight directly: the row is folded into the base for policy and reference.

    Before step 1 the policy is the reference (margin exactly 0), and the saved DPO adapter still
    carries the SFT run's EOS row, so it loads on the original base model with that row.
    """
    import json

    from dpo.train_dpo_mac import main as dpo_main

    sft, train, val = _sft_run_with_eos_row(tmp_path, tiny_llama_dir, sft_data)
    dpo = tmp_path / "dpo"
    dpo_main(["--sft_adapter_dir", str(sft), "--train_file", str(train), "--val_file", str(val), "--output_dir", str(dpo),
              "--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
              "--eval_steps", "2", "--save_steps", "2", "--learning_rate", "5e-3", "--report_to", "none", "--precision", "fp32"])

    metrics = json.loads((dpo / "metrics.json").read_text())
    assert metrics["val_reward_margin_before"] == 0.0 and metrics["val_reward_chosen_before"] == 0.0
    assert metrics["val_reward_margin_after"] != 0.0  # the LoRA weights did train
    sft_row = _eos_row(sft, tiny_llama_dir)
    base_eos = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).lm_head.weight[AutoTokenizer.from_pretrained(sft).eos_token_id]
    assert not torch.equal(sft_row, base_eos.detach())
    assert torch.equal(_eos_row(dpo, tiny_llama_dir), sft_row)


@pytest.mark.slow
def test_rloo_from_an_sft_run_with_a_trained_eos_row_keeps_the_row(tmp_path, tiny_llama_dir, sft_data):
    """As for DPO: the row is folded into the base for policy and reference (KL exactly 0 at step
    0), and the saved RLOO adapter carries the SFT run's EOS row, so it loads on the original base."""
    import json

    from rlhf import train_reward_mac, train_rloo_mac

    sft, train, val = _sft_run_with_eos_row(tmp_path, tiny_llama_dir, sft_data)
    reward = tmp_path / "reward"
    from core.cli import UserError

    with pytest.raises(UserError, match="use --init base"):  # a classifier has no output row to keep
        train_reward_mac.main(["--sft_adapter_dir", str(sft), "--train_file", str(train), "--val_file", str(val),
                               "--output_dir", str(reward)])
    train_reward_mac.main(["--sft_adapter_dir", str(sft), "--init", "base", "--train_file", str(train), "--val_file", str(val),
                           "--output_dir", str(reward), "--max_steps", "2", "--per_device_train_batch_size", "2",
                           "--gradient_accumulation_steps", "1", "--eval_steps", "2", "--save_steps", "2", "--report_to", "none", "--precision", "fp32"])
    rloo = tmp_path / "rloo"
    train_rloo_mac.main(["--sft_adapter_dir", str(sft), "--reward_model_dir", str(reward), "--output_dir", str(rloo),
                         "--max_steps", "2", "--num_generations", "2", "--per_device_train_batch_size", "4",
                         "--per_device_eval_batch_size", "4", "--gradient_accumulation_steps", "1", "--max_new_tokens", "6",
                         "--monitor_prompts", "2", "--eval_steps", "2", "--save_steps", "2", "--report_to", "none", "--precision", "fp32"])

    history = json.loads((rloo / "trainer_state.json").read_text())["log_history"]
    assert [e["eval_kl"] for e in history if "eval_kl" in e][0] == 0.0  # the reference is the starting policy
    assert torch.equal(_eos_row(rloo, tiny_llama_dir), _eos_row(sft, tiny_llama_dir))


def test_eval_compares_adapters_with_and_without_token_rows_in_any_order(tmp_path, tiny_llama_dir, sft_data):
    """peft cannot load a plain adapter after one with token rows; eval must still give every column."""
    import json

    from sft.eval_sft import main as eval_main

    runs = {}
    for name, flag in (("with_eos", "true"), ("plain", "false")):
        runs[name] = tmp_path / name
        run_sft([f"--model_name_or_path={tiny_llama_dir}", f"--train_file={sft_data[0]}", f"--val_file={sft_data[1]}",
                 f"--output_dir={runs[name]}", "--max_steps=1", "--report_to=none", "--precision=fp32", f"--train_eos_embedding={flag}"],
                preset="mac", plan_model=plan_mac, prog="test", description="")
    out = tmp_path / "eval"
    eval_main(["--adapter_dir", str(runs["with_eos"]), str(runs["plain"]), "--num_examples", "2", "--max_new_tokens", "4",
               "--builtin_prompts", "false", "--prefs_file", "none", "--precision", "fp32", "--out_dir", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["models"]) == ["base", "with_eos", "plain"]  # every column, in the order asked
