"""RLOO on a tiny Llama: SFT run -> reward model (init sft) -> RLOO -> four-column-style evaluation.

Real code paths only: SFT through ``sft.train_sft_mac``, the reward model through
``rlhf.train_reward_mac``, RLOO through TRL's RLOOTrainer via ``rlhf.train_rloo_mac``. The tiny
Llama is built with a larger init range so its next-token distributions are peaked enough for a
few RL steps to move them.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

import tiny_assets
from core.cli import UserError
from core.runs import read_run
from rlhf import rloo_training, train_reward_mac, train_rloo_mac
from rlhf.monitor_record import read_passes

BAD = "no no no no no no no no"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rloo")


@pytest.fixture(scope="module")
def peaked_llama(workdir, sp_tokenizer_dir) -> Path:
    return tiny_assets.build_tiny_llama(workdir / "llama", sp_tokenizer_dir, initializer_range=0.3)


@pytest.fixture(scope="module")
def sft_run(workdir, peaked_llama) -> Path:
    from sft.train_sft_mac import main as train_sft

    data = workdir / "data"
    train = tiny_assets.write_jsonl(data / "sft_train.jsonl", tiny_assets.sft_rows(repeat=2))
    val = tiny_assets.write_jsonl(data / "sft_val.jsonl", tiny_assets.sft_rows(repeat=1)[:4])
    out = workdir / "sft_output"
    train_sft(["--model_name_or_path", str(peaked_llama), "--train_file", str(train), "--val_file", str(val),
               "--output_dir", str(out), "--max_steps", "2", "--learning_rate", "1e-3", "--per_device_train_batch_size", "6",
               "--gradient_accumulation_steps", "1", "--lora_r", "4", "--lora_alpha", "8", "--report_to", "none",
               "--eval_steps", "100", "--save_steps", "100", "--logging_steps", "1", "--precision", "fp32"])
    return out


@pytest.fixture(scope="module")
def reward_run(workdir, sft_run) -> Path:
    rows = tiny_assets.sft_rows(repeat=1)
    pairs = [{"instruction": r["instruction"], "input": r["input"], "chosen": r["output"], "rejected": BAD} for r in rows]
    train = tiny_assets.write_jsonl(workdir / "data" / "prefs_train.jsonl", pairs[:8])
    val = tiny_assets.write_jsonl(workdir / "data" / "prefs_val.jsonl", pairs[8:])
    out = workdir / "reward_output"
    with tiny_assets.recorded_stdout(workdir / "reward.log"):
        train_reward_mac.main(["--sft_adapter_dir", str(sft_run), "--train_file", str(train), "--val_file", str(val),
                               "--output_dir", str(out), "--max_steps", "4", "--learning_rate", "1e-2",
                               "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "3",
                               "--gradient_accumulation_steps", "1", "--eval_steps", "4", "--save_steps", "4",
                               "--logging_steps", "2", "--report_to", "none", "--precision", "fp32"])
    return out


def rloo_args(sft_run: Path, reward_run: Path, out: Path, *extra: str) -> list[str]:
    return ["--sft_adapter_dir", str(sft_run), "--reward_model_dir", str(reward_run), "--output_dir", str(out),
            "--num_generations", "4", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
            "--gradient_accumulation_steps", "1", "--max_new_tokens", "8", "--learning_rate", "1e-2",
            "--monitor_prompts", "2", "--eval_steps", "2", "--save_steps", "2", "--report_to", "none", "--precision", "fp32",
            *extra]


def log_values(run_dir: Path, key: str) -> list[float]:
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    return [entry[key] for entry in history if key in entry]


@pytest.fixture(scope="module")
def rloo_run(workdir, sft_run, reward_run) -> Path:
    out = workdir / "rloo_output"
    with tiny_assets.recorded_stdout(workdir / "rloo.log"):
        train_rloo_mac.main(rloo_args(sft_run, reward_run, out, "--max_steps", "2", "--missing_eos_penalty", "0.5",
                                      "--logging_steps", "1"))
    return out


# --------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_rloo_raises_the_mean_reward_of_a_toy_reward(workdir, sft_run, reward_run, peaked_llama, monkeypatch):
    from transformers import AutoModelForCausalLM

    head = AutoModelForCausalLM.from_pretrained(peaked_llama).lm_head.weight.detach()
    projection = head @ head[5]
    liked = set((projection > projection.median()).nonzero().flatten().tolist())  # half the vocabulary, one direction

    def toy_reward(prompts, completions, completion_ids, **kwargs):
        return [sum(i in liked for i in ids) / max(len(ids), 1) for ids in completion_ids]

    monkeypatch.setattr(rloo_training, "reward_functions", lambda *args, **kwargs: [toy_reward])
    out = workdir / "rloo_toy"
    train_rloo_mac.main(rloo_args(sft_run, reward_run, out, "--max_steps", "8", "--learning_rate", "1e-1", "--beta", "0",
                                  "--per_device_train_batch_size", "16", "--monitor_prompts", "0"))
    rewards = log_values(out, "reward")
    assert len(rewards) == 8
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.15, rewards


@pytest.mark.slow
def test_reward_model_counts_held_out_pairs_and_logs_short_lines(reward_run, workdir):
    metrics = json.loads((reward_run / "metrics.json").read_text())
    assert metrics["val_pairs"] == 4  # in batches of 3 and 1
    for when in ("before", "after"):
        assert metrics[f"val_accuracy_{when}"] == metrics[f"val_pairs_correct_{when}"] / 4
    lines = tiny_assets.log_lines(workdir / "reward.log")
    assert lines and not [line for line in lines if line.startswith("{")]  # not TRL's dict of numbers as strings
    held_out = [line for line in lines if " held-out: " in line]
    assert len(held_out) == 2 and all(re.search(r"accuracy \d/4 = \d\.\d{3}", line) for line in held_out), held_out
    assert all(len(line) < 200 and "min_reward" not in line for line in lines if "trainer finished" not in line), lines


@pytest.mark.slow
def test_rloo_log_lines_are_short_and_name_a_few_metrics(rloo_run, workdir):
    lines = [line for line in tiny_assets.log_lines(workdir / "rloo.log") if "trainer finished" not in line]
    assert len(lines) >= 4 and not [line for line in lines if line.startswith("{")]  # 2 steps, 2 held-out evaluations
    for line in lines:
        assert len(line) < 200 and "clip_ratio" not in line and "reward_std" not in line, line
        assert "reward " in line and "KL " in line and "stop rate " in line, line


@pytest.mark.slow
def test_rloo_logs_from_step_0_and_saves_an_adapter_column(rloo_run, sft_run, reward_run):
    for key in ("eval_reward", "eval_kl", "eval_completions/mean_length", "eval_completions/stop_rate"):
        assert log_values(rloo_run, key), key
    history = json.loads((rloo_run / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "eval_reward" in e][0] == 0
    assert log_values(rloo_run, "eval_kl")[0] == 0.0  # the reference is the starting policy
    assert log_values(rloo_run, "rewards/missing_eos_penalty/mean")
    run = read_run(rloo_run)
    assert run.stage == "rloo" and run.template == read_run(sft_run).template and run.base_model == read_run(sft_run).base_model
    adapter = json.loads((rloo_run / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == json.loads((sft_run / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert not (rloo_run / "ref").exists()  # only the policy adapter is saved
    metrics = json.loads((rloo_run / "metrics.json").read_text())
    assert metrics["prompts"]["monitor"] == 2 and metrics["prompts"]["duplicates"] == 12
    passes, unreadable = read_passes(rloo_run)  # per prompt, for the monitor's paired tests: the reward model's score
    assert [p["step"] for p in passes] == [0, 2] and unreadable == 0
    assert all(len(p["prompts"]) == 2 and p["weights"] == {"reward_model": 1.0} for p in passes)
    assert all(row["completions"] == 4 and "reward_model" in row and "pass" not in row for p in passes for row in p["prompts"])
    assert (rloo_run / "rloo_curves.png").is_file()
    phases = metrics["phases"]  # core/phases.py: a rollout's sampling, reward and reference forwards each apart
    assert {"training_compute", "generation_decode", "reward_forwards", "reference_forwards", "evaluation"} <= set(phases["seconds"])
    assert sum(phases["seconds"].values()) == pytest.approx(phases["wall_seconds"], abs=0.01)


@pytest.mark.slow
def test_reward_init_sft_starts_from_the_sft_adapter(sft_run):
    from safetensors.torch import load_file

    from rlhf.reward_model import attach_reward_lora, load_classifier_base

    base = load_classifier_base(read_run(sft_run).base_model, dtype=torch.float32)
    model = attach_reward_lora(base, sft_dir=sft_run, r=1, alpha=1, dropout=0.0, target_modules=["q_proj"], seed=0)
    sft = load_file(sft_run / "adapter_model.safetensors")
    params = dict(model.named_parameters())
    for key, value in sft.items():
        assert torch.equal(params[key.replace(".weight", ".default.weight")], value), key
    assert params["base_model.model.score.modules_to_save.default.weight"].requires_grad


class StopAtStep2(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 2:
            control.should_training_stop = True  # as if killed right after the step-2 checkpoint


def straight_and_resumed(args_for, straight: Path, interrupted: Path, *common: str) -> tuple[dict, dict]:
    """The adapters of a run trained straight through and of one stopped after step 2's checkpoint, then resumed."""
    from safetensors.torch import load_file

    train_rloo_mac.main(args_for(straight, *common))
    rloo_training.run_rloo(args_for(interrupted, *common), preset="mac", plan_model=train_rloo_mac.plan_mac,
                           prog="test", description="", callbacks=[StopAtStep2()])
    train_rloo_mac.main(args_for(interrupted, *common, "--resume"))
    return load_file(straight / "adapter_model.safetensors"), load_file(interrupted / "adapter_model.safetensors")


