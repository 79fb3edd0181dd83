"""Smoke tests for the benchmark scripts (bench/): each runs end to end at minimal size.

They keep the scripts from rotting as the code they measure changes; they assert what a run must
produce (results file, token accounting), never how fast anything is.
"""
from __future__ import annotations

import json

import pytest

import tiny_assets
from bench import bench_generate, bench_prepare, bench_train, profile_step


def _alpaca_records(repeat: int) -> list[dict]:
    return [{"instruction": f"{instruction} ({r})", "input": inp, "output": out}
            for r in range(repeat) for instruction, inp, out in tiny_assets.INSTRUCTIONS]


@pytest.mark.slow
def test_bench_prepare_times_the_prepare_script(tmp_path):
    alpaca = tmp_path / "alpaca_data.json"
    code = tmp_path / "code_alpaca_tiny.json"
    alpaca.write_text(json.dumps(_alpaca_records(2)))
    code.write_text(json.dumps(_alpaca_records(1)[:5] + [{"instruction": "Print hi.", "input": "<noinput>", "output": "print('hi')"}]))

    assert bench_prepare.main(["--alpaca", str(alpaca), "--code", str(code), "--repeats", "1",
                               "--code_records", "10", "--results_dir", str(tmp_path / "results")]) == 0

    payload = json.loads((tmp_path / "results" / "prepare.json").read_text())
    real, extended = payload["runs"]["real files"], payload["runs"]["code extended to 10"]
    assert real["records_read"] == 24 + 6
    assert extended["records_read"] == 24 + 10
    # The code file's first 5 records repeat Alpaca ones, so they are dropped as duplicates;
    # the numbered copies in the extended file are new prompts and are kept.
    assert real["records_kept"] == 24 + 1
    assert extended["records_kept"] > real["records_kept"]
    assert real["wall_s_median"] > 0 and real["peak_rss_mb_max"] > 0


@pytest.mark.slow
def test_bench_train_runs_every_configuration(tmp_path, tiny_llama_dir, sft_data):
    train_file, _ = sft_data
    argv = ["--model", str(tiny_llama_dir), "--data", str(train_file), "--steps", "2", "--batch_size", "2",
            "--repeats", "1", "--max_seq_length", "128", "--results_dir", str(tmp_path / "results")]

    assert bench_train.main(argv) == 0

    payload = json.loads((tmp_path / "results" / "train.json").read_text())
    summary = payload["summary"]
    assert set(summary) == set(bench_train.DEFAULT_CONFIGS["cpu"])
    for row in summary.values():
        assert row["useful_tokens"] > 0 and row["train_s"] > 0 and row["peak_rss_mb"] > 0
    # Ours and the original recipe tokenize identically: same real tokens, different padding.
    assert summary["ours"]["useful_tokens"] == summary["original"]["useful_tokens"]
    assert summary["original"]["processed_tokens"] == 2 * 2 * 128  # every row padded to max_seq_length
    assert summary["ours"]["padding_efficiency"] > summary["original"]["padding_efficiency"]
    # The original recipe trains on prompt tokens too, ours on the response (+ EOS) only.
    assert summary["original"]["supervised_tokens"] > summary["ours"]["supervised_tokens"]
    assert summary["trl_default"]["settings"]["gradient_checkpointing"] is True
    assert summary["trl_best"]["settings"]["gradient_checkpointing"] is False
    assert summary["trl_best"]["settings"]["sampling"] == "group_by_length"
    assert summary["trl_best_bf16"]["settings"]["precision"] == "bf16"
    assert "ours is x faster" in payload["table"]
    # Packed rows carry no padding at all.
    assert summary["ours_packed"]["settings"]["sampling"] == "packed"
    assert summary["ours_packed"]["padding_efficiency"] == 1.0


@pytest.mark.slow
def test_bench_train_warmup_is_outside_the_clock_and_ceiling_row(tmp_path, tiny_llama_dir, sft_data):
    train_file, _ = sft_data
    argv = ["--model", str(tiny_llama_dir), "--data", str(train_file), "--steps", "2", "--warmup_steps", "1",
            "--batch_size", "2", "--repeats", "1", "--max_seq_length", "128", "--configs", "ours", "ceiling",
            "trl_padding_free", "--skip_full_data_padding", "--results_dir", str(tmp_path / "results")]

    assert bench_train.main(argv) == 0

    payload = json.loads((tmp_path / "results" / "train.json").read_text())
    runs, summary = payload["runs"], payload["summary"]
    assert runs["ours"][0]["forwards"] == 2 and runs["ceiling"][0]["timed_steps"] == 2  # the warm-up step is not counted
    assert runs["trl_padding_free"][0]["forwards"] == 2
    assert summary["trl_padding_free"]["settings"]["padding_free"] is True
    assert summary["ceiling"]["ceiling_share"] == 1.0 and summary["ours"]["ceiling_share"] > 0
    assert summary["ours"]["mfu"] is None  # no peak FLOP/s is known for a CPU
    assert "share of ceiling" in payload["table"]


