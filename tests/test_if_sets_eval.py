"""eval_sft --if_sets: the IF validation files beside IFEval, and IFEval split by the types training saw."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import tiny_assets
from core.cli import UserError
from core.release_format import to_sample
from evaluation import comparisons as cmp
from evaluation.if_sets import group_items, group_lines, load_if_sets, type_groups
from test_eval_sft import NO_PREFS, train_adapter

SEEN = ["punctuation:no_comma", "keywords:existence"]
HELD_OUT = ["change_case:english_lowercase", "detectable_format:title"]
KWARGS = {"punctuation:no_comma": {}, "keywords:existence": {"keywords": ["sky"]},
          "change_case:english_lowercase": {}, "detectable_format:title": {}}


def release_rows(types: list[str], count: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(count):
        ids = [types[i % len(types)]] + ([types[(i + 1) % len(types)]] if i % 2 else [])
        prompt = f"{tiny_assets.INSTRUCTIONS[i % len(tiny_assets.INSTRUCTIONS)][0]} (constraints: {', '.join(ids)})"
        rows.append({"key": offset + i, "prompt": prompt, "instruction_id_list": ids, "kwargs": [KWARGS.get(t, {}) for t in ids],
                     "instruction": prompt, "input": "", "source": "test"})
    return rows


def write_if_dir(directory: Path) -> Path:
    tiny_assets.write_jsonl(directory / "if_val_seen.jsonl", release_rows(SEEN, 4))
    tiny_assets.write_jsonl(directory / "if_val_heldout.jsonl", release_rows(HELD_OUT, 3, 100))
    tiny_assets.write_jsonl(directory / "if_val_ood.jsonl", [{"key": 1, "prompt": "Name a colour without spaces.",
                                                              "instruction_id_list": ["format:no_whitespace"], "kwargs": [{}]}])
    (directory / "if_stats.json").write_text(json.dumps({"seen_types": SEEN, "held_out_types": HELD_OUT, "ood_types": []}))
    return directory


# --------------------------------------------------------------------------- IFEval by constraint group, on plain data


def test_groups_count_only_their_own_instructions_and_pair_columns():
    rows = release_rows(SEEN + HELD_OUT + ["startend:quotation"], 6)
    samples = [to_sample("ifeval", row, "test") for row in rows]

    def items(passing: set[str]) -> list[cmp.PromptItem]:
        return [cmp.PromptItem(str(s.key), all(i in passing for i in s.instruction_id_list), True,
                               tuple((i, i in passing, True) for i in s.instruction_id_list)) for s in samples]

    columns = {"sft": items({"punctuation:no_comma"}), "rloo": items({"punctuation:no_comma", "change_case:english_lowercase"})}
    settings = {"seed": 1, "columns": [{"label": "sft", "kind": "sft adapter"}, {"label": "rloo", "kind": "rloo adapter"}]}
    run = SimpleNamespace(samples=samples)
    groups = type_groups(run, {"seen_types": SEEN, "held_out_types": HELD_OUT}, settings, columns, resamples=200)
    assert set(groups) == {"seen", "held_out", "other"} and groups["other"]["types"] == ["startend:quotation"]
    for group, types in (("seen", set(SEEN)), ("held_out", set(HELD_OUT))):
        for label, passing in (("sft", {"punctuation:no_comma"}),
                               ("rloo", {"punctuation:no_comma", "change_case:english_lowercase"})):
            wanted = [i for s in samples for i in s.instruction_id_list if i in types]
            entry = groups[group]["columns"][label]["instruction_strict"]
            assert (entry["passed"], entry["n"]) == (sum(i in passing for i in wanted), len(wanted))
            assert entry["low"] <= entry["value"] <= entry["high"]
    (pair,) = groups["held_out"]["pairs"]
    assert (pair["before"], pair["after"]) == ("sft", "rloo") and pair["instruction_strict"]["difference"]["value"] > 0
    assert groups["seen"]["pairs"][0]["instruction_strict"]["difference"]["value"] == 0
    text = "\n".join(group_lines(groups, settings))
    held = groups["held_out"]["columns"]["rloo"]["instruction_strict"]
    assert f"({held['passed']}/{held['n']})" in text and "p = " in text
    assert len(group_items(columns["sft"], samples, set(SEEN))) == sum(bool(set(SEEN) & set(s.instruction_id_list)) for s in samples)


def test_if_sets_dir_problems_are_one_line_errors(tmp_path):
    def config(directory):
        return SimpleNamespace(if_sets=str(directory), if_sets_limit=None)

    with pytest.raises(UserError, match="not a directory"):
        load_if_sets(config(tmp_path / "missing"))
    with pytest.raises(UserError, match="no if_stats.json"):
        load_if_sets(config(tmp_path))
    write_if_dir(tmp_path)
    (tmp_path / "if_val_heldout.jsonl").unlink()
    with pytest.raises(UserError, match="if_val_heldout.jsonl not found"):
        load_if_sets(config(tmp_path))
    assert load_if_sets(SimpleNamespace(if_sets=None)) == []


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_eval_reports_if_sets_beside_ifeval_with_paired_tests(tiny_llama_dir, tmp_path):
    val = tiny_assets.write_jsonl(tmp_path / "val.jsonl", tiny_assets.rendered_rows()[:4])
    sft = train_adapter(tmp_path / "sft_output", tiny_llama_dir, val, seed=0, steps=5)
    dpo = train_adapter(tmp_path / "dpo_output", tiny_llama_dir, val, seed=1, steps=0, random_init=True, run_kind="dpo")
    ifeval = tiny_assets.write_jsonl(tmp_path / "ifeval.jsonl", release_rows(SEEN + HELD_OUT, 5, 500))
    if_dir = write_if_dir(tmp_path / "if")
    out = tmp_path / "eval"
    from sft.eval_sft import main

    main(NO_PREFS + ["--adapter_dir", str(sft), str(dpo), "--num_examples", "1", "--builtin_prompts", "false",
                     "--max_new_tokens", "4", "--if_max_new_tokens", "6", "--ifeval", str(ifeval), "--if_sets", str(if_dir),
                     "--out_dir", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("if_val_seen", "if_val_heldout", "if_val_ood"):
        assert f"{name}_prompt_strict" in metrics["models"]["dpo"], name
        assert (out / f"if_{name}_scores.json").is_file()
    pair = next(p for p in metrics["comparisons"]["pairs"] if p["before"] == "sft" and p["after"] == "dpo")
    assert pair["benchmarks"]["if_val_seen"]["n"] == 4 and pair["benchmarks"]["if_val_heldout"]["n"] == 3
    assert "p" in pair["benchmarks"]["if_val_heldout"]["prompt_strict"]
    scores = json.loads((out / "if_if_val_ood_scores.json").read_text())["models"]["base"]
    assert scores["benchmark"] == "ifbench"
    groups = metrics["ifeval_by_type_group"]["groups"]
    assert set(groups) == {"seen", "held_out"} and groups["seen"]["types"] == sorted(SEEN)
    report = (out / "report.md").read_text()
    assert "## IFEval by constraint group" in report and "IF val, held-out types" in report


def test_a_column_answers_every_benchmark_in_one_engine_call(tiny_llama_dir):
    """One call per column (one long tail, not one per benchmark), its answers split back in benchmark order."""
    from collections import namedtuple

    from transformers import AutoTokenizer

    from core.generation import Generation
    from core.prompting import load_template
    from evaluation.instruction_eval import column_generations

    class RecordingEngine:
        def __init__(self):
            self.calls = []

        def generate(self, prompt_ids, *, max_new_tokens, stop_ids, desc):
            self.calls.append((len(prompt_ids), max_new_tokens, desc))
            return [Generation(text=f"answer {i}", token_ids=(i,), stopped_with_eos=True) for i in range(len(prompt_ids))]

    Settings = namedtuple("Settings", "template")  # hashable, as a run's settings are: the tokenization cache's key

    def samples(count, offset):
        return [SimpleNamespace(prompt=f"prompt {offset + i}") for i in range(count)]

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    spec = SimpleNamespace(label="sft", settings=Settings(load_template("alpaca")))
    engine, cache = RecordingEngine(), {}
    benchmarks = [("ifeval", samples(3, 0)), ("if_val_seen", samples(2, 10)), ("if_val_ood", samples(1, 20))]
    answers = column_generations(benchmarks, spec, tokenizer, engine, 7, cache)
    assert engine.calls == [(6, 7, "sft: ifeval + if_val_seen + if_val_ood")]
    assert {name: [g.text for g in gens] for name, gens in answers.items()} == {
        "ifeval": ["answer 0", "answer 1", "answer 2"], "if_val_seen": ["answer 3", "answer 4"], "if_val_ood": ["answer 5"]}
    column_generations(benchmarks, spec, tokenizer, engine, 7, cache)  # the same template: tokenized once
    assert len(cache) == 1 and len(engine.calls) == 2
