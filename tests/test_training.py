"""SFT training end to end on CPU: tiny Llama from tiny_assets, real Trainer, real PEFT, no mocks.

Covers: the response-token loss (equal to the model's own loss, with equal gradients), the data
order, the token-weighted evaluation loss, output-dir safety, a full run (loss goes down, every
output written, adapter reloads with the same logits), the QLoRA 4-bit path on CPU, one-line
errors, and resume after SIGKILL ending with the same adapter as an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

import tiny_assets
from core import checkpoints
from core.cli import UserError, run_cli
from core.tokenization import PaddingCollator, ensure_pad_token, tokenize_example
from core.modeling import attach_lora, load_base_model
from sft.sft_config import parse_sft_config
from sft.train_sft_mac import main as mac_main, plan_mac
from core.losses import response_token_loss_sum, supports_logits_mask
from core.runs import prepare_output_dir
from core.training import DevicePlan, SeededLengthGroupedSampler, longest_first
from sft.training import build_lora_model, run_sft

REPO = Path(__file__).resolve().parents[1]




def train_argv(model_dir: Path, data: tuple[Path, Path], out: Path, **overrides) -> list[str]:
    keys = {
        "model_name_or_path": model_dir, "train_file": data[0], "val_file": data[1], "output_dir": out,
        "max_steps": 8, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
        "learning_rate": 1e-2, "warmup_ratio": 0.0, "lora_r": 8, "logging_steps": 1, "eval_steps": 4,
        "save_steps": 4, "report_to": "none", "precision": "fp32",  # pinned: `auto` would measure the CPU
    }
    keys.update(overrides)
    return [f"--{k}={v}" for k, v in keys.items()]


def supervised_batch(tokenizer_dir: Path, rows: list[dict]) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ensure_pad_token(tokenizer)
    features = [tokenize_example(r["prompt"], r["response"], tokenizer, 256) for r in rows]
    return PaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)(features)


def lora_model(model_dir: Path, seed: int = 0):
    model = attach_lora(load_base_model(str(model_dir)), r=8, alpha=16, dropout=0.0,
                        target_modules=["q_proj", "v_proj", "down_proj"], seed=seed)
    with torch.no_grad():  # non-zero B, so the adapter changes the logits and gets gradients everywhere
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


# --------------------------------------------------------------------------- loss


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("logits_mask", [True, False])
def test_response_loss_equals_model_loss_and_gradients_match(tiny_llama_dir, logits_mask):
    batch = supervised_batch(tiny_llama_dir, tiny_assets.rendered_rows()[:5])
    model = lora_model(tiny_llama_dir)
    assert supports_logits_mask(model)

    reference = model(**batch).loss  # transformers' own shifted, masked mean
    reference.backward()
    reference_grads = _grads(model)
    model.zero_grad()

    loss_sum, count = response_token_loss_sum(model, batch, logits_mask=logits_mask)
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    (loss_sum / count).backward()
    assert torch.allclose(loss_sum / count, reference, atol=1e-6)
    for name, grad in _grads(model).items():
        assert torch.allclose(grad, reference_grads[name], atol=1e-6), name


def test_logits_are_computed_only_at_labelled_positions(tiny_llama_dir):
    batch = supervised_batch(tiny_llama_dir, tiny_assets.rendered_rows()[:4])
    model = lora_model(tiny_llama_dir)
    seen = {}

    def record(module, inputs, output):
        seen["rows"] = output.shape

    hook = model.get_base_model().lm_head.register_forward_hook(record)
    response_token_loss_sum(model, batch)
    hook.remove()
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert seen["rows"][0] == labelled  # (labelled positions, vocab), not (batch, seq, vocab)
    assert labelled < 0.5 * batch["attention_mask"].sum()  # the prompt is most of an Alpaca example


# --------------------------------------------------------------------------- data order


def _padding(order: list[int], lengths: list[int], batch: int) -> int:
    """Pad tokens when each batch is padded to its longest member."""
    chunks = [order[k:k + batch] for k in range(0, len(order), batch)]
    return sum(max(lengths[i] for i in c) * len(c) - sum(lengths[i] for i in c) for c in chunks)


def test_data_order_depends_only_on_seed_and_epoch():
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(800)]
    first, again = SeededLengthGroupedSampler(lengths, 8, seed=3), SeededLengthGroupedSampler(lengths, 8, seed=3)
    torch.manual_seed(123)  # the global RNG must not matter
    order = list(first)
    torch.manual_seed(999)
    assert list(again) == order
    assert sorted(order) == list(range(800))
    again.set_epoch(1)
    assert list(again) != order
    # Length grouping: a fraction of the padding a random order needs.
    shuffled = list(SeededLengthGroupedSampler(lengths, 8, seed=3, group_by_length=False))
    assert sorted(shuffled) == list(range(800)) and shuffled != order
    assert _padding(order, lengths, 8) < 0.2 * _padding(shuffled, lengths, 8)


def _group_maxima(order: list[int], lengths: list[int], group: int) -> list[int]:
    return [max(lengths[i] for i in order[k:k + group]) for k in range(0, len(order), group)]


def test_length_groups_come_in_random_order_not_long_to_short_cycles():
    from transformers.trainer_pt_utils import get_length_grouped_indices

    rng = random.Random(1)
    lengths = [rng.randint(5, 500) for _ in range(4000)]
    ours = list(SeededLengthGroupedSampler(lengths, 16, seed=0))
    stock = get_length_grouped_indices(lengths, 16, generator=torch.Generator().manual_seed(0))

    def share_descending(order):
        maxima = _group_maxima(order, lengths, 16)
        return sum(a >= b for a, b in zip(maxima, maxima[1:])) / (len(maxima) - 1)

    assert share_descending(stock) > 0.9  # Hugging Face's: sorted runs, long to short, every 50 groups
    assert 0.3 < share_descending(ours) < 0.7  # ours: no trend
    maxima = _group_maxima(ours, lengths, 16)
    assert maxima[0] == max(lengths)  # longest group first: an OOM shows at once
    assert _padding(ours, lengths, 16) < 0.2 * _padding(list(range(4000)), lengths, 16)


def test_longest_first():
    assert longest_first([3, 9, 1, 9]) == [1, 3, 0, 2]


# --------------------------------------------------------------------------- output dir


def _config(tmp_path, sft_data, tiny_llama_dir, **overrides):
    return parse_sft_config(train_argv(tiny_llama_dir, sft_data, tmp_path / "out", **overrides), preset="mac")


def test_output_dir_holding_a_run_is_refused_unless_asked(tmp_path, sft_data, tiny_llama_dir):
    out = tmp_path / "out"
    (out / "checkpoint-4").mkdir(parents=True)
    (out / "sft_config.json").write_text("{}")
    with pytest.raises(UserError, match="already holds a training run.*--resume.*--overwrite_output_dir"):
        prepare_output_dir(_config(tmp_path, sft_data, tiny_llama_dir), "sft_config.json", log=lambda m: None)
    messages = []
    assert prepare_output_dir(_config(tmp_path, sft_data, tiny_llama_dir, overwrite_output_dir=True), "sft_config.json", log=messages.append) is None
    assert not (out / "checkpoint-4").exists() and "removing 1 checkpoint" in messages[0]


def test_resume_needs_a_run_and_the_same_config(tmp_path, sft_data, tiny_llama_dir):
    with pytest.raises(UserError, match="holds no run to resume"):
        prepare_output_dir(_config(tmp_path, sft_data, tiny_llama_dir, resume=True), "sft_config.json", log=lambda m: None)
    from sft.sft_config import save_sft_config

    save_sft_config(_config(tmp_path, sft_data, tiny_llama_dir), tmp_path / "out")
    (tmp_path / "out" / "checkpoint-2").mkdir()  # a run that trained (its checkpoint never completed)
    with pytest.raises(UserError, match=r"learning_rate \(run: 0.01, now: 0.001\)"):
        prepare_output_dir(_config(tmp_path, sft_data, tiny_llama_dir, resume=True, learning_rate=1e-3), "sft_config.json", log=lambda m: None)
    messages = []
    # Logging/eval/save cadence may change on resume; nothing to resume from yet is said, not fatal.
    assert prepare_output_dir(_config(tmp_path, sft_data, tiny_llama_dir, resume=True, eval_steps=2),
                              "sft_config.json", log=messages.append) is None
    assert "no complete checkpoint" in messages[-1]


# --------------------------------------------------------------------------- one-line errors


def _run_and_capture(capsys, argv, main=mac_main):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    err = capsys.readouterr().err.strip()
    return exit_info.value.code, err


def test_missing_data_says_to_run_the_prepare_script(tmp_path, tiny_llama_dir, capsys):
    missing = (tmp_path / "nope_train.jsonl", tmp_path / "nope_val.jsonl")
    code, err = _run_and_capture(capsys, train_argv(tiny_llama_dir, missing, tmp_path / "out"))
    assert code == 2 and err.startswith("error: ") and "prepare_sft_data.py" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing written before the checks


def test_empty_data_is_one_line(tmp_path, tiny_llama_dir, sft_data, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, err = _run_and_capture(capsys, train_argv(tiny_llama_dir, (empty, sft_data[1]), tmp_path / "out"))
    assert code == 2 and "holds no rows" in err and len(err.splitlines()) == 1


def test_output_dir_of_another_run_is_one_line(tmp_path, tiny_llama_dir, sft_data, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "adapter_config.json").write_text("{}")
    code, err = _run_and_capture(capsys, train_argv(tiny_llama_dir, sft_data, tmp_path / "out"))
    assert code == 2 and "already holds a training run" in err and len(err.splitlines()) == 1


def test_cuda_entry_point_without_cuda_points_to_mac(tmp_path, tiny_llama_dir, sft_data, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from sft.train_sft_cuda import main as cuda_main

    code, err = _run_and_capture(capsys, train_argv(tiny_llama_dir, sft_data, tmp_path / "out"), main=cuda_main)
    assert code == 2 and "python -m sft.train_sft_mac" in err and len(err.splitlines()) == 1


def test_help_lists_every_config_key(capsys):
    from dataclasses import fields

    from sft.sft_config import SFTConfig

    with pytest.raises(SystemExit):
        mac_main(["--help"])
    out = capsys.readouterr().out
    assert "python -m sft.train_sft_mac" in out
    for key in (f.name for f in fields(SFTConfig)):
        assert f"--{key}" in out, key


# --------------------------------------------------------------------------- full runs


class LogitsAtEnd(TrainerCallback):
    """Records the trained model's logits on a probe batch when training ends."""

    def __init__(self, batch):
        self.batch, self.logits = batch, None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=self.batch["input_ids"], attention_mask=self.batch["attention_mask"]).logits