@pytest.mark.slow
def test_resume_after_interruption_ends_with_the_same_adapter(workdir, sft_run, reward_run):
    straight, interrupted = workdir / "rloo_straight", workdir / "rloo_interrupted"
    common = ("--max_steps", "4", "--eval_steps", "1")  # monitoring at every step must not shift the sampling
    a, b = straight_and_resumed(lambda out, *flags: rloo_args(sft_run, reward_run, out, *flags), straight, interrupted,
                                *common)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert log_values(straight, "reward")[2:] == pytest.approx(log_values(interrupted, "reward")[-2:])
    assert json.loads((interrupted / "metrics.json").read_text())["resumed_from"] == "checkpoint-2"


@pytest.mark.slow
def test_one_policy_forward_per_batch_trains_and_scores_as_two(workdir, sft_run, reward_run, monkeypatch):
    """The scoring forward reused by the loss (rlhf/policy_forward.py) gives TRL's own two-forward run: same
    rewards, KL and entropy, step by step and on the monitoring prompts, and the same adapter."""
    from safetensors.torch import load_file

    from rlhf.policy_forward import PolicyForwardReuse

    counts = []
    original = PolicyForwardReuse.take

    def counted_take(self, *args):
        kept = original(self, *args)
        counts.append(kept is not None)
        return kept

    monkeypatch.setattr(PolicyForwardReuse, "take", counted_take)
    common = ("--max_steps", "2", "--eval_steps", "1", "--logging_steps", "1")
    shared, separate = workdir / "rloo_one_forward", workdir / "rloo_two_forwards"
    train_rloo_mac.main(rloo_args(sft_run, reward_run, shared, *common))
    reused = sum(counts)
    monkeypatch.setattr(PolicyForwardReuse, "for_trainer", staticmethod(lambda trainer: None))
    train_rloo_mac.main(rloo_args(sft_run, reward_run, separate, *common))
    assert reused == 2 + 3 and len(counts) == reused  # every training step and monitoring pass (before, steps 1, 2)
    for key in ("reward", "kl", "entropy", "eval_reward", "eval_kl", "eval_entropy"):
        assert log_values(shared, key) == pytest.approx(log_values(separate, key), rel=1e-5, abs=1e-6), key
    a, b = load_file(shared / "adapter_model.safetensors"), load_file(separate / "adapter_model.safetensors")
    start = load_file(sft_run / "adapter_model.safetensors")
    # TRL's second forward gives log_ratio 0 up to rounding, not exactly 0: the adapters agree to rounding (~1e-6
    # measured), far below how far two steps at lr 1e-2 moved them from the SFT adapter (~2e-2)
    moved = min(float((a[k] - start[k]).abs().max()) for k in a)
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3 * moved


