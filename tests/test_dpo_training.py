"""DPO end to end on a tiny Llama: SFT run -> pairs -> DPO (init sft / base) -> three-way evaluation.

Real code paths only: the SFT adapter is trained with ``sft.train_sft_mac``, DPO runs through TRL's
DPOTrainer via ``dpo.train_dpo_mac``, models are loaded with ``from_pretrained`` from temp dirs.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

import tiny_assets
from dpo import train_dpo_mac
from dpo.dpo_config import CONFIG_FILENAME as DPO_CONFIG
from core.pairs import encode_pairs, read_pairs
from evaluation.preference import pair_logps
from dpo.training import REFERENCE_ADAPTER, run_dpo
from core.cli import UserError
from core.modeling import load_adapter_model, load_tokenizer
from core.prompting import load_template, prompt_format
from sft.sft_config import load_sft_run

BAD_ANSWER = "no no no no no no no no"  # a pattern DPO can learn to avoid on unseen prompts


def write_pairs(path: Path, rows: list[dict]) -> Path:
    return tiny_assets.write_jsonl(path, [{"instruction": r["instruction"], "input": r["input"], "chosen": r["output"],
                                           "rejected": BAD_ANSWER} for r in rows])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dpo")


@pytest.fixture(scope="module")
def sft_run(workdir, tiny_llama_dir) -> Path:
    """A real SFT run (adapter + tokenizer + sft_config.json) on the tiny Llama."""
    from sft.train_sft_mac import main as train_sft

    data = workdir / "data"
    # Rows as prepared before templates moved to training (a rendered prompt beside instruction/input) still work.
    train = tiny_assets.write_jsonl(data / "sft_train.jsonl", tiny_assets.rendered_rows(repeat=2))
    val = tiny_assets.write_jsonl(data / "sft_val.jsonl", tiny_assets.rendered_rows(repeat=1)[:4])
    out = workdir / "sft_output"
    train_sft(["--model_name_or_path", str(tiny_llama_dir), "--train_file", str(train), "--val_file", str(val),
               "--output_dir", str(out), "--max_steps", "4", "--learning_rate", "1e-2", "--per_device_train_batch_size", "6",
               "--gradient_accumulation_steps", "1", "--lora_r", "4", "--lora_alpha", "8", "--report_to", "none",
               "--eval_steps", "100", "--save_steps", "100", "--logging_steps", "2", "--precision", "fp32"])
    return out


@pytest.fixture(scope="module")
def pair_files(workdir) -> tuple[Path, Path]:
    rows = tiny_assets.rendered_rows(repeat=1)
    return write_pairs(workdir / "data" / "prefs_train.jsonl", rows[:8]), write_pairs(workdir / "data" / "prefs_val.jsonl", rows[8:])


class KeepModel(TrainerCallback):
    """Holds on to the trained PeftModel (with TRL's reference adapter) for inspection."""

    model = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


def dpo_args(sft_run: Path, pair_files, out: Path, *extra: str) -> list[str]:
    train, val = pair_files
    return ["--sft_adapter_dir", str(sft_run), "--train_file", str(train), "--val_file", str(val), "--output_dir", str(out),
            "--learning_rate", "5e-3", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
            "--gradient_accumulation_steps", "1", "--logging_steps", "2", "--eval_steps", "3", "--save_steps", "3",
            "--report_to", "tensorboard", "--precision", "fp32", *extra]


def run_with_model(argv: list[str]):
    keep = KeepModel()
    run_dpo(argv, preset="mac", plan_model=train_dpo_mac.plan_mac, prog="test", description="", callbacks=[keep])
    return keep.model


@pytest.fixture(scope="module")
def dpo_sft_run(workdir, sft_run, pair_files):
    """A 6-step DPO run from the SFT adapter; (output dir, trained model with its reference adapter)."""
    out = workdir / "dpo_output"
    with tiny_assets.recorded_stdout(workdir / "dpo.log"):  # 4 held-out pairs in batches of 3 and 1
        model = run_with_model(dpo_args(sft_run, pair_files, out, "--max_steps", "6", "--per_device_eval_batch_size", "3"))
    return out, model


def val_logps(model, sft_run: Path, val_file: Path, adapter: str | None):
    """Held-out pair log-probs with the given adapter active (None = adapters off = the base model)."""
    from trl.trainer.utils import use_adapter

    tokenizer = load_tokenizer(str(sft_run))
    features = encode_pairs(read_pairs(val_file), prompt_format(load_template("alpaca"), tokenizer), 512).features
    if adapter is None:
        with model.disable_adapter():
            return pair_logps(model, features, tokenizer.pad_token_id or 0, show_progress=False)
    with use_adapter(model, adapter):
        return pair_logps(model, features, tokenizer.pad_token_id or 0, show_progress=False)


# --------------------------------------------------------------------------- training


@pytest.mark.slow
def test_dpo_from_sft_raises_held_out_preference_accuracy(dpo_sft_run):
    out, _ = dpo_sft_run
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [e for e in state["log_history"] if "eval_rewards/accuracies" in e]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 6  # evaluated before the first step and at the end
    # Step 0: the policy is the reference (the SFT model), so every reward is exactly 0.
    assert evals[0]["eval_rewards/accuracies"] == 0.0 and evals[0]["eval_rewards/margins"] == 0.0
    assert evals[-1]["eval_rewards/accuracies"] >= 0.75 and evals[-1]["eval_rewards/margins"] > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_reward_accuracy_before"] is None and metrics["val_reward_accuracy_after"] >= 0.75  # all tie at step 0
    assert metrics["val_loss_after"] < metrics["val_loss_before"]
    assert metrics["data"]["train"]["used"] == 8 and metrics["data"]["val"]["used"] == 4


@pytest.mark.slow
def test_held_out_accuracy_is_a_count_of_pairs_against_the_reference(dpo_sft_run, sft_run, pair_files, workdir):
    """Counted over the 4 pairs (batches of 3 and 1), not a mean of batch means; checked with our own log-probs."""
    out, model = dpo_sft_run
    policy = val_logps(model, sft_run, pair_files[1], "default")
    reference = val_logps(model, sft_run, pair_files[1], REFERENCE_ADAPTER)
    margins = [(pc - rc) - (pr - rr) for pc, rc, pr, rr in
               zip(policy.chosen, reference.chosen, policy.rejected, reference.rejected)]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_pairs"] == 4 and metrics["val_pairs_correct_after"] == sum(m > 0 for m in margins)
    assert metrics["val_reward_accuracy_after"] == metrics["val_pairs_correct_after"] / 4
    assert metrics["val_reward_margin_after"] == pytest.approx(0.1 * sum(margins) / 4, abs=1e-4)  # beta 0.1
    assert metrics["val_reward_reference"] == "SFT"
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    held_out = [e for e in history if "eval_pairs" in e]
    assert [e["step"] for e in held_out] == [0, 3, 6]
    assert all(e["eval_rewards/accuracies"] == pytest.approx(e["eval_pairs_correct"] / 4) for e in held_out)
    lines = tiny_assets.log_lines(workdir / "dpo.log")
    shown = [line for line in lines if " held-out: " in line]
    assert len(shown) == 3 and all(re.search(r"reward accuracy \d/4 = \d\.\d{3}", line) for line in shown[1:]), shown
    # step 0: policy == reference, every reward 0: the log line and the final summary say the same
    assert "reward accuracy n/a (every pair ties)" in shown[0], shown[0]
    printed = (workdir / "dpo.log").read_text(encoding="utf-8")
    assert "reward accuracy (vs SFT reference) n/a (every pair ties) -> " in printed  # the final line: the same words
    for line in lines:
        assert not re.search(r"num_tokens|entropy|logits/|mean_token_accuracy|logps/", line), line


@pytest.mark.slow
def test_dpo_output_dir_has_what_sft_has(dpo_sft_run, sft_run):
    out, _ = dpo_sft_run
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", DPO_CONFIG,
                 "trainer_state.json", "metrics.json", "loss_curve.png", "reward_curves.png", "README.md"):
        assert (out / name).is_file(), name
    assert not (out / REFERENCE_ADAPTER).exists()  # only the policy adapter at the top: loads like an SFT adapter
    assert list((out / "runs").rglob("events.out.tfevents.*"))
    assert all((c / "checkpoint_complete.json").is_file() for c in out.glob("checkpoint-*"))
    phases = json.loads((out / "metrics.json").read_text())["phases"]  # core/phases.py: reference forwards their own
    assert {"model_load", "training_compute", "reference_forwards", "evaluation"} <= set(phases["seconds"])
    assert sum(phases["seconds"].values()) == pytest.approx(phases["wall_seconds"], abs=0.01)
    saved = json.loads((out / DPO_CONFIG).read_text())
    _, sft_template, sft_payload = load_sft_run(sft_run)
    assert saved["template"] == sft_payload["template"]  # same shape and text as sft_config.json's
    assert saved["config"]["init"] == "sft" and "SFT" in saved["reference"]
    assert saved["base_model"] == sft_payload["config"]["model_name_or_path"]
    card = (out / "README.md").read_text()
    assert "reward accuracy" in card
    assert "THIS_DIR" not in card and f"PeftModel.from_pretrained(base, {str(out)!r})" in card  # a snippet that runs
    # every pair ties at step 0: undefined, not 0.000; the reference is named
    assert "| held-out DPO reward accuracy (vs SFT reference), before | n/a (every pair ties) |" in card
    assert re.search(r"\| held-out DPO reward accuracy \(vs SFT reference\), after \| \d/4 = \d\.\d{3} \|", card)


