"""Precision by what the CPU has (core/cpu_features.py, core.modeling.resolve_precision) and the fp32/bf16 answer count."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import core.modeling as modeling
from core import cpu_features
from core.cli import UserError
from core.cpu_features import CpuPrecision, choose_cpu_precision, cpu_bf16_feature, cpu_flags, matmul_gflops

CPU = torch.device("cpu")


def _cpuinfo(tmp_path, text: str):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return path


def test_the_flags_line_of_an_x86_cpuinfo_names_the_bf16_feature(tmp_path):
    zen4 = _cpuinfo(tmp_path, "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 sha_ni\n\nprocessor\t: 1\n")
    assert cpu_bf16_feature(cpu_flags(zen4)) == "AVX512_BF16"
    sapphire = frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    assert cpu_bf16_feature(sapphire) == "AMX-BF16"  # the faster of the two is named
    zen3 = _cpuinfo(tmp_path, "flags\t\t: fpu avx2 avx512f\n")
    assert cpu_bf16_feature(cpu_flags(zen3)) is None


def test_arm_and_missing_cpuinfo_make_no_bf16_claim(tmp_path):
    arm = _cpuinfo(tmp_path, "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert cpu_flags(arm) == frozenset() and cpu_bf16_feature(cpu_flags(arm)) is None
    assert cpu_flags(tmp_path / "absent") == frozenset()


def test_auto_takes_bf16_only_where_it_measures_faster():
    rates = {"fp32": 166.0, "bf16": 408.0}
    faster = choose_cpu_precision("AVX512_BF16", measure=lambda dtypes: {name: rates[name] for name in dtypes})
    assert faster.precision == "bf16"
    assert faster.line() == "precision: bf16 (auto: CPU has AVX512_BF16; matmul 408 vs 166 GFLOP/s fp32)"
    slower = choose_cpu_precision("AVX512_BF16", measure=lambda dtypes: {name: 500.0 - rates[name] for name in dtypes})
    assert slower.precision == "fp32" and "matmul 92 vs 334 GFLOP/s fp32" in slower.line()


def test_without_the_feature_auto_is_fp32_and_nothing_is_measured():
    def never(dtypes):
        raise AssertionError("measured on a CPU without bf16 instructions")

    choice = choose_cpu_precision(None, measure=never)
    assert choice.precision == "fp32"
    assert choice.line() == "precision: fp32 (auto: CPU has no AMX-BF16 or AVX512_BF16)"


def test_the_probe_matmul_measures_each_dtype_in_turn():
    rates = matmul_gflops({"fp32": torch.float32, "bf16": torch.bfloat16}, shape=(64, 32, 48), rounds=2)
    assert set(rates) == {"fp32", "bf16"} and all(rate > 0 for rate in rates.values())


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(modeling, "cpu_bf16_feature", lambda: None)


@pytest.fixture
def auto_choice(monkeypatch):
    """auto's choice on this 'CPU' fixed to bf16 with made-up rates; the process-wide cache emptied around it."""
    choice = CpuPrecision("bf16", "AVX512_BF16", {"fp32": 100.0, "bf16": 250.0})
    monkeypatch.setattr(modeling, "auto_cpu_precision", lambda: choice)
    modeling._auto_on_cpu.cache_clear()
    yield choice
    modeling._auto_on_cpu.cache_clear()


def test_bf16_on_a_cpu_without_it_is_a_one_line_error_naming_the_fix(cpu_without_bf16):
    with pytest.raises(UserError) as raised:
        modeling.resolve_precision("bf16", CPU)
    message = str(raised.value)
    assert "\n" not in message and "AVX512_BF16" in message and "--precision fp32" in message
    assert modeling.resolve_precision("fp32", CPU) == "fp32"  # an explicit fp32 is always fine


def test_bf16_on_a_cpu_with_it_is_taken_as_given(monkeypatch):
    monkeypatch.setattr(modeling, "cpu_bf16_feature", lambda: "AVX512_BF16")
    assert modeling.resolve_precision("bf16", CPU) == "bf16"
    assert modeling.precision_reason("bf16", CPU) == "given"


def test_auto_on_the_cpu_says_its_choice_once(auto_choice, capsys):
    assert modeling.resolve_precision("auto", CPU) == "bf16"
    assert modeling.resolve_precision("auto", CPU) == "bf16"  # a second stage or engine: no second line
    assert capsys.readouterr().out.splitlines() == [auto_choice.line()]
    assert modeling.precision_reason("auto", CPU) == "auto: CPU has AVX512_BF16; matmul 250 vs 100 GFLOP/s fp32"


def test_the_cpu_and_mac_trainers_default_to_auto_and_a_flag_overrides():
    from sft.sft_config import parse_sft_config

    assert parse_sft_config([], preset="mac").precision == "auto"
    assert parse_sft_config(["--precision", "fp32"], preset="mac").precision == "fp32"


