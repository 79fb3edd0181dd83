"""Adding a stage is one folder plus one registration (CONTRIBUTING.md: "Adding a stage"), shown with a toy one.

The toy stage lives in this test module: it registers itself (``core.stages.register_stage``),
continues an SFT run's adapter with the causal-LM loss on the SFT data for one step, and reuses
everything shared: the entry point (``core.entry``), the run skeleton (``core.stage``), the start
point and policy (``core.policy``), the config mechanism (``core.keys.StageConfig``). Then the rest
of the project finds its run with no edit of its own: ``core.runs`` reads it, the evaluation takes it
as a column that follows SFT, and the study knows its config file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from core.config import key
from core.keys import LoraKeys, StageConfig, TrainingKeys, stage_presets
from core.stages import StageInfo, register_stage, unregister_stage

TOY = StageInfo("toy", "toy stage", {"mac": "test_adding_a_stage", "cuda": "test_adding_a_stage"}, starts_from="sft")


@dataclass
class ToyConfig(StageConfig, LoraKeys, TrainingKeys):
    STAGE, TITLE, PRESETS = "toy", "resolved toy config", stage_presets()

    sft_adapter_dir: str = key("models/sft_output", "the SFT run whose adapter the toy stage continues")
    train_file: str = key("data/processed/sft_train.jsonl", "rows to train on (the SFT format)")
    max_seq_length: int = key(128, "longest tokenized example")
    trust_remote_code: bool = key(False, "allow model code from the hub")


def toy_run_class():
    """The toy stage's run: only what is its own (imports torch, so built once the arguments are parsed)."""
    from datasets import Dataset
    from transformers import Trainer

    from core.log import say
    from core.policy import load_trainable_policy, read_sft_start, save_policy_adapter
    from core.prompting import prompt_format
    from core.stage import RunFromSFT, tokenizer_with_pad
    from core.tokenization import PaddingCollator, encode_records, read_jsonl_objects
    from core.training import run_facts, training_arguments, watch_run

    class ToyRun(RunFromSFT):  # template, base model and record: the SFT run's
        config_class = ToyConfig

        def check(self) -> bool:
            self.start = read_sft_start(self.config.sft_adapter_dir, need_adapter=True, why="the toy stage",
                                        renders="the toy stage renders rows")
            return True

        def intro(self) -> list[str]:
            return [f"toy: continues the SFT adapter in {self.start.sft_dir}"]

        def load_tokenizer(self):
            return tokenizer_with_pad(self.start.base_model, self.start.tokenizer_source, False)

        def load_data(self):
            fmt = prompt_format(self.start.template, self.tokenizer)
            examples = encode_records(read_jsonl_objects(self.config.train_file), fmt, self.config.max_seq_length)
            say(f"toy: {len(examples)} examples")
            return Dataset.from_list([e.as_features() for e in examples])

        def load_model(self):
            return load_trainable_policy(self.config, self.start, self.plan)

        def build_trainer(self, model):
            args = training_arguments(self.config, self.plan, resuming=self.resume_from is not None, has_eval=False)
            trainer = Trainer(model=model, args=args, train_dataset=self.data, processing_class=self.tokenizer,
                              data_collator=PaddingCollator(self.tokenizer.pad_token_id), callbacks=self.callbacks)
            watch_run(trainer, self.plan, self.config.save_total_limit)
            return trainer

        def save_model(self, trainer, output_dir) -> None:
            if trainer.is_world_process_zero():
                save_policy_adapter(trainer.model, self.tokenizer, output_dir, self.start.sft_dir)

        def metrics(self, trainer, session_seconds: float) -> dict:
            return {"global_step": trainer.state.global_step, **run_facts(trainer, self.plan, resumed_from=self.resume_from,
                                                                             session_seconds=session_seconds)}

        def plot(self, log_history, output_dir) -> None:
            pass  # a toy: no curves

        def card(self, metrics: dict, output_dir):
            return "toy adapter", {"How it was trained": f"{metrics['global_step']} step(s) from the SFT adapter"}

        def summary_line(self, metrics: dict, output_dir) -> str:
            return f"done: {metrics['global_step']} toy step(s); outputs in {output_dir}"

    return ToyRun


