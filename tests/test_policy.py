"""core/policy.py: the SFT run as every later stage's start point, and the frozen reference's checks."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from core.cli import UserError
from core.modeling import attach_lora, load_base_model
from core.policy import REFERENCE_ADAPTER, check_reference, match_reference_dtype, read_sft_start
from sft.sft_config import SFTConfig, save_sft_config


@pytest.fixture()
def sft_run(tmp_path):
    """A saved SFT run (config + an adapter file: all a start point reads) that trained with the alpaca template."""
    run = tmp_path / "sft"
    save_sft_config(SFTConfig(model_name_or_path="org/base", train_file=str(tmp_path / "train.jsonl")), run)
    (run / "adapter_config.json").write_text(json.dumps({}))
    return run


def _dpo(run, *flags):
    from dpo.dpo_config import parse_dpo_config
    from dpo.training import resolve_start

    return resolve_start(parse_dpo_config(["--sft_adapter_dir", str(run), *flags]))


def _reward(run, *flags):
    from rlhf.reward_config import parse_reward_config
    from rlhf.reward_training import resolve_start

    return resolve_start(parse_reward_config(["--sft_adapter_dir", str(run), *flags]))


def _rloo(run, *flags):
    from rlhf.rloo_config import parse_rloo_config
    from rlhf.rloo_training import resolve_start

    return resolve_start(parse_rloo_config(["--sft_adapter_dir", str(run), *flags]))


@pytest.mark.parametrize("start, renders", [(_dpo, "DPO renders pairs"), (_reward, "the reward model renders pairs"),
                                            (_rloo, "RLOO renders prompts")])
def test_every_stage_refuses_a_template_other_than_the_sft_runs(sft_run, start, renders):
    with pytest.raises(UserError, match=rf"--template chat differs from the template the SFT run in .* trained with "
                                        rf"\(alpaca\): {renders} with the SFT run's template \(drop --template\)"):
        start(sft_run, "--template", "chat")
    same = start(sft_run, "--template", "alpaca")  # naming the run's own template is fine
    assert same.template.name == "alpaca" and same.base_model == "org/base" and same.sft_dir == sft_run


def test_the_start_point_reads_the_sft_run(sft_run, tmp_path):
    start = _rloo(sft_run)
    assert start.sft_train_file == str(tmp_path / "train.jsonl") and start.sft_payload["stage"] == "sft"
    assert start.record("e") == {"entry_point": "e", "base_model": "org/base", "sft_run_dir": str(sft_run),
                                 "sft_run": start.sft_payload}


def test_a_missing_sft_run_is_a_one_line_error_naming_the_way_out(tmp_path):
    with pytest.raises(UserError, match=r"--init sft needs a finished SFT run in .*: train one with python -m "
                                        r"sft.train_sft_mac, pass --sft_adapter_dir, or use --init base$"):
        _dpo(tmp_path / "none")
    with pytest.raises(UserError, match=r"^RLOO \(the policy starts from the SFT adapter\) needs a finished SFT run .* "
                                        r"or pass --sft_adapter_dir$"):
        _rloo(tmp_path / "none")
    with pytest.raises(UserError, match="no SFT run in .* to take the base model from"):
        read_sft_start(str(tmp_path / "none"), need_adapter=False, why="", renders="")
    start = read_sft_start(str(tmp_path / "none"), need_adapter=False, why="", renders="", model_name_or_path="org/m")
    assert (start.base_model, start.template.name, start.sft_dir) == ("org/m", "alpaca", None)


# --------------------------------------------------------------------------- the reference


@pytest.fixture()
def policy_with_reference(tiny_llama_dir):
    """A PeftModel as TRL leaves it: the policy adapter and a frozen copy named ``ref``."""
    model = attach_lora(load_base_model(str(tiny_llama_dir)), r=4, alpha=8, dropout=0.0, target_modules=["q_proj"], seed=0)
    model.add_adapter(REFERENCE_ADAPTER, model.peft_config["default"])
    for name, param in model.named_parameters():
        if f".{REFERENCE_ADAPTER}." in name:
            param.requires_grad_(False)
    return model


def test_match_reference_dtype_makes_the_copy_exactly_the_policys_dtype(policy_with_reference):
    model = policy_with_reference
    for name, param in model.named_parameters():
        if ".default." in name:
            param.data = param.data.to(torch.bfloat16)  # what TRL does to the trainable adapter on a 4-bit base
    assert match_reference_dtype(model) == 4  # lora_A and lora_B of q_proj in each of the 2 layers
    assert {p.dtype for n, p in model.named_parameters() if f".{REFERENCE_ADAPTER}." in n} == {torch.bfloat16}
    assert match_reference_dtype(model) == 0


def test_check_reference_fails_loudly_when_the_reference_could_move(policy_with_reference):
    check_reference(SimpleNamespace(model=policy_with_reference, ref_model=None))
    with pytest.raises(RuntimeError, match="expected TRL to keep the reference as a frozen 'ref' adapter"):
        check_reference(SimpleNamespace(model=policy_with_reference, ref_model=object()))
    next(p for n, p in policy_with_reference.named_parameters() if f".{REFERENCE_ADAPTER}." in n).requires_grad_(True)
    with pytest.raises(RuntimeError, match="the reference adapter has trainable weights"):
        check_reference(SimpleNamespace(model=policy_with_reference, ref_model=None))