def test_the_device_plan_records_why(auto_choice, capsys):
    from core.training import plan_mac, run_facts

    config = SimpleNamespace(precision="auto", load_in_4bit=False)
    plan = plan_mac(config, "python -m sft.train_sft_cuda")
    if plan.device.type != "cpu":
        pytest.skip("MPS present: auto is fp32 there")
    assert (plan.precision, plan.precision_reason) == ("bf16", auto_choice.reason())
    trainer = SimpleNamespace(memory=SimpleNamespace(report=dict), args=SimpleNamespace(world_size=1))
    facts = run_facts(trainer, plan, resumed_from=None, session_seconds=1.0)
    assert facts["precision"] == "bf16" and facts["precision_reason"] == auto_choice.reason()


def test_sft_with_bf16_on_a_cpu_without_it_writes_nothing(cpu_without_bf16, tmp_path, tiny_llama_dir, sft_data):
    from sft.train_sft_mac import main

    out = tmp_path / "out"
    with pytest.raises(UserError, match="AVX512_BF16.*--precision fp32"):
        main([f"--model_name_or_path={tiny_llama_dir}", f"--train_file={sft_data[0]}", f"--val_file={sft_data[1]}",
              f"--output_dir={out}", "--precision=bf16", "--max_steps=1", "--report_to=none"])
    assert not out.exists()


# --------------------------------------------------------------------------- answers in fp32 and bf16, counted


def _answers(*token_lists):
    return [SimpleNamespace(token_ids=tokens) for tokens in token_lists]


def test_agreement_counts_identical_answers_and_where_the_others_part():
    from bench.precision_agreement import agreement

    fp32 = _answers([1, 2, 3], [4, 5, 6], [7, 8], [9])
    bf16 = _answers([1, 2, 3], [4, 9, 6], [7, 8, 0], [9])
    assert agreement(fp32, bf16) == {"identical": 2, "total": 4, "differing": [1, 2], "parted_after_tokens": [1, 2]}
    with pytest.raises(ValueError):
        agreement(fp32, bf16[:3])


def test_the_bench_generates_both_precisions_on_the_tiny_model(tiny_llama_dir, capsys):
    from bench import precision_agreement as bench

    args = bench.parse_args(["--model", str(tiny_llama_dir), "--template", "alpaca", "--max_new_tokens", "6",
                             "--engine", "hf", "--batch_size", "2"])
    result = bench.compare(args)
    runs = result["runs"]
    assert result["total"] == len(bench.FALLBACK_PROMPTS) == len(runs["fp32"]["answers"]) == len(runs["bf16"]["answers"])
    same = sum(list(a.token_ids) == list(b.token_ids) for a, b in zip(runs["fp32"]["answers"], runs["bf16"]["answers"]))
    assert result["identical"] == same and len(result["differing"]) == result["total"] - same
    assert all(run["tokens"] > 0 and run["tokens_per_s"] > 0 for run in runs.values())


def test_the_process_wide_choice_is_measured_once(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_features, "cpu_bf16_feature", lambda: calls.append(1) or None)
    cpu_features.auto_cpu_precision.cache_clear()
    try:
        assert cpu_features.auto_cpu_precision() is cpu_features.auto_cpu_precision()
        assert calls == [1]
    finally:
        cpu_features.auto_cpu_precision.cache_clear()


class _RecordingPool:
    """core.engines.EnginePool's shape: records the dtype it was opened with; samples nothing."""
    opened: list = []

    def __init__(self, choice, *, dtype=None, **_):
        self.choice = choice
        _RecordingPool.opened.append(dtype)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def engine_for(self, weights):
        return SimpleNamespace(generate=lambda prompts, **_: ["sample"] * len(prompts))


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("auto", torch.bfloat16)])
def test_pairs_are_sampled_in_the_precision_evaluation_uses(monkeypatch, auto_choice, precision, dtype):
    """scripts/prepare_dpo_data.py --from_sft_model samples with --precision (auto: bf16 where evaluation takes it)."""
    import core.engines
    from core.engines import EngineChoice
    from scripts import prepare_dpo_data, sft_sampling

    monkeypatch.setattr(core.engines, "EnginePool", _RecordingPool)
    _RecordingPool.opened = []
    args = prepare_dpo_data.parse_args(["--from_sft_model", "sft", "--out_dir", "out", "--precision", precision])
    run = SimpleNamespace(base_model="base", run_dir="sft", trust_remote_code=False)
    samples, _ = sft_sampling.sample_from_run(args, run, EngineChoice("hf", "hf", "given"), None, [[1, 2]], [0], "test")
    assert samples == ["sample"] and _RecordingPool.opened == [dtype]


def test_pair_sampling_in_bf16_on_a_cpu_without_it_is_the_one_line_error(monkeypatch, cpu_without_bf16):
    from core.engines import EngineChoice
    from scripts import prepare_dpo_data, sft_sampling

    args = prepare_dpo_data.parse_args(["--from_sft_model", "sft", "--out_dir", "out", "--precision", "bf16"])
    run = SimpleNamespace(base_model="base", run_dir="sft", trust_remote_code=False)
    with pytest.raises(UserError, match="--precision fp32"):
        sft_sampling.sample_from_run(args, run, EngineChoice("hf", "hf", "given"), None, [[1, 2]], [0], "test")