# --------------------------------------------------------------------------- errors and evaluation


@pytest.mark.slow
def test_reward_model_problems_and_empty_prompts_are_one_line_errors(workdir, sft_run, reward_run, tiny_llama_dir,
                                                                     bytelevel_tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="no reward model") as error:
        train_rloo_mac.main(rloo_args(sft_run, tmp_path / "missing", out))
    assert "\n" not in str(error.value)
    other_base = tmp_path / "reward_other_base"
    shutil.copytree(reward_run, other_base)
    payload = json.loads((other_base / "reward_config.json").read_text())
    payload["base_model"] = str(tiny_llama_dir)
    (other_base / "reward_config.json").write_text(json.dumps(payload))
    with pytest.raises(UserError, match="was trained on .* but the policy is"):
        train_rloo_mac.main(rloo_args(sft_run, other_base, out))
    other_tokenizer = tmp_path / "reward_other_tokenizer"
    shutil.copytree(reward_run, other_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        (other_tokenizer / name).unlink(missing_ok=True)
    for path in bytelevel_tokenizer_dir.iterdir():
        shutil.copy(path, other_tokenizer / path.name)
    with pytest.raises(UserError, match="uses another tokenizer"):
        train_rloo_mac.main(rloo_args(sft_run, other_tokenizer, out))
    empty = tmp_path / "prompts.txt"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(UserError, match="holds no prompts"):
        train_rloo_mac.main(rloo_args(sft_run, reward_run, out, "--prompt_file", str(empty)))
    assert not out.exists()


@pytest.mark.slow
def test_eval_shows_the_rloo_column_with_reward_model_scores(rloo_run, sft_run, reward_run, workdir):
    from evaluation.run import main as evaluate

    out = workdir / "eval"
    evaluate(["--adapter_dir", str(sft_run), str(rloo_run), "--reward_model", str(reward_run), "--num_examples", "2",
              "--builtin_prompts", "false", "--max_new_tokens", "6", "--prefs_file", "none", "--out_dir", str(out)])
    models = json.loads((out / "metrics.json").read_text())["models"]
    assert list(models) == ["base", "sft", "rloo"]
    assert all(isinstance(values["reward_model_mean"], float) for values in models.values())
    report = (out / "report.md").read_text()
    assert "| reward (RM) |" in report.split("## Settings")[0]  # a row of the study table, not only the column list


# --------------------------------------------------------------------------- RL with verifiable rewards (--reward checker)

IF_TYPES = [("punctuation:no_comma", {}, "Do not use any commas."),
            ("change_case:english_lowercase", {}, "Answer in lowercase letters only."),
            ("keywords:existence", {"keywords": ["sky"]}, "Include the keywords sky in the response.")]


def if_rows(offset: int, count: int) -> list[dict]:
    """Release-format rows with one or two constraints each, as scripts/prepare_if_prompts.py writes them."""
    rows = []
    for i in range(count):
        instruction = tiny_assets.INSTRUCTIONS[(offset + i) % len(tiny_assets.INSTRUCTIONS)][0]
        chosen = [IF_TYPES[(offset + i) % 3]] + ([IF_TYPES[(offset + i + 1) % 3]] if i % 2 else [])
        prompt = instruction + "\n\n" + " ".join(text for _, _, text in chosen)
        rows.append({"key": offset + i, "prompt": prompt, "instruction_id_list": [t for t, _, _ in chosen],
                     "kwargs": [k for _, k, _ in chosen], "instruction": prompt, "input": "", "source": "test"})
    return rows


@pytest.fixture(scope="module")
def if_files(workdir) -> dict[str, Path]:
    data = workdir / "if"
    return {"train": tiny_assets.write_jsonl(data / "if_train.jsonl", if_rows(0, 12)),
            "seen": tiny_assets.write_jsonl(data / "if_val_seen.jsonl", if_rows(20, 3)),
            "heldout": tiny_assets.write_jsonl(data / "if_val_heldout.jsonl", if_rows(40, 2))}


def rlvr_args(sft_run: Path, if_files: dict, out: Path, *extra: str) -> list[str]:
    """--reward checker; the reward model dir does not exist: RLVR must not read it."""
    return rloo_args(sft_run, out.parent / "no_reward_model_here", out, "--reward", "checker", "--prompt_file",
                     str(if_files["train"]), "--monitor_files", str(if_files["seen"]), str(if_files["heldout"]),
                     "--monitor_prompts", "3", *extra)


@pytest.mark.slow
def test_rlvr_logs_pass_counts_per_monitoring_file_from_step_0(workdir, sft_run, if_files):
    out = workdir / "rlvr"
    with tiny_assets.recorded_stdout(workdir / "rlvr.log"):
        train_rloo_mac.main(rlvr_args(sft_run, if_files, out, "--max_steps", "2", "--beta", "0.5"))
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    for name, prompts in (("if_val_seen", 3), ("if_val_heldout", 2)):
        entries = [e for e in history if f"eval_{name}/pass_n" in e]
        assert [e["step"] for e in entries] == [0, 2], entries
        for e in entries:
            assert e[f"eval_{name}/pass_n"] == prompts * 4  # 4 completions per prompt
            assert 0 <= e[f"eval_{name}/pass_k"] <= e[f"eval_{name}/pass_n"]
            assert e[f"eval_{name}/followed_n"] >= e[f"eval_{name}/pass_n"]
    assert log_values(out, "rewards/checker/mean") and not log_values(out, "rewards/reward_model/mean")
    assert log_values(out, "eval_kl")[0] == 0.0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["monitor_sets"]) == {"if_val_seen", "if_val_heldout"}
    assert metrics["monitor_sets"]["if_val_seen"]["before"]["step"] == 0
    passes, _ = read_passes(out)  # per prompt: the checker's reward and pass share, matching the logged pass counts
    assert [p["step"] for p in passes] == [0, 2] and passes[0]["weights"] == {"checker": 1.0}
    for p, entry in zip(passes, [e for e in history if "eval_if_val_seen/pass_k" in e]):
        seen = [row for row in p["prompts"] if row["set"] == "if_val_seen"]
        assert len(seen) == 3 and sum(row["pass"] * row["completions"] for row in seen) == pytest.approx(entry["eval_if_val_seen/pass_k"])
    assert json.loads((out / "rloo_config.json").read_text())["reward_model_dir"] is None
    lines = tiny_assets.log_lines(workdir / "rlvr.log")
    assert any(re.search(r"seen pass \d+/12 = ", line) for line in lines), lines
    done = [line for line in (workdir / "rlvr.log").read_text().splitlines() if line.startswith("done:")]
    assert done and "heldout pass " in done[0] and " -> " in done[0], done