# --------------------------------------------------------------------------- the test


@pytest.fixture()
def toy_stage():
    register_stage(TOY)
    try:
        yield TOY
    finally:
        unregister_stage(TOY.name)


@pytest.fixture()
def sft_run(tmp_path, tiny_llama_dir, sft_data):
    from sft.train_sft_mac import main as train_sft
    from test_first_hour import sft_argv

    out = tmp_path / "sft"
    train_sft(sft_argv(tiny_llama_dir, sft_data, out, max_steps=1, eval_steps=1, save_steps=1))
    return out


@pytest.mark.slow
def test_a_registered_toy_stage_trains_and_the_project_reads_its_run(toy_stage, sft_run, sft_data, tmp_path, capsys):
    from core.entry import training_entry
    from core.runs import RUN_CONFIG_FILES, read_run, run_stage
    from evaluation import comparisons as cmp
    from evaluation.models import build_model_specs, read_adapter_run
    from scripts.study_presets import training_run

    main, plan_mac = training_entry("toy", "mac", ToyConfig.parse, lambda: toy_run_class().launch, "the toy stage")
    out = tmp_path / "toy"
    assert main(["--sft_adapter_dir", str(sft_run), "--train_file", str(sft_data[0]), "--output_dir", str(out),
                 "--max_steps", "1", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                 "--report_to", "none"]) == 0
    printed = capsys.readouterr().out
    assert "resolved toy config (every key: " in printed and f"toy: continues the SFT adapter in {sft_run}" in printed
    assert "done: 1 toy step(s)" in printed
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 1 and (out / "README.md").is_file()

    # core.runs reads it as any stage's run: the stage, its config file, the SFT run's base model and template
    run, sft = read_run(out), read_run(sft_run)
    assert run_stage(out) == "toy" and RUN_CONFIG_FILES["toy"] == "toy_config.json" and (out / "toy_config.json").is_file()
    assert (run.stage, run.base_model, run.template) == ("toy", sft.base_model, sft.template) and run.has_adapter

    # the evaluation takes it as a column of its kind, after SFT, named by its title
    adapter = read_adapter_run(str(out))
    assert adapter.kind == "toy" and adapter.val_file == str(sft_data[1])  # the SFT run's validation file
    stages = {column["label"]: cmp.column_stage(column) for column in
              (spec.describe() for spec in build_model_specs([str(sft_run), str(out)], None))}
    assert stages == {"base": "base", "sft": "sft", "toy": "toy"}
    assert cmp.stage_pairs(stages) == [("base", "sft", "sequential"), ("sft", "toy", "sequential")]
    assert cmp.stage_name("toy", stages) == "toy stage"
    assert ("dpo", "toy", "sibling") in cmp.stage_pairs({"base": "base", "sft": "sft", "dpo": "dpo", "toy": "toy"})

    # the study's step for it: its run folder and config file from the registry
    step = training_run("toy", ["test_adding_a_stage"], tmp_path)
    assert step.run_config == tmp_path / "toy" / "toy_config.json" and step.done_file == tmp_path / "toy" / "metrics.json"


def test_a_stage_name_is_registered_once(toy_stage):
    from core.stages import registered_stages, stage_info

    assert stage_info("toy") is TOY and registered_stages()[-1] is TOY  # after the project's four, in order
    register_stage(TOY)  # the same stage again: fine
    with pytest.raises(ValueError, match="a stage named 'toy' is already registered"):
        register_stage(StageInfo("toy", "another toy"))


def test_an_unregistered_stages_run_is_not_a_run(toy_stage, tmp_path):
    from core.cli import UserError
    from core.runs import read_run

    (tmp_path / "toy_config.json").write_text("{}")
    unregister_stage("toy")
    with pytest.raises(UserError, match="holds no sft_config.json or dpo_config.json or reward_config.json or rloo_config.json"):
        read_run(tmp_path)