@pytest.mark.slow
def test_reference_is_the_frozen_sft_model(dpo_sft_run, sft_run, pair_files):
    _, model = dpo_sft_run
    val_file = pair_files[1]
    sft_model = load_adapter_model(sft_run)
    reference = val_logps(model, sft_run, val_file, REFERENCE_ADAPTER)
    sft_alone = val_logps(sft_model, sft_run, val_file, "default")
    assert reference.chosen == pytest.approx(sft_alone.chosen, abs=1e-4)
    assert reference.rejected == pytest.approx(sft_alone.rejected, abs=1e-4)
    # ... and it is not the base model, and the policy did move away from it.
    base = val_logps(model, sft_run, val_file, None)
    policy = val_logps(model, sft_run, val_file, "default")
    assert max(abs(a - b) for a, b in zip(base.rejected, reference.rejected)) > 1e-2
    assert all(p < r for p, r in zip(policy.rejected, reference.rejected))  # DPO pushed the bad answer down


@pytest.mark.slow
def test_init_base_uses_the_base_model_as_reference(workdir, sft_run, pair_files):
    out = workdir / "dpo_base"
    model = run_with_model(dpo_args(sft_run, pair_files, out, "--init", "base", "--max_steps", "2", "--lora_r", "4"))
    reference = val_logps(model, sft_run, pair_files[1], REFERENCE_ADAPTER)
    base = val_logps(model, sft_run, pair_files[1], None)
    assert reference.chosen == pytest.approx(base.chosen, abs=1e-5)
    assert reference.rejected == pytest.approx(base.rejected, abs=1e-5)
    saved = json.loads((out / DPO_CONFIG).read_text())
    assert saved["config"]["init"] == "base" and saved["reference"].startswith("base model")
    note = json.loads((out / "metrics.json").read_text())["rewards_note"]
    assert "--init base" in note and "--init sft" not in note


