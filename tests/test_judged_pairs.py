"""Checker-judged pairs (prepare_dpo_data --judge checker): best vs worst by the checker, ties dropped, ids carried."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.cli import UserError, run_cli
from core.generation import Generation
from core.if_checker import checker_registry
from scripts import prepare_dpo_data as prep
from scripts import sft_sampling
from scripts.judged_pairs import JUDGED_REASONS, judge_prompt, load_constrained_prompts
from scripts.pair_sources import Collected
from test_dpo_training import sft_run, workdir  # noqa: F401 - module fixtures: a real tiny SFT run

ROW = {"key": 7, "prompt": "Name two fruits.\n\nWrap your entire response with double quotation marks. Do not use any commas.",
       "instruction_id_list": ["startend:quotation", "punctuation:no_comma"], "kwargs": [{}, {}],
       "instruction": "Name two fruits.\n\nWrap your entire response with double quotation marks. Do not use any commas.",
       "input": "", "source": "test"}


def gen(text: str, stopped: bool = True) -> Generation:
    return Generation(text=text, token_ids=tuple(range(len(text.split()))), stopped_with_eos=stopped)


def judge(samples: list[Generation]) -> tuple[Collected, dict | None]:
    collected = Collected(source="checker-judged", reasons=JUDGED_REASONS)
    return collected, judge_prompt(collected, 0, ROW, "ifeval", checker_registry("ifeval"), samples)


def test_best_and_worst_by_the_checker_carry_ids_and_scores():
    collected, figures = judge([gen('"apples, pears"'), gen("apples, pears and plums"), gen('"apples and pears"'),
                                gen("apples and pears")])
    [row] = collected.rows
    assert (row["chosen"], row["rejected"]) == ('"apples and pears"', "apples, pears and plums")
    assert (row["chosen_score"], row["rejected_score"]) == (1.0, 0.0)
    assert row["instruction_id_list"] == ROW["instruction_id_list"] and row["kwargs"] == ROW["kwargs"]
    assert row["instruction"] == ROW["instruction"] and row["input"] == ""
    assert figures["chosen_tokens"] == 3 and figures["rejected_tokens"] == 4


def test_ties_and_too_few_samples_are_dropped_with_their_reason():
    collected, figures = judge([gen('"a, b"'), gen("a b")])  # 0.5 each
    assert figures is None and [r["reason"] for r in collected.rejected] == ["tie"]
    collected, figures = judge([gen('"a b"'), gen("   ")])  # one sample is empty
    assert figures is None and [r["reason"] for r in collected.rejected] == ["fewer_than_two_samples"]


def test_prompts_without_constraints_are_one_line_and_nothing_is_written(tmp_path, capsys):
    prompts = tmp_path / "sft.jsonl"
    prompts.write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi."}) + "\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(prep.main, ["--from_sft_model", str(tmp_path / "no_run"), "--judge", "checker", "--prompts", str(prompts),
                            "--out_dir", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {prompts}:1: no constraints (instruction_id_list)") and "\n" not in err
    assert not out.exists()
    with pytest.raises(UserError, match="--judge checker needs --from_sft_model RUN and --prompts FILE"):
        prep.main(["--from_sft_model", str(tmp_path), "--judge", "checker"])


def test_benchmark_is_the_registry_that_knows_every_id(tmp_path):
    path = tmp_path / "ood.jsonl"
    path.write_text(json.dumps({**ROW, "instruction_id_list": ["format:no_whitespace"], "kwargs": [{}]}) + "\n")
    assert load_constrained_prompts(path)[1] == "ifbench"
    path.write_text(json.dumps(ROW) + "\n")
    assert load_constrained_prompts(path)[1] == "ifeval"


SCRIPTED = [gen('"plain answer"'), gen("plain, answer", stopped=False), gen('"another, answer"'), gen("x, y")]


@pytest.mark.slow
def test_judged_pairs_from_an_sft_run_end_to_end(sft_run, tmp_path, monkeypatch):  # noqa: F811
    """The whole path (run, template, prompt fit, judge, split, files) with scripted samples in place of the engine."""
    prompts = tmp_path / "if_train.jsonl"
    prompts.write_text("".join(json.dumps({**ROW, "key": i, "prompt": f"Fruit {i}.", "instruction": f"Fruit {i}."}) + "\n"
                               for i in range(6)))
    monkeypatch.setattr(sft_sampling, "sample_from_run",
                        lambda args, run, choice, tok, ids, stop, desc: ([SCRIPTED[i % 4] for i in range(len(ids))], "scripted"))
    outputs = []
    for name in ("a", "b"):
        prep.main(["--from_sft_model", str(sft_run), "--judge", "checker", "--prompts", str(prompts), "--samples_per_prompt",
                   "4", "--num_pairs", "6", "--max_new_tokens", "8", "--val_ratio", "0.34", "--engine", "hf",
                   "--out_dir", str(tmp_path / name)])
        outputs.append(b"".join((tmp_path / name / f).read_bytes() for f in prep.OUTPUT_FILES.values()))
    assert outputs[0] == outputs[1]
    stats = json.loads((tmp_path / "a" / "prefs_stats.json").read_text())
    assert stats["judge"]["prompts"] == 6 and stats["judge"]["prompts_with_pair"] == stats["train"] + stats["val"] == 6
    assert stats["judge"]["mean_chosen_score"] == 1.0 and stats["judge"]["mean_rejected_score"] == 0.0
    rows = [json.loads(line) for f in ("prefs_train.jsonl", "prefs_val.jsonl")
            for line in (tmp_path / "a" / f).read_text().splitlines()]
    assert {(r["chosen"], r["rejected"]) for r in rows} == {('"plain answer"', "plain, answer")}
    assert all(r["instruction_id_list"] == ROW["instruction_id_list"] for r in rows)