@pytest.mark.slow
def test_mac_run_learns_writes_everything_and_adapter_reloads(tmp_path, tiny_llama_dir, sft_data, capsys):
    probe = supervised_batch(tiny_llama_dir, tiny_assets.rendered_rows()[:3])
    recorder = LogitsAtEnd(probe)
    out = tmp_path / "out"
    run_sft(train_argv(tiny_llama_dir, sft_data, out, report_to="tensorboard", save_total_limit=1), preset="mac",
            plan_model=plan_mac, prog="test", description="", callbacks=[recorder])
    printed = capsys.readouterr().out
    assert "device: " in printed and "resolved SFT config" in printed
    # the MPS note is for macOS, where MPS could exist; elsewhere it would only be noise
    assert ("MPS not available" in printed) == (sys.platform == "darwin")

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 8
    assert metrics["val_loss_after"] < metrics["val_loss_before"] - 0.05
    assert metrics["train_loss_last_logged"] < metrics["train_loss_first_logged"]
    assert 0 < metrics["supervised_tokens_seen"] < metrics["train_tokens_seen"]
    assert metrics["train_tokens_per_second"] > 0 and metrics["peak_memory_mb"] > 0
    assert metrics["logits_only_at_labelled_positions"] is True
    assert metrics["data"]["train"]["emitted"] == 24
    phases = metrics["phases"]  # every second charged once (core/phases.py): the phases add up to the wall time
    assert {"model_load", "training_compute", "evaluation", "checkpoint", "outputs"} <= set(phases["seconds"])
    assert all(seconds >= 0 for seconds in phases["seconds"].values())
    assert sum(phases["seconds"].values()) == pytest.approx(phases["wall_seconds"], abs=0.01)
    assert phases["wall_seconds"] >= metrics["wall_time_seconds_this_session"] and phases["peak_rss_mb"] > 0

    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "sft_config.json",
                 "trainer_state.json", "loss_curve.png", "README.md"):
        assert (out / name).is_file(), name
    assert "How to load it" in (out / "README.md").read_text()
    assert list((out / "runs").rglob("events.out.tfevents.*"))  # TensorBoard under the output dir
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-8"]  # limit 1 kept the newest
    assert checkpoints.is_complete(out / "checkpoint-8")
    state = json.loads((out / "trainer_state.json").read_text())
    assert any("eval_loss" in entry for entry in state["log_history"])

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(out)).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    assert torch.allclose(logits, recorder.logits, atol=1e-5)
    base_logits = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)(input_ids=probe["input_ids"]).logits
    assert not torch.allclose(logits, base_logits, atol=1e-3)  # the adapter did change the model