@pytest.mark.slow
def test_resume_after_interruption_ends_with_the_same_adapter(workdir, sft_run, pair_files):
    from safetensors.torch import load_file

    class StopAt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True  # as if killed right after the step-2 checkpoint

    straight, interrupted = workdir / "dpo_straight", workdir / "dpo_interrupted"
    common = ("--max_steps", "4", "--save_steps", "2", "--eval_steps", "10", "--report_to", "none")
    run_dpo(dpo_args(sft_run, pair_files, straight, *common), preset="mac", plan_model=train_dpo_mac.plan_mac,
            prog="test", description="")
    run_dpo(dpo_args(sft_run, pair_files, interrupted, *common), preset="mac", plan_model=train_dpo_mac.plan_mac,
            prog="test", description="", callbacks=[StopAt()])
    train_dpo_mac.main(dpo_args(sft_run, pair_files, interrupted, *common, "--resume"))
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(interrupted / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert json.loads((interrupted / "metrics.json").read_text())["resumed_from"] == "checkpoint-2"


@pytest.mark.slow
def test_resume_at_the_last_checkpoint_writes_outputs_without_training(dpo_sft_run, workdir, sft_run, pair_files):
    """Killed between the final checkpoint and the outputs: --resume writes them, trains no further."""
    import shutil

    done, _ = dpo_sft_run
    killed = workdir / "dpo_killed"
    shutil.copytree(done, killed)
    for name in ("adapter_model.safetensors", "metrics.json", "README.md", "reward_curves.png"):
        (killed / name).unlink()
    train_dpo_mac.main(dpo_args(sft_run, pair_files, killed, "--max_steps", "6", "--resume"))
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and metrics["resumed_from"] == "checkpoint-6"
    assert metrics["val_reward_accuracy_after"] == json.loads((done / "metrics.json").read_text())["val_reward_accuracy_after"]
    assert not (killed / "checkpoint-7").exists() and (killed / "reward_curves.png").is_file()
    from safetensors.torch import load_file

    expected, actual = load_file(done / "adapter_model.safetensors"), load_file(killed / "adapter_model.safetensors")
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


# --------------------------------------------------------------------------- errors, before any model is loaded


def test_missing_sft_run_and_missing_pairs_are_one_line_errors(tmp_path, pair_files, tiny_llama_dir):
    with pytest.raises(UserError, match="--init sft needs a finished SFT run"):
        train_dpo_mac.main(dpo_args(tmp_path / "no_sft", pair_files, tmp_path / "out"))
    with pytest.raises(UserError, match="no SFT run .* --model_name_or_path"):
        train_dpo_mac.main(dpo_args(tmp_path / "no_sft", pair_files, tmp_path / "out", "--init", "base"))
    with pytest.raises(UserError, match="prepare_dpo_data"):  # --init base needs no SFT run, but pairs
        train_dpo_mac.main(dpo_args(tmp_path / "no_sft", (tmp_path / "none.jsonl", pair_files[1]), tmp_path / "out",
                                    "--init", "base", "--model_name_or_path", str(tiny_llama_dir)))
    with pytest.raises(UserError, match="unknown prompt template"):
        train_dpo_mac.main(dpo_args(tmp_path / "no_sft", pair_files, tmp_path / "out", "--template", "nope"))
    assert not (tmp_path / "out").exists()


def _pairs_with_stats(folder: Path, pair_files, **stats) -> tuple[Path, Path]:
    """Copies of the pair files with a prefs_stats.json saying where they came from."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = tuple(folder / path.name for path in pair_files)
    for path, copy in zip(pair_files, copies):
        copy.write_bytes(path.read_bytes())
    (folder / "prefs_stats.json").write_text(json.dumps(stats))
    return copies


def test_pairs_sampled_for_another_base_model_are_refused(tmp_path, pair_files, tiny_llama_dir, capsys):
    from dpo.dpo_config import parse_dpo_config
    from dpo.training import check_before_loading

    base = ("--init", "base", "--model_name_or_path", str(tiny_llama_dir))
    foreign = _pairs_with_stats(tmp_path / "foreign", pair_files, sft_model="runs/other/sft", base_model="other/model")
    with pytest.raises(UserError, match=r"sampled from the SFT run runs/other/sft .*not from the base model.*"
                                        r"--allow_foreign_pairs"):
        train_dpo_mac.main(dpo_args(tmp_path / "no_sft", foreign, tmp_path / "out", *base))
    assert not (tmp_path / "out").exists()
    check_before_loading(parse_dpo_config(dpo_args(tmp_path / "no_sft", foreign, tmp_path / "out", *base,
                                                   "--allow_foreign_pairs", "true")))
    assert "note: --allow_foreign_pairs" in capsys.readouterr().out
    own = _pairs_with_stats(tmp_path / "own", pair_files, sft_model="runs/x/sft", base_model=str(tiny_llama_dir))
    check_before_loading(parse_dpo_config(dpo_args(tmp_path / "no_sft", own, tmp_path / "out", *base)))
    assert "sampled from the SFT run runs/x/sft" in capsys.readouterr().out  # said, not refused


@pytest.mark.slow
def test_pairs_sampled_from_another_sft_run_are_refused(tmp_path, sft_run, pair_files, capsys):
    from dpo.dpo_config import parse_dpo_config
    from dpo.training import check_before_loading

    foreign = _pairs_with_stats(tmp_path / "foreign", pair_files, sft_model=str(tmp_path / "other_sft"))
    with pytest.raises(UserError, match=r"other_sft .*not from --sft_adapter_dir .*--allow_foreign_pairs"):
        train_dpo_mac.main(dpo_args(sft_run, foreign, tmp_path / "out"))
    own = _pairs_with_stats(tmp_path / "own", pair_files, sft_model=str(sft_run))
    check_before_loading(parse_dpo_config(dpo_args(sft_run, own, tmp_path / "out")))
    assert f"sampled from the SFT run {sft_run}" in capsys.readouterr().out


@pytest.mark.slow
def test_output_dir_of_another_run_is_refused_and_resume_checks_the_config(dpo_sft_run, sft_run, pair_files):
    out, _ = dpo_sft_run
    with pytest.raises(UserError, match="already holds a training run"):
        train_dpo_mac.main(dpo_args(sft_run, pair_files, out, "--max_steps", "6"))
    with pytest.raises(UserError, match=r"differs from the run's: beta"):
        train_dpo_mac.main(dpo_args(sft_run, pair_files, out, "--max_steps", "6", "--beta", "0.5", "--resume"))
    with pytest.raises(UserError, match="already holds a training run"):  # an SFT run is not overwritten either
        train_dpo_mac.main(dpo_args(sft_run, pair_files, sft_run, "--max_steps", "6"))


# --------------------------------------------------------------------------- evaluation: base | sft | dpo


@pytest.mark.slow
def test_three_way_report_has_preference_metrics_consistent_with_training(dpo_sft_run, sft_run, workdir):
    from sft.eval_sft import main as evaluate

    out, _ = dpo_sft_run
    report_dir = workdir / "eval"
    evaluate(["--adapter_dir", str(sft_run), str(out), "--num_examples", "2", "--builtin_prompts", "false",
              "--max_new_tokens", "4", "--out_dir", str(report_dir)])  # prefs_file auto = the DPO run's val_file
    models = json.loads((report_dir / "metrics.json").read_text())["models"]
    assert list(models) == ["base", "sft", "dpo"]
    assert models["base"]["pref_accuracy"] is None
    for label in ("sft", "dpo"):
        assert models[label]["pref_pairs"] == 4 and models[label]["val_loss"] is not None
    # Rewards relative to the base add up: DPO's margin over base = SFT's + the margin training
    # measured against its reference (the SFT model). Same tokens, same reference, same beta.
    final_eval_margin = json.loads((out / "metrics.json").read_text())["val_reward_margin_after"]
    assert models["dpo"]["reward_margin"] - models["sft"]["reward_margin"] == pytest.approx(final_eval_margin, abs=1e-3)
    assert models["dpo"]["pref_accuracy"] >= models["sft"]["pref_accuracy"]
    report = (report_dir / "report.md").read_text()
    assert "| dpo |" in report and "pref acc" in report


# --------------------------------------------------------------------------- pairs sampled from the SFT model


@pytest.mark.slow
def test_pairs_from_the_sft_model_are_gold_vs_sample_and_reproducible(sft_run, workdir):
    from scripts.prepare_dpo_data import main as prepare

    outputs = []
    for name in ("a", "b"):
        out = workdir / f"sampled_{name}"
        prepare(["--from_sft_model", str(sft_run), "--num_pairs", "10", "--max_new_tokens", "6", "--batch_size", "4",
                 "--val_ratio", "0.2", "--out_dir", str(out)])
        outputs.append((out / "prefs_train.jsonl").read_bytes() + (out / "prefs_val.jsonl").read_bytes())
    assert outputs[0] == outputs[1]  # same seed, same samples, same split
    out = workdir / "sampled_a"
    stats = json.loads((out / "prefs_stats.json").read_text())
    assert stats["read"] == 10 and stats["kept"] + sum(stats["dropped"].values()) == 10
    assert set(stats["dropped"]) == {"empty_sample", "sample_equals_gold", "duplicate"}
    config, template, _ = load_sft_run(sft_run)
    gold = {(r["instruction"], r["input"]): r["output"] for r in tiny_assets.sft_rows(1)}
    rows = read_pairs(out / "prefs_train.jsonl")
    full_rows = [json.loads(line) for line in (out / "prefs_train.jsonl").read_text().splitlines()]
    for row, full in zip(rows, full_rows):
        assert row["chosen"] == gold[(full["instruction"], full["input"])]
        assert "prompt" not in full and template.name == "alpaca"  # template-free: DPO renders with the SFT run's
        assert row["rejected"].strip() and row["rejected"] != row["chosen"]
    assert stats["sft_train_file"] == config.train_file


# --------------------------------------------------------------------------- QLoRA path (4-bit base), on the CPU


@pytest.mark.slow
def test_4bit_base_dpo_starts_with_reference_equal_to_policy(workdir, sft_run, pair_files):
    """The CUDA entry point's model path (NF4 base + SFT adapter), run on the CPU as bitsandbytes allows."""
    pytest.importorskip("bitsandbytes")
    from dpo.dpo_config import parse_dpo_config
    from dpo.training import (DevicePlan, build_dpo_trainer, encode_pair_files, load_policy, read_pair_files,
                              resolve_start)
    from core.tokenization import ensure_pad_token

    config = parse_dpo_config(dpo_args(sft_run, pair_files, workdir / "dpo_4bit", "--max_steps", "2", "--load_in_4bit", "true",
                                       "--report_to", "none"), preset="mac")
    start = resolve_start(config)
    plan = DevicePlan(torch.device("cpu"), "fp32", load_in_4bit=True, device_map="cpu")
    tokenizer = load_tokenizer(start.base_model, start.tokenizer_source)
    ensure_pad_token(tokenizer)
    data = encode_pair_files(config, read_pair_files(config), prompt_format(start.template, tokenizer))
    trainer = build_dpo_trainer(config, load_policy(config, start, plan), tokenizer, data, plan)
    assert type(trainer.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    dtypes = {(".ref." in n, p.dtype) for n, p in trainer.model.named_parameters() if "lora_A" in n}
    assert dtypes == {(True, torch.bfloat16), (False, torch.bfloat16)}  # TRL's bf16 policy and its copy agree
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_rewards/margins" in e]
    assert evals[0]["eval_rewards/margins"] == 0.0 and evals[0]["eval_rewards/accuracies"] == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_entry_point_qlora_dpo_on_the_gpu(workdir, sft_run, pair_files):
    """The real CUDA path: NF4 base + SFT adapter on the GPU, bf16/fp16, checkpointing, paged 8-bit AdamW."""
    pytest.importorskip("bitsandbytes")
    from dpo.train_dpo_cuda import main as cuda_main

    out = workdir / "dpo_cuda"
    cuda_main(dpo_args(sft_run, pair_files, out, "--max_steps", "6", "--report_to", "none"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["device"].startswith("cuda") and metrics["precision"] in ("bf16", "fp16")
    assert metrics["val_reward_accuracy_before"] is None and metrics["val_reward_accuracy_after"] >= 0.75  # all tie at step 0
    saved = json.loads((out / DPO_CONFIG).read_text())["config"]
    assert saved["load_in_4bit"] and saved["optim"] == "paged_adamw_8bit"
