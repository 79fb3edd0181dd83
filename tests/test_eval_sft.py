"""python -m sft.eval_sft end to end on CPU: a tiny Llama and LoRA adapters trained in the test."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny_assets
from dpo.dpo_config import DPOConfig, save_dpo_config
from core.cli import UserError, run_cli
from evaluation.config import EvalConfig
from core.tokenization import PaddingCollator, tokenize_example
from evaluation.data import read_prompt_file, sample_indices, validation_loss
from sft.eval_sft import main
from core.generation import generate_texts
from core.prompting import load_template, template_from_dict
from sft.sft_config import SFTConfig, save_sft_config

# A template unlike Alpaca: if evaluation ever fell back to the default, every prompt would differ.
CUSTOM_TEMPLATE = {
    "name": "qa-test",
    "description": "test-only template",
    "prompt_input": "Question: {instruction}\nContext: {input}\nAnswer:\n",
    "prompt_no_input": "Question: {instruction}\nAnswer:\n",
    "response_split": "Answer:",
    "kind": "text",
}
# Preference metrics (evaluation/preference.py, tested in test_preference_eval.py) would pick up data/processed/prefs_val.jsonl
# from the working directory if it exists: keep these tests independent of the checkout's data.
NO_PREFS = ["--prefs_file", "none", "--precision", "fp32"]  # fp32 pinned: auto would measure the CPU
NUM_BUILTIN = len(read_prompt_file(Path(__file__).resolve().parents[1] / "evaluation" / "eval_prompts.txt"))




@pytest.fixture(scope="module")
def val_file(tmp_path_factory) -> Path:
    return tiny_assets.write_jsonl(tmp_path_factory.mktemp("data") / "sft_val.jsonl", tiny_assets.rendered_rows()[:6])


def train_adapter(out_dir: Path, base_dir: Path, val_file: Path, seed: int, steps: int = 40, random_init: bool = False,
                  run_kind: str = "sft") -> Path:
    """A LoRA adapter trained like SFT (custom template, prompt masked), saved as a training run saves it.

    The template file is deleted afterwards: evaluation must use the copy in sft_config.json.
    ``random_init`` starts LoRA B from random values instead of zeros: a different adapter in no time.
    ``run_kind="dpo"`` saves the run record the DPO trainer writes (dpo_config.json) instead.
    """
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    template_file = out_dir.parent / f"{out_dir.name}_template.json"
    template_file.write_text(json.dumps(CUSTOM_TEMPLATE))
    template = load_template(str(template_file))
    torch.manual_seed(seed)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=not random_init)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lora)
    rows = tiny_assets.rendered_rows()
    features = [tokenize_example(template.render(r["instruction"], r["input"]), r["response"], tokenizer, 128) for r in rows]
    batch = PaddingCollator(pad_token_id=0)(features)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if run_kind == "dpo":
        save_dpo_config(DPOConfig(max_length=128, output_dir=str(out_dir)), out_dir, template, preset="mac",
                        extra={"base_model": str(base_dir)})
    else:
        config = SFTConfig(model_name_or_path=str(base_dir), val_file=str(val_file), template=str(template_file), max_seq_length=128)
        save_sft_config(config, out_dir, preset="mac")
    template_file.unlink()
    return out_dir


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir, val_file, tmp_path_factory) -> Path:
    return train_adapter(tmp_path_factory.mktemp("runs") / "sft_output", tiny_llama_dir, val_file, seed=0)


@pytest.fixture(scope="module")
def second_adapter_dir(tiny_llama_dir, val_file, tmp_path_factory) -> Path:
    return train_adapter(tmp_path_factory.mktemp("runs2") / "dpo_output", tiny_llama_dir, val_file, seed=1, steps=0,
                         random_init=True, run_kind="dpo")


@pytest.fixture(scope="module")
def eval_run(adapter_dir, tmp_path_factory):
    """One evaluation, shared by the tests that only read its outputs."""
    out_dir = tmp_path_factory.mktemp("eval")
    torch.set_num_threads(1)
    main(NO_PREFS + ["--adapter_dir", str(adapter_dir), "--num_examples", "4", "--max_new_tokens", "12", "--batch_size", "3",
          "--out_dir", str(out_dir), "--max_eval_samples", "5", "--seed", "3"])
    rows = [json.loads(line) for line in (out_dir / "generations.jsonl").read_text().splitlines()]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    return out_dir, rows, metrics


def _outputs(rows, model_label):
    return [r for r in rows if r["model"] == model_label]


def test_writes_report_files_with_one_row_per_prompt_and_model(eval_run):
    out_dir, rows, metrics = eval_run
    assert {p.name for p in out_dir.iterdir()} >= {"report.md", "side_by_side.txt", "generations.jsonl", "metrics.json"}
    n_prompts = NUM_BUILTIN + 4
    assert (out_dir / "side_by_side.txt").read_text().count("\n── ") == n_prompts - 1  # a block per prompt
    assert len(rows) == 2 * n_prompts
    pairs = {(r["prompt_id"], r["model"]) for r in rows}
    assert len(pairs) == len(rows)  # no duplicates: exactly one row per (prompt, model)
    assert {m for _, m in pairs} == {"base", "sft"}
    assert sum(r["source"] == "val" for r in rows) == 2 * 4
    assert list(metrics["models"]) == ["base", "sft"]
    phases = metrics["phases"]  # where the time went (core/phases.py), each second charged once
    assert {"model_load", "generation_decode"} <= set(phases["seconds"])
    assert sum(phases["seconds"].values()) == pytest.approx(phases["wall_seconds"], abs=0.01)
    for values in metrics["models"].values():
        assert values["num_generated"] == n_prompts and values["num_with_reference"] == 4
        assert 0 <= values["stop_rate"] <= 1 and 0 <= values["empty_rate"] <= 1 and 0 <= values["rouge_l_f1"] <= 1
        assert values["val_examples"] == 5 and values["val_tokens"] > 0
        assert values["val_perplexity"] == pytest.approx(math.exp(values["val_loss"]))
    assert metrics["settings"]["val_loss_examples"] == "5 of 6 examples (sampled with seed 3)"
    report = (out_dir / "report.md").read_text()
    assert report.index("## Metrics") < report.index("## Generations")
    assert "| base |" in report and "| sft |" in report
    for row in rows:
        assert f"`{row['prompt_id']}`" in report


def test_original_study_prompts_are_built_in(eval_run):
    _, rows, _ = eval_run
    instructions = " ".join(r["instruction"] for r in rows if r["source"] == "builtin")
    for phrase in ("instruction tuning and preference alignment", "RLHF in two sentences", "benefits of supervised fine-tuning"):
        assert phrase in instructions


def test_prompts_use_the_training_template(eval_run):
    _, rows, metrics = eval_run
    template = template_from_dict(CUSTOM_TEMPLATE)
    for row in rows:
        assert row["prompt"] == template.render(row["instruction"], row["input"])
        assert "### Response:" not in row["prompt"]
    assert metrics["settings"]["templates"]["base"] == CUSTOM_TEMPLATE
    assert metrics["settings"]["templates"]["sft"] == CUSTOM_TEMPLATE


def test_base_outputs_come_from_the_disabled_adapter(eval_run, tiny_llama_dir, adapter_dir):
    _, rows, _ = eval_run
    base_rows, sft_rows = _outputs(rows, "base"), _outputs(rows, "sft")
    prompts = [r["prompt"] for r in base_rows]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    expected_base = generate_texts(plain, tokenizer, prompts, max_new_tokens=12, show_progress=False)
    assert [r["output"] for r in base_rows] == [g.text for g in expected_base]
    assert [r["num_tokens"] for r in base_rows] == [g.num_tokens for g in expected_base]

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(adapter_dir))
    expected_sft = generate_texts(adapted, tokenizer, prompts, max_new_tokens=12, show_progress=False)
    assert [r["output"] for r in sft_rows] == [g.text for g in expected_sft]
    assert [r["output"] for r in sft_rows] != [r["output"] for r in base_rows]  # the adapter changes something


def _reference_loss(model, tokenizer, val_rows, template) -> float:
    """Token-level mean over all supervised tokens, one example at a time with the model's own loss."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in val_rows:
            feature = tokenize_example(template.render(row["instruction"], row["input"]), row["response"], tokenizer, 128)
            n = sum(label != -100 for label in feature["labels"][1:])
            batch = {k: torch.tensor([v]) for k, v in feature.items()}
            total += model(**batch).loss.item() * n
            count += n
    return total / count