def test_lora_seed_fixes_the_initial_adapter(tiny_llama_dir, sft_data, tmp_path):
    config = _config(tmp_path, sft_data, tiny_llama_dir)
    first, second = (build_lora_model(config, DevicePlan(torch.device("cpu"), "fp32")) for _ in range(2))
    state = {n: p for n, p in first.named_parameters() if "lora_A" in n}
    assert state and all(torch.equal(p, dict(second.named_parameters())[n]) for n, p in state.items())


def test_trains_from_a_gguf_file(tmp_path, tiny_llama_dir, sp_tokenizer_dir, sft_data):
    pytest.importorskip("gguf")
    from test_modeling import write_llama_gguf

    gguf_file = write_llama_gguf(tiny_llama_dir, sp_tokenizer_dir / "tokenizer.model", tmp_path / "base.F32.gguf")
    out = tmp_path / "out"
    mac_main(train_argv(gguf_file, sft_data, out, max_steps=2, eval_steps=2, save_steps=2))
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 2
    assert json.loads((out / "sft_config.json").read_text())["config"]["model_name_or_path"] == str(gguf_file)
    assert f"gguf_file='base.F32.gguf'" in (out / "README.md").read_text()


@pytest.mark.slow
def test_qlora_4bit_path_trains_on_cpu(tmp_path, sp_tokenizer_dir, sft_data):
    """The CUDA entry point's loader (NF4, double quant, k-bit prep, checkpointing), run on the CPU."""
    pytest.importorskip("bitsandbytes")
    # bitsandbytes' CPU kernels quantise in blocks of 64 input features: hidden 32 is too narrow.
    tiny_llama_dir = tiny_assets.build_tiny_llama(tmp_path / "llama64", sp_tokenizer_dir, hidden_size=64)

    def plan_4bit_cpu(config):
        assert config.load_in_4bit and config.gradient_checkpointing  # the cuda preset's choices
        return DevicePlan(torch.device("cpu"), "fp32", load_in_4bit=True, device_map="cpu")

    out = tmp_path / "out"
    argv = train_argv(tiny_llama_dir, sft_data, out, max_steps=2, eval_steps=2, save_steps=2, optim="adamw_torch")
    run_sft(argv, preset="cuda", plan_model=plan_4bit_cpu, prog="test", description="")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["val_loss_after"] < metrics["val_loss_before"]
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())  # fp32 LoRA weights
    model = build_lora_model(parse_sft_config(argv, preset="cuda"), DevicePlan(torch.device("cpu"), "fp32", load_in_4bit=True, device_map="cpu"))
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers and all(m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested for m in layers)
    # An evaluation pass must leave the weights in the trainable layout (see modeling.py).
    batch = supervised_batch(tiny_llama_dir, tiny_assets.rendered_rows()[:2])
    model.eval()
    with torch.no_grad():
        model(**batch)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "backprop through a kernel without autograd"
        model(**batch).loss.backward()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_entry_point_qlora_on_the_gpu(tmp_path, sp_tokenizer_dir, sft_data):
    """The real CUDA path: NF4 base on the GPU, bf16/fp16 compute, checkpointing, paged 8-bit AdamW."""
    pytest.importorskip("bitsandbytes")
    from sft.train_sft_cuda import main as cuda_main

    model_dir = tiny_assets.build_tiny_llama(tmp_path / "llama64", sp_tokenizer_dir, hidden_size=64)
    out = tmp_path / "out"
    cuda_main(train_argv(model_dir, sft_data, out, max_steps=4, eval_steps=2, save_steps=2))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["device"].startswith("cuda") and metrics["precision"] in ("bf16", "fp16")
    assert metrics["global_step"] == 4 and metrics["val_loss_after"] < metrics["val_loss_before"]
    assert metrics["peak_memory_kind"] == "cuda max_memory_allocated"
    saved = json.loads((out / "sft_config.json").read_text())["config"]
    assert saved["load_in_4bit"] and saved["optim"] == "paged_adamw_8bit"