@pytest.mark.slow
def test_rlvr_resume_after_interruption_ends_with_the_same_adapter(workdir, sft_run, if_files):
    from safetensors.torch import load_file

    straight, interrupted = workdir / "rlvr_straight", workdir / "rlvr_interrupted"
    common = ("--max_steps", "4", "--eval_steps", "1", "--learning_rate", "1e-1")
    a, b = straight_and_resumed(lambda out, *flags: rlvr_args(sft_run, if_files, out, *flags), straight, interrupted,
                                *common)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert log_values(straight, "reward")[2:] == pytest.approx(log_values(interrupted, "reward")[-2:])
    key = "eval_if_val_seen/pass_k"
    assert log_values(straight, key)[2:] == log_values(interrupted, key)[-3:]  # steps 2 (before and after), 3, 4
    assert read_passes(straight)[0] == read_passes(interrupted)[0]  # per-prompt passes: steps 0-4, once each
    assert not all(torch.equal(a[k], load_file(sft_run / "adapter_model.safetensors")[k]) for k in a)  # it trained


@pytest.mark.slow
def test_rlvr_on_prompts_without_constraints_is_a_one_line_error(workdir, sft_run, if_files, tmp_path):
    out = tmp_path / "out"
    plain = tiny_assets.write_jsonl(tmp_path / "plain.jsonl", tiny_assets.sft_rows(repeat=1))
    with pytest.raises(UserError, match="has no prompt with constraints") as error:
        train_rloo_mac.main(rlvr_args(sft_run, if_files, out, "--prompt_file", str(plain)))
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="has no prompt with constraints"):  # the default prompts: the SFT run's
        train_rloo_mac.main(rloo_args(sft_run, tmp_path / "none", out, "--reward", "checker"))
    with pytest.raises(UserError, match="monitor_files.*|has no prompt with constraints"):
        train_rloo_mac.main(rlvr_args(sft_run, if_files, out, "--monitor_files", str(plain)))
    unknown = tiny_assets.write_jsonl(tmp_path / "unknown.jsonl", [{**if_rows(0, 1)[0], "instruction_id_list": ["made:up"]}])
    with pytest.raises(UserError, match="neither the IFEval nor the IFBench checkers know: made:up"):
        train_rloo_mac.main(rlvr_args(sft_run, if_files, out, "--prompt_file", str(unknown)))
    assert not out.exists()
