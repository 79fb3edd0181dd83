"""Every entry point answers ``--help`` and a misspelled flag before torch loads, with "did you mean";
and the start of a run says nothing that is not news (issue 18, items 4 and 6)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from core.cli import UserError, make_parser, near_miss_hint
from core.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
# What a user types after `python`: modules with -m, scripts by path.
ENTRY_POINTS = ["sft.train_sft_mac", "sft.train_sft_cuda", "sft.eval_sft", "dpo.train_dpo_mac", "dpo.train_dpo_cuda",
                "rlhf.train_reward_mac", "rlhf.train_reward_cuda", "rlhf.train_rloo_mac", "rlhf.train_rloo_cuda",
                "evaluation.score_if", "evaluation.charts", "scripts/prepare_sft_data.py", "scripts/prepare_dpo_data.py",
                "scripts/merge_adapter.py", "scripts/convert_gguf.py", "scripts/run_study.py",
                "scripts/publish_study.py"]
HEAVY = ("torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "accelerate")

# Runs each entry point as `python -m X --help` / `python X --help` would, in one interpreter, and
# lists the heavy libraries loaded after each (none is loaded by any: the list only grows).
_HELP_PROBE = """
import contextlib, io, json, runpy, sys
heavy = {heavy!r}
report = {{}}
for entry in {entries!r}:
    sys.argv = [entry, "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            if entry.endswith(".py"):
                runpy.run_path(entry, run_name="__main__")
            else:
                runpy.run_module(entry, run_name="__main__", alter_sys=True)
            code = None
        except SystemExit as exc:
            code = exc.code
    report[entry] = {{"code": code, "usage": "usage:" in out.getvalue(),
                      "heavy": [m for m in heavy if m in sys.modules]}}
print(json.dumps(report))
"""


def test_help_of_every_entry_point_loads_no_torch_transformers_or_peft():
    probe = _HELP_PROBE.format(heavy=HEAVY, entries=ENTRY_POINTS)
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True,
                          env={**_env(), "PYTHONPATH": str(REPO)})
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert {entry: r["heavy"] for entry, r in report.items()} == {entry: [] for entry in ENTRY_POINTS}
    assert {entry: (r["code"] in (0, None), r["usage"]) for entry, r in report.items()} == {
        entry: (True, True) for entry in ENTRY_POINTS}


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


# --------------------------------------------------------------------------- did you mean


def test_near_miss_hint_names_the_closest_flag_and_only_a_close_one():
    known = ["--max_steps", "--max_seq_length", "--output_dir", "--resume"]
    assert near_miss_hint(["--max_step", "3"], known) == " (did you mean --max_steps?)"
    assert near_miss_hint(["--output_dri=x"], known) == " (did you mean --output_dir?)"
    assert near_miss_hint(["--colour", "red"], known) == ""
    assert near_miss_hint(["3"], known) == ""


@pytest.mark.parametrize("module", ["sft.train_sft_mac", "dpo.train_dpo_cuda", "rlhf.train_reward_mac", "rlhf.train_rloo_cuda"])
def test_a_misspelled_key_of_a_training_stage_says_did_you_mean(module):
    import importlib

    main = importlib.import_module(module).main
    with pytest.raises(ConfigError, match=r"unknown config key\(s\): --max_step \(did you mean --max_steps\?\)"):
        main(["--max_step", "3"])


def test_the_argparse_scripts_say_did_you_mean_before_a_missing_required_flag(capsys):
    from scripts import merge_adapter, prepare_dpo_data, prepare_sft_data, run_study

    with pytest.raises(UserError, match=r"unrecognized arguments: --adapter_dri \(did you mean --adapter_dir\?\)"):
        merge_adapter.main(["--adapter_dri", "x", "--out_dir", "y"])
    for main, argv, hint in ((prepare_sft_data.main, ["--out_dri", "x"], "--out_dir"),
                             (prepare_dpo_data.main, ["--from_fle", "x.jsonl"], "--from_file"),  # --from_* is required
                             (run_study.main, ["--quick", "--resum"], "--resume")):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        assert f"(did you mean {hint}?)" in capsys.readouterr().err


def test_abbreviations_are_not_silently_expanded(capsys):
    parser = make_parser(prog="x")
    parser.add_argument("--max_steps", type=int)
    with pytest.raises(SystemExit):
        parser.parse_args(["--max_step", "3"])
    assert "did you mean --max_steps?" in capsys.readouterr().err
    assert parser.parse_args(["--max_steps", "3"]).max_steps == 3
    assert parser.parse_args(["--max_steps", "-1"]).max_steps == -1  # a negative value is not a flag


# --------------------------------------------------------------------------- quiet starts


def test_the_4bit_kernel_notice_is_filtered_because_it_comes_after_the_filters(tmp_path):
    """bitsandbytes logs "Failed to load CPU gemm_4bit_forward" at import on CPUs with AVX512-BF16.
    The filter (core/quiet.py) was installed by run_cli, after the entry module had already imported
    peft (and with it bitsandbytes). Emulated here: the notice is logged when bitsandbytes is imported."""
    probe = (
        "import logging, runpy, sys\n"
        "def emulate(event, args):\n"
        "    if event == 'import' and args[0] == 'bitsandbytes':\n"
        "        logging.getLogger('bitsandbytes.backends.cpu.ops').warning(\n"
        "            'Failed to load CPU gemm_4bit_forward from kernels-community: %s.', 'no kernels')\n"
        "sys.addaudithook(emulate)\n"
        f"sys.argv = ['sft.train_sft_mac', '--train_file', {str(tmp_path / 'missing.jsonl')!r}]\n"
        "runpy.run_module('sft.train_sft_mac', run_name='__main__', alter_sys=True)\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                          env={**_env(), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and "missing.jsonl" in done.stderr  # it got past the imports, to the data check
    assert "gemm_4bit_forward" not in done.stdout + done.stderr


def test_no_mps_line_on_linux_but_one_on_a_mac_without_mps(monkeypatch, capsys):
    import core.training
    from sft.sft_config import parse_sft_config

    config = parse_sft_config([])
    monkeypatch.setattr(core.training, "mps_available", lambda: False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert str(core.training.plan_mac(config, "x").device) == "cpu"
    assert "MPS" not in capsys.readouterr().out
    monkeypatch.setattr(sys, "platform", "darwin")
    core.training.plan_mac(config, "x")
    assert "MPS not available: training on CPU" in capsys.readouterr().out


def test_a_wrong_model_path_fails_before_the_config_is_printed(tmp_path, sft_data, capsys):
    from sft import train_sft_mac

    with pytest.raises(UserError, match="model path not found"):
        train_sft_mac.main([f"--model_name_or_path={tmp_path / 'no_model'}", f"--train_file={sft_data[0]}",
                            f"--val_file={sft_data[1]}", f"--output_dir={tmp_path / 'out'}"])
    assert "resolved SFT config" not in capsys.readouterr().out


def test_a_training_log_written_to_a_file_has_no_nested_bars(tmp_path, tiny_llama_dir, sft_data, capfd):
    """Under run_study (output to a pipe and logs/), the evaluation bar inside the training bar wrote
    cursor-up escapes (\\x1b[A) into the log at every evaluation."""
    from sft import train_sft_mac
    from test_first_hour import sft_argv

    train_sft_mac.main(sft_argv(tiny_llama_dir, sft_data, tmp_path / "out", max_steps=2, eval_steps=1, save_steps=2))
    printed = capfd.readouterr()
    assert "held-out" in printed.out + printed.err  # evaluations ran
    assert "\x1b[A" not in printed.out + printed.err


def test_a_gguf_base_saves_its_adapter_without_the_config_file_warning(tmp_path, tiny_llama_dir, sp_tokenizer_dir):
    pytest.importorskip("gguf")
    from core.modeling import attach_lora, load_base_model
    from core.quiet import quiet_third_party
    from test_modeling import write_llama_gguf

    gguf_file = write_llama_gguf(tiny_llama_dir, sp_tokenizer_dir / "tokenizer.model", tmp_path / "base.gguf")
    model = attach_lora(load_base_model(str(gguf_file)), r=4, alpha=8, dropout=0.0, target_modules=["q_proj"], seed=0)
    with warnings.catch_warnings(record=True) as shown:
        quiet_third_party()  # as run_cli does
        model.save_pretrained(tmp_path / "adapter")
        model.save_pretrained(tmp_path / "adapter2")
    assert [str(w.message) for w in shown if "config file" in str(w.message)] == []
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_library_deprecation_notices_stay_out_of_the_test_output():
    """pytest resets warning filters per test: without core/quiet.py's filters (tests/conftest.py)
    peft's use of transformers' deprecated is_gradient_checkpointing showed as 62 FutureWarnings."""
    with warnings.catch_warnings(record=True) as shown:  # records what the active filters let through
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                               "modeling_utils.py", 3303, module="transformers.modeling_utils")
        warnings.warn_explicit("our own notice", FutureWarning, "core/x.py", 1, module="core.x")
    assert [str(w.message) for w in shown] == ["our own notice"]  # ours still show


def test_the_quiet_filters_drop_only_the_named_notices_and_never_an_error(caplog):
    """core/quiet.py drops torch's Triton notice (importing vLLM's CPU build) and transformers' past-the-context
    reminder by their exact start; the same loggers' other messages, and errors, still show."""
    from core.quiet import quiet_third_party

    quiet_third_party()
    triton, reminder = logging.getLogger("torch._library.triton"), logging.getLogger("transformers.generation.stopping_criteria")
    with caplog.at_level(logging.INFO):
        triton.warning("Triton not available, find_triton_kernels = []")
        reminder.warning("This is a friendly reminder - the current text generation call has exceeded the model's "
                         "predefined maximum length (512).")
        triton.warning("reached max recursion depth (5) in find_triton_kernels")
        triton.error("Triton kernel failed to compile")
        reminder.error("generation failed")
    assert [r.getMessage() for r in caplog.records] == ["reached max recursion depth (5) in find_triton_kernels",
                                                        "Triton kernel failed to compile", "generation failed"]


def test_vllm_processes_are_quiet_below_errors_unless_the_user_chose_a_level(monkeypatch):
    from core import vllm_engine

    for name in ("VLLM_LOGGING_LEVEL", *vllm_engine.ENGINE_PROCESS_QUIET):
        monkeypatch.delenv(name, raising=False)
    assert vllm_engine._quiet_vllm() == vllm_engine.ENGINE_PROCESS_QUIET
    assert os.environ["VLLM_LOGGING_LEVEL"] == "ERROR"
    assert vllm_engine._quiet_vllm() == vllm_engine.ENGINE_PROCESS_QUIET  # a second engine (or TRL's ERROR): the same
    with vllm_engine._environment({"TORCH_CPP_LOG_LEVEL": "ERROR"}):
        assert os.environ["TORCH_CPP_LOG_LEVEL"] == "ERROR"  # while vLLM starts its processes
    assert "TORCH_CPP_LOG_LEVEL" not in os.environ  # this process's own children are left alone
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "WARNING")  # README: brings vLLM's warnings back, torch's with them
    assert vllm_engine._quiet_vllm() == {} and os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"
    monkeypatch.delenv("VLLM_LOGGING_LEVEL")
    monkeypatch.setenv("TORCH_LOGS", "+dynamo")  # the user's own torch logging wins
    assert "TORCH_LOGS" not in vllm_engine._quiet_vllm()