# --------------------------------------------------------------------------- resume after SIGKILL

@pytest.mark.slow
def test_resume_when_killed_after_the_last_checkpoint_adds_no_step(tmp_path, tiny_llama_dir, sft_data):
    """Killed between the final checkpoint and the outputs: --resume writes them, trains no further."""
    import shutil

    done = tmp_path / "done"
    mac_main(train_argv(tiny_llama_dir, sft_data, done))
    killed = tmp_path / "killed"
    shutil.copytree(done, killed)
    for name in ("adapter_model.safetensors", "metrics.json", "README.md", "loss_curve.png"):
        (killed / name).unlink()
    (killed / "sft_config.json").write_text((done / "sft_config.json").read_text().replace(str(done), str(killed)))
    mac_main(train_argv(tiny_llama_dir, sft_data, killed, resume=True))
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["global_step"] == 8 and metrics["resumed_from"] == "checkpoint-8"
    assert not (killed / "checkpoint-9").exists()
    expected, actual = _adapter(done), _adapter(killed)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


CHILD = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from transformers import TrainerCallback
from sft.train_sft_mac import plan_mac
from sft.training import run_sft

mode = os.environ["CHILD_MODE"]

class Chaos(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if mode == "slow":
            time.sleep(0.15)  # gives the parent time to kill at an arbitrary moment
    def on_save(self, args, state, control, **kwargs):
        # Runs before the completion marker is written: the checkpoint is on disk but unmarked.
        if mode == "kill_on_save":
            os.kill(os.getpid(), signal.SIGKILL)

run_sft(sys.argv[1:], preset="mac", plan_model=plan_mac, prog="child", description="", callbacks=[Chaos()])
"""


def _child(tmp_path, argv, mode):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=str(REPO)))
    env = {**os.environ, "CHILD_MODE": mode, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, str(script), *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def sigkill_after_first_checkpoint(tmp_path, argv, out: Path, pause_s: float) -> None:
    """Run training in a child, SIGKILL it ``pause_s`` after checkpoint-3 is complete, and check it died mid-run."""
    child = _child(tmp_path, argv, "slow")
    deadline = time.time() + 120
    while not checkpoints.is_complete(out / "checkpoint-3"):
        assert child.poll() is None and time.time() < deadline, child.stdout.read() if child.poll() is not None else "timeout"
        time.sleep(0.02)
    time.sleep(pause_s)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (out / "metrics.json").exists()  # it really died mid-run


def assert_same_run(straight: Path, resumed: Path, metric_keys: Sequence[str]) -> dict:
    """The resumed run ends with the uninterrupted run's adapter (rtol 1e-5, atol 1e-6) and the same
    ``metric_keys``, after 10 steps; returns both runs' metrics.json as {"straight": .., "resumed": ..}."""
    expected, actual = _adapter(straight), _adapter(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    metrics = json.loads((resumed / "metrics.json").read_text())
    straight_metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["resumed_from"] is not None and metrics["global_step"] == 10
    for key in metric_keys:
        assert metrics[key] == straight_metrics[key], key
    return {"straight": straight_metrics, "resumed": metrics}


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, tiny_llama_dir, sft_data):
    # 24 rows, 4 per step: 6 steps per epoch, so 10 steps cross an epoch boundary; dropout on, so
    # the restored RNG matters too.
    common = dict(max_steps=10, save_steps=3, eval_steps=5, lora_dropout=0.1, save_total_limit=2)
    straight = tmp_path / "straight"
    run_sft(train_argv(tiny_llama_dir, sft_data, straight, **common), preset="mac", plan_model=plan_mac,
            prog="test", description="")

    out = tmp_path / "killed"
    # 1) SIGKILL from outside at an arbitrary moment after the first complete checkpoint.
    sigkill_after_first_checkpoint(tmp_path, train_argv(tiny_llama_dir, sft_data, out, **common), out,
                                   pause_s=random.uniform(0.0, 0.6))

    # 2) Resume, and die again while the next checkpoint is written (files there, no marker); then
    #    damage that checkpoint the way a half-finished write would.
    resumed = train_argv(tiny_llama_dir, sft_data, out, **common) + ["--resume"]
    child = _child(tmp_path, resumed, "kill_on_save")
    log = child.communicate(timeout=180)[0]
    assert child.returncode == -signal.SIGKILL, log
    half_written = checkpoints.incomplete_checkpoints(out)
    assert len(half_written) == 1, log
    (half_written[0] / "optimizer.pt").write_bytes(b"truncated")

    # 3) Resume to the end: the unmarked checkpoint is removed, never loaded.
    child = _child(tmp_path, resumed, "none")
    log = child.communicate(timeout=180)[0]
    assert child.returncode == 0, log
    assert f"removing 1 incomplete checkpoint(s) left by an interrupted save: {half_written[0].name}" in log
    assert "resuming from" in log

    runs = assert_same_run(straight, out, ("train_tokens_seen", "supervised_tokens_seen", "val_loss_before"))
    assert abs(runs["resumed"]["val_loss_after"] - runs["straight"]["val_loss_after"]) < 1e-5