def test_validation_loss_is_the_token_level_mean_over_responses(adapter_dir, tiny_llama_dir, val_file, tmp_path):
    main(NO_PREFS + ["--adapter_dir", str(adapter_dir), "--num_examples", "0", "--max_new_tokens", "2", "--batch_size", "4",
          "--out_dir", str(tmp_path), "--builtin_prompts", "false", "--prompts", str(_prompt_file(tmp_path))])
    metrics = json.loads((tmp_path / "metrics.json").read_text())["models"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    template = template_from_dict(CUSTOM_TEMPLATE)
    val_rows = [json.loads(line) for line in val_file.read_text().splitlines()]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert metrics["base"]["val_loss"] == pytest.approx(_reference_loss(base, tokenizer, val_rows, template), rel=1e-4)
    adapted = PeftModel.from_pretrained(base, str(adapter_dir))
    assert metrics["sft"]["val_loss"] == pytest.approx(_reference_loss(adapted, tokenizer, val_rows, template), rel=1e-4)
    assert metrics["sft"]["val_loss"] < metrics["base"]["val_loss"]  # trained on these very answers
    assert metrics["base"]["val_examples"] == 6


def test_validation_loss_weights_every_token_equally(tiny_llama_dir):
    """A long easy answer and a short hard one: the token-level mean is far from the mean of per-example means."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    easy, hard, eos = 10, 11, tokenizer.eos_token_id
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():  # a model that is sure the next token is `easy`
        head.weight.zero_()
        head.bias.zero_()
        head.bias[easy] = 8.0
    model.lm_head = head
    prompt = [1, 40, 41, 42]

    def feature(response):
        return {"input_ids": prompt + response, "attention_mask": [1] * (len(prompt) + len(response)),
                "labels": [-100] * len(prompt) + response}

    features = [feature([easy] * 20 + [eos]), feature([hard, eos]), feature([easy, easy, hard, eos])]
    sums, counts = [], []
    with torch.no_grad():
        for f in features:
            logits = model(input_ids=torch.tensor([f["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(f["labels"][1:])
            sums.append(torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item())
            counts.append(int((targets != -100).sum()))
    token_mean = sum(sums) / sum(counts)
    mean_of_means = sum(s / c for s, c in zip(sums, counts)) / len(features)
    assert abs(token_mean - mean_of_means) > 1.0  # the case really tells the two apart
    for batch_size in (1, 2, 3):
        result = validation_loss(model, tokenizer, features, batch_size=batch_size, show_progress=False)
        assert result.loss == pytest.approx(token_mean, rel=1e-5)
        assert result.num_tokens == sum(counts) and result.num_examples == 3
        assert result.perplexity == pytest.approx(math.exp(token_mean), rel=1e-5)


def test_cut_and_dropped_validation_examples_are_counted(adapter_dir, tmp_path, capsys):
    rows = tiny_assets.rendered_rows()[:3]
    rows.append({**rows[0], "id": "long-answer", "output": "The cat sat on the mat. " * 40})
    rows.append({**rows[1], "id": "long-question", "instruction": "Describe the sky on a clear day. " * 40})
    val = tiny_assets.write_jsonl(tmp_path / "val.jsonl", rows)
    main(NO_PREFS + ["--adapter_dir", str(adapter_dir), "--val_file", str(val), "--num_examples", "0", "--max_new_tokens", "2",
                     "--builtin_prompts", "false", "--prompts", str(_prompt_file(tmp_path)), "--out_dir", str(tmp_path / "eval")])
    models = json.loads((tmp_path / "eval" / "metrics.json").read_text())["models"]
    for values in models.values():
        assert (values["val_examples"], values["val_truncated"], values["val_dropped"]) == (4, 1, 1)
    assert "1 cut at max_seq_length" in (tmp_path / "eval" / "report.md").read_text()
    printed = capsys.readouterr().out
    assert "1 validation examples cut" in printed
    # the answers side by side: every prompt in the file, the first one on the console
    assert (tmp_path / "eval" / "side_by_side.txt").read_text().count("── ") == 2
    assert printed.count("── ") == 1 and f"answers side by side for 2 prompts: {tmp_path / 'eval' / 'side_by_side.txt'}" in printed


def _prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "extra.txt"
    path.write_text("# a comment\nName a colour.\n\nWrite one word.\n")
    return path


def test_sft_and_dpo_adapters_become_three_columns_each_with_its_own_weights(adapter_dir, second_adapter_dir, tiny_llama_dir, tmp_path):
    main(NO_PREFS + ["--adapter_dir", str(adapter_dir), str(second_adapter_dir), "--num_examples", "2", "--max_new_tokens", "10",
          "--out_dir", str(tmp_path), "--builtin_prompts", "false", "--prompts", str(_prompt_file(tmp_path))])
    rows = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    for label, directory in (("sft", adapter_dir), ("dpo", second_adapter_dir)):
        column = _outputs(rows, label)
        alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(directory))
        expected = generate_texts(alone, tokenizer, [r["prompt"] for r in column], max_new_tokens=10, show_progress=False)
        assert [r["output"] for r in column] == [g.text for g in expected]
    assert [r["output"] for r in _outputs(rows, "sft")] != [r["output"] for r in _outputs(rows, "dpo")]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert list(metrics["models"]) == ["base", "sft", "dpo"]
    assert [c["kind"] for c in metrics["settings"]["columns"]] == ["base", "sft adapter", "dpo adapter"]


def test_extra_prompt_files_text_and_jsonl(tmp_path):
    text = read_prompt_file(_prompt_file(tmp_path))
    assert [p.instruction for p in text] == ["Name a colour.", "Write one word."]
    jsonl = tmp_path / "extra.jsonl"
    jsonl.write_text('{"instruction": "Translate.", "input": "Hello", "reference": "Bonjour"}\n{"instruction": "Smile."}\n')
    parsed = read_prompt_file(jsonl)
    assert (parsed[0].instruction, parsed[0].input, parsed[0].reference) == ("Translate.", "Hello", "Bonjour")
    assert (parsed[1].input, parsed[1].reference) == ("", None)


def test_sampling_of_validation_examples_is_deterministic():
    assert sample_indices(10, None, 0) == list(range(10))
    assert sample_indices(10, 20, 0) == list(range(10))
    picked = sample_indices(100, 7, seed=5)
    assert picked == sample_indices(100, 7, seed=5) == sorted(picked) and len(set(picked)) == 7
    assert picked != sample_indices(100, 7, seed=6)


def _cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_missing_adapter_dir_is_a_one_line_error(tmp_path, capsys):
    assert "not found" in _cli_error(NO_PREFS + ["--adapter_dir", str(tmp_path / "nope")], capsys)


def test_unfindable_base_model_is_a_one_line_error(adapter_dir, tmp_path, capsys):
    broken = tmp_path / "sft_output"
    broken.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (broken / name).write_bytes((adapter_dir / name).read_bytes())
    payload = json.loads((adapter_dir / "sft_config.json").read_text())
    payload["config"]["model_name_or_path"] = str(tmp_path / "moved_away_model")
    payload["base_model"] = payload["config"]["model_name_or_path"]
    (broken / "sft_config.json").write_text(json.dumps(payload))
    err = _cli_error(NO_PREFS + ["--adapter_dir", str(broken), "--out_dir", str(tmp_path / "eval")], capsys)
    assert "moved_away_model" in err


def test_empty_validation_file_is_a_one_line_error(adapter_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    err = _cli_error(NO_PREFS + ["--adapter_dir", str(adapter_dir), "--val_file", str(empty), "--out_dir", str(tmp_path)], capsys)
    assert "no examples" in err


def test_a_reward_model_is_refused_as_a_column_and_pointed_to_reward_model(adapter_dir, tmp_path, capsys):
    reward = tmp_path / "reward_output"
    reward.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (reward / name).write_bytes((adapter_dir / name).read_bytes())
    payload = {**json.loads((adapter_dir / "sft_config.json").read_text()), "stage": "reward"}
    (reward / "reward_config.json").write_text(json.dumps(payload))
    err = _cli_error(NO_PREFS + ["--adapter_dir", str(adapter_dir), str(reward), "--out_dir", str(tmp_path / "eval")], capsys)
    assert "is a reward model" in err and f"--reward_model {reward}" in err
    assert not (tmp_path / "eval").exists()


def test_the_default_out_dir_depends_on_the_columns_and_another_eval_is_not_overwritten(
        adapter_dir, second_adapter_dir, tmp_path, capsys):
    from evaluation.models import build_model_specs
    from evaluation.run import resolve_out_dir, run_settings

    one = build_model_specs([str(adapter_dir)], None)
    two = build_model_specs([str(adapter_dir), str(second_adapter_dir)], None)
    assert resolve_out_dir(None, one, overwrite=False) == adapter_dir / "eval"
    assert resolve_out_dir(None, two, overwrite=False) == adapter_dir / "eval_sft_dpo"
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"settings": run_settings(EvalConfig(), one, "v.jsonl", 1, 1)}))
    with pytest.raises(UserError, match=r"holds an evaluation of base \| sft .*this one compares base \| sft \| dpo: "
                                        r"pass --overwrite"):
        resolve_out_dir(str(out), two, overwrite=False)
    assert resolve_out_dir(str(out), one, overwrite=False) == out  # the same columns: a rerun replaces its own
    assert "replacing the evaluation of the same columns" in capsys.readouterr().out
    assert resolve_out_dir(str(out), two, overwrite=True) == out
    assert "--overwrite: replacing" in capsys.readouterr().out