def test_a_log_file_keeps_each_progress_bar_once_and_log_lines_whole():
    """run_study's logs/<stage>.log (and a console that is a file): a bar's redraws after carriage returns
    piled up in the line, and a log line printed above the bar landed after the bar's debris."""
    from core.log import FinalRedraws

    stream = (b"tokenizing: 0%| 0/10\rtokenizing: 50%| 5/10\rtokenizing: 100%| 10/10\n"
              b"  0%|  | 0/60 [00:00<?]\r                       \rstep 5/60: loss 4.08, lr 1.99e-04\n"
              b" 8%|  | 5/60 [00:02<00:27]\r\n" + "done: ünïcode\r\n".encode() + b"cut mid-bar: 3%")
    reduced = FinalRedraws()
    out = b"".join(reduced.feed(stream[i:i + 7]) for i in range(0, len(stream), 7)) + reduced.finish()
    assert out.decode().splitlines() == ["tokenizing: 100%| 10/10", "step 5/60: loss 4.08, lr 1.99e-04",
                                         " 8%|  | 5/60 [00:02<00:27]", "done: ünïcode", "cut mid-bar: 3%"]


def test_an_unreachable_hub_switches_to_offline_once_instead_of_retrying(monkeypatch):
    """Without a network, huggingface_hub retried each file 5 times (eleven log lines, ~23 s) before
    failing or falling back to the cache; one failed connection now means offline mode, said once."""
    import huggingface_hub.constants

    from core import hub

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy",
                 "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub, "_checked", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens, refused at once
    said = []
    assert hub.go_offline_if_unreachable(log=said.append) is True
    assert len(said) == 1 and "cannot be reached" in said[0] and "working offline" in said[0]
    assert huggingface_hub.constants.is_offline_mode() and hub.offline_mode()
    assert hub.go_offline_if_unreachable(log=said.append) is False and len(said) == 1  # once per process


def test_behind_a_proxy_the_hub_is_not_probed(monkeypatch):
    from core import hub

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert hub.hub_unreachable() is None