@pytest.mark.slow
def test_profile_step_puts_ours_beside_the_ceiling(tmp_path, tiny_llama_dir, sft_data, capsys):
    train_file, _ = sft_data
    args = profile_step.parse_args(["--model", str(tiny_llama_dir), "--data", str(train_file), "--batch_size", "2",
                                    "--skip", "1", "--steps", "2", "--max_seq_length", "128"])

    result, _ = profile_step.profile(args, tmp_path)
    profile_step.report(result, args)

    ceiling = result["ceiling"]
    assert result["step_ms"] > 0 and ceiling["step_ms"] > 0
    assert result["aten_calls"] > 0 and ceiling["aten_calls"] > 0
    assert ceiling["syncs_per_step"]["aten::nonzero"] == 0  # the plain loop indexes nothing by mask
    extra = {name for name, _, _ in profile_step.extra_calls(result, ceiling, top=100)}
    assert "aten::nonzero" in extra or result["syncs_per_step"]["aten::nonzero"] == 0
    out = capsys.readouterr().out
    assert "ours against the ceiling loop" in out and "operators ours calls more often" in out


@pytest.mark.slow
def test_bench_generate_compares_batched_with_one_at_a_time(tmp_path, tiny_llama_dir, sft_data):
    train_file, _ = sft_data
    argv = ["--model", str(tiny_llama_dir), "--data", str(train_file), "--num_prompts", "4", "--batch_sizes", "4",
            "--max_new_tokens", "3", "--repeats", "1", "--results_dir", str(tmp_path / "results")]

    assert bench_generate.main(argv) == 0

    results = json.loads((tmp_path / "results" / "generate.json").read_text())["results"]
    assert set(results) == {"1", "4"}  # one at a time is always measured, as the reference
    assert results["4"]["generated_tokens"] > 0
    assert results["4"]["same_as_one_at_a_time"] == 4  # greedy batching changes no token
    assert results["1"]["speedup"] == pytest.approx(1.0)
    ceilings = json.loads((tmp_path / "results" / "generate.json").read_text())["matmul_ceilings"]
    assert set(ceilings) == {"1", "4"} and all(c["step_seconds"] > 0 for c in ceilings.values())
    assert 0 < results["4"]["share_of_ceiling"] == pytest.approx(results["4"]["tokens_per_s"] / ceilings["4"]["tokens_per_s"])


def test_the_decode_ceiling_counts_the_models_own_layers_not_the_adapters(tiny_llama_dir):
    """Every projection of every layer and the LM head, once each; a LoRA adapter's A/B layers are not the model's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bench.decode_ceiling import decode_ceiling, linear_shapes

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    config = model.config
    plain = linear_shapes(model)
    assert sum(plain.values()) == 7 * config.num_hidden_layers + 1  # q k v o gate up down, and the LM head
    assert plain[(config.hidden_size, config.vocab_size)] == 1
    with_adapter = linear_shapes(get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")))
    assert with_adapter == plain
    ceiling = decode_ceiling(plain, 4, repeats=2)
    assert ceiling["tokens_per_s"] == pytest.approx(4 / ceiling["step_seconds"])


def test_bench_train_rejects_bad_sizes():
    from core.cli import UserError

    with pytest.raises(UserError, match="--steps must be >= 1"):
        bench_train.main(["--steps", "0"])
    with pytest.raises(UserError, match="needs --device cuda"):
        bench_train.main(["--load_in_4bit"])
    with pytest.raises(UserError, match="--warmup_steps must be >= 0"):
        bench_train.main(["--warmup_steps", "-1"])
    args = bench_train.parse_args([])
    assert (args.steps, args.warmup_steps) == (8, 0)  # the CPU tables' settings
    assert bench_train.DEFAULT_STEPS["cuda"] >= 40 and bench_train.DEFAULT_WARMUP["cuda"] > 0
    assert {"ceiling", "ours_packed", "trl_padding_free", "trl_packed"} <= set(bench_train.DEFAULT_CONFIGS["cuda"])


def test_bench_startup_times_help_and_a_misspelled_flag(tmp_path, capsys):
    from bench import bench_startup

    assert bench_startup.main(["--repeats", "1", "--only", "evaluation.charts", "scripts/run_study.py",
                               "--results_dir", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "startup.json").read_text())
    assert set(payload["median_wall_s"]) == {f"{entry} {case} (this)" for entry in ("evaluation.charts", "scripts/run_study.py")
                                             for case in ("--help", "--max_step 3")}
    assert all(seconds > 0 for seconds in payload["median_wall_s"].values())
    assert "| entry point" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_threads_runs_guarded_fixed_and_contended(tmp_path, tiny_llama_dir, sft_data):
    from bench import bench_threads

    assert bench_threads.main(["--model", str(tiny_llama_dir), "--data", str(sft_data[0]), "--steps", "1",
                               "--batch_size", "1", "--repeats", "1", "--results_dir", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "threads.json").read_text())
    assert [r["run"] for r in payload["runs"]] == ["warm-up (the previous stage)", "guarded 1",
                                                   f"OMP_NUM_THREADS={payload['cores']} 1", "guarded beside a busy loop"]
    assert all(r["tokens_per_s"] > 0 for r in payload["runs"]) and payload["ratio"] > 0
    assert payload["runs"][2]["note"] is None  # OMP_NUM_THREADS set: never a note
