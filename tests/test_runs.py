"""A saved run read from anywhere: relative paths it recorded are resolved from where it ran (core/runs.py),
so a study folder's runs work from the repository root and after the folder moves."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from core.prompting import load_template
from core.runs import PATHS_KEY, read_run
from dpo.dpo_config import DPOConfig, save_dpo_config
from evaluation.models import read_adapter_run
from sft.sft_config import SFTConfig, save_sft_config


def _study(root: Path, monkeypatch) -> Path:
    """A study folder as run_study makes one: data/, a local base model, sft/ and dpo/ runs saved from inside it."""
    study = root / "study"
    (study / "data").mkdir(parents=True)
    (study / "data" / "sft_val.jsonl").write_text('{"instruction": "Say hi.", "output": "hi"}\n')
    (study / "base").mkdir()
    monkeypatch.chdir(study)
    sft = SFTConfig(model_name_or_path="base", tokenizer_name_or_path="org/tokenizer", train_file="data/sft_train.jsonl",
                    val_file="data/sft_val.jsonl", output_dir="sft")
    save_sft_config(sft, "sft")
    sft_payload = json.loads(Path("sft/sft_config.json").read_text())
    save_dpo_config(DPOConfig(sft_adapter_dir="sft", output_dir="dpo"), "dpo", load_template("alpaca"),
                    base_model=read_run("sft").base_model, extra={"sft_run_dir": "sft", "sft_run": sft_payload})
    for run in ("sft", "dpo"):
        (study / run / "adapter_config.json").write_text("{}")
    return study


def test_a_run_records_where_its_relative_paths_start(tmp_path, monkeypatch):
    study = _study(tmp_path, monkeypatch)
    assert json.loads((study / "sft" / "sft_config.json").read_text())[PATHS_KEY] == ".."
    run = read_run("sft")  # read where it ran: the paths come back as they were given
    assert run.local_path(run.config["val_file"]) == "data/sft_val.jsonl" and run.base_model == "base"


def test_a_study_run_read_from_another_folder_finds_its_data_and_model(tmp_path, monkeypatch):
    _study(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)  # the repository root, say: `python -m sft.eval_sft --adapter_dir study/sft`
    run = read_run("study/sft")
    assert run.local_path(run.config["val_file"]) == "study/data/sft_val.jsonl"
    assert run.base_model == "study/base"  # a local folder, from here
    assert run.tokenizer_source == "org/tokenizer"  # a hub id stays one
    assert read_adapter_run("study/sft").val_file == "study/data/sft_val.jsonl"
    assert read_adapter_run("study/dpo").val_file == "study/data/sft_val.jsonl"  # through the SFT run DPO started from


def test_a_moved_study_folder_still_finds_its_data(tmp_path, monkeypatch):
    study = _study(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    shutil.move(str(study), str(tmp_path / "moved"))
    assert Path(read_adapter_run("moved/dpo").val_file).is_file()
    assert read_run("moved/sft").base_model == "moved/base"


def test_a_run_saved_before_the_paths_were_recorded_reads_as_before(tmp_path, monkeypatch):
    study = _study(tmp_path, monkeypatch)
    config = study / "sft" / "sft_config.json"
    payload = json.loads(config.read_text())
    del payload[PATHS_KEY]
    config.write_text(json.dumps(payload))
    monkeypatch.chdir(tmp_path)
    run = read_run("study/sft")
    assert run.local_path(run.config["val_file"]) == "data/sft_val.jsonl" and run.base_model == "base"


def test_a_stages_own_resume_free_keys_may_change_on_resume():
    import dataclasses

    from core.runs import _config_differences

    saved = dataclasses.asdict(DPOConfig())
    assert _config_differences(DPOConfig(allow_foreign_pairs=True, logging_steps=3), saved) == []  # DPO's own, a shared one
    assert _config_differences(DPOConfig(beta=0.5), saved) == ["beta (run: 0.1, now: 0.5)"]
    assert _config_differences(SFTConfig(preview=2), dataclasses.asdict(SFTConfig())) == []
