"""The anchored protocol: the card's IFEval aggregate, the published anchors, and the by-hand bench's pieces."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import anchor_ifeval
from evaluation.anchor import ANCHORS, anchor_numbers, card_average, find_anchor
from test_chat_template import chatml  # noqa: F401  (the ChatML tokenizer fixture, shared)

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_card_average_is_the_mean_of_the_two_strict_shares():
    assert card_average(3, 10, 12, 20) == pytest.approx(100 * (0.3 + 0.6) / 2)
    assert card_average(5, 5, 0, 7) == pytest.approx(50.0)
    # the two levels weigh the same whatever their counts (not pooled over prompts and instructions)
    assert card_average(1, 2, 500, 1000) == pytest.approx(50.0)


@pytest.mark.parametrize("counts", [(0, 0, 1, 2), (1, 2, 0, 0), (3, 2, 1, 2), (1, 2, -1, 2)])
def test_card_average_refuses_impossible_counts(counts):
    with pytest.raises(ValueError):
        card_average(*counts)


def test_every_anchor_says_where_its_number_comes_from():
    for hub_id, anchor in ANCHORS.items():
        assert 0 < anchor["ifeval_card"] < 100
        assert anchor["source"].startswith("https://") and "Average prompt/inst" in anchor["aggregation"]


@pytest.mark.parametrize("model", [SMOLLM2, "path/to/smollm2-135m-instruct", "models/smollm2-135m-instruct/",
                                   "pkg/SmolLM2-135M-Instruct.Q4_1.gguf", "x/SmolLM2-135M-Instruct.f16.gguf"])
def test_a_local_copy_of_the_published_model_finds_its_anchor(model):
    assert find_anchor(model)[0] == SMOLLM2


@pytest.mark.parametrize("model", ["HuggingFaceTB/SmolLM2-135M", "path/to/SmolLM2-135M.Q4_1.gguf", "runs/sft_output",
                                   "smollm2-135m-instruct-dpo"])
def test_other_models_have_no_anchor(model):
    assert find_anchor(model) is None
    assert anchor_numbers(model, 1, 2, 1, 2) is None


def test_a_converted_folder_is_recognised_by_the_name_its_config_keeps(tmp_path):
    folder = tmp_path / "base_model"  # a name that says nothing
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_model_name_or_path": "Smollm2 135M 8k Lc100K Mix1 Ep2"}))
    assert find_anchor(str(folder))[0] == SMOLLM2
    (folder / "config.json").write_text(json.dumps({"_model_name_or_path": "something else"}))
    assert find_anchor(str(folder)) is None


def test_anchor_numbers_set_our_counts_beside_the_card():
    numbers = anchor_numbers("runs/smollm2-135m-instruct", 40, 200, 90, 300)
    assert numbers["card"] == ANCHORS[SMOLLM2]["ifeval_card"]
    assert numbers["ours"] == pytest.approx(round(card_average(40, 200, 90, 300), 1))
    assert numbers["difference"] == pytest.approx(round(numbers["ours"] - numbers["card"], 1))
    assert (numbers["prompt_strict"], numbers["instruction_strict"]) == (20.0, 30.0)
    assert numbers["source"] == ANCHORS[SMOLLM2]["source"]


def test_the_system_prompt_choices_render_as_documented(chatml):
    default, none, custom = (anchor_ifeval.render_prompts(chatml, ["Say hi."], s)[0] for s in ("default", "none", "Be brief."))
    assert default.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # the template's own
    assert none == "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    assert default.endswith(none) and custom.endswith(none)
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_a_smaller_budget_is_the_longer_answers_first_tokens(chatml):
    from core.generation import finish_generation

    stop = [chatml.convert_tokens_to_ids("<|im_end|>")]
    tokens = chatml.encode("one two three four five", add_special_tokens=False)
    long = finish_generation(chatml, tokens + stop, stop)
    cut = anchor_ifeval.cut_to_budget(chatml, long, 2, stop)
    assert cut.token_ids == tuple(tokens[:2]) and not cut.stopped_with_eos
    assert anchor_ifeval.cut_to_budget(chatml, long, len(tokens) + 5, stop) == long


def test_rescoring_a_generations_file_gives_the_card_style_row(tmp_path, capsys):
    prompts = [{"key": k, "prompt": f"Answer {k} without commas.", "instruction_id_list": ["punctuation:no_comma"],
                "kwargs": [{}]} for k in (1, 2, 3)]
    data = tmp_path / "ifeval.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    answers = ["no commas here", "one, two", "fine"]
    gens = tmp_path / "gens.jsonl"
    gens.write_text("".join(json.dumps({"key": k, "model": m, "response": r if m == "base" else "x, y",
                                        "stopped_with_eos": k != 3}) + "\n"
                            for k, r in zip((1, 2, 3), answers) for m in ("base", "sft")))
    assert anchor_ifeval.main(["--model", "unused", "--ifeval", str(data), "--responses", str(gens),
                               "--max_new_tokens"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if "gens.jsonl [base]" in line][-1]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1:4] == ["66.7 (2/3)", "66.7 (2/3)", "66.7"]  # the sft column ("x, y") is not read
    assert cells[-1] == "1"  # one answer ran to its budget


def test_rescoring_names_a_missing_answer(tmp_path):
    from core.cli import UserError

    data = tmp_path / "ifeval.jsonl"
    data.write_text(json.dumps({"key": 7, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"],
                                "kwargs": [{}]}) + "\n")
    gens = tmp_path / "gens.jsonl"
    gens.write_text(json.dumps({"key": 8, "model": "base", "response": "r", "stopped_with_eos": True}) + "\n")
    with pytest.raises(UserError, match="key 7"):
        anchor_ifeval.main(["--model", "unused", "--ifeval", str(data), "--responses", str(gens), "--max_new_tokens"])


def test_study_anchor_counts_the_base_columns_items_and_the_report_shows_them():
    from evaluation.anchor import anchor_lines, study_anchor
    from evaluation.comparisons import PromptItem
    items = {"base": [PromptItem("1", True, True, (("a", True, True), ("b", False, True))),
                      PromptItem("2", False, False, (("a", False, False),)), PromptItem("3", None, None)],
             "sft": [PromptItem("1", True, True, (("a", True, True),))]}
    stages = {"base": "base", "sft": "sft"}
    anchor = study_anchor("/somewhere/smollm2-135m-instruct", stages, items)
    assert (anchor["prompt_pass"], anchor["prompts"], anchor["instruction_pass"], anchor["instructions"]) == (1, 2, 1, 3)
    assert anchor["ours"] == round((50.0 + 100 / 3) / 2, 1) and anchor["column"] == "base" and anchor["answered"] == 3
    text = "\n".join(anchor_lines(anchor))
    assert "(1/2)" in text and "(1/3)" in text and "29.9" in text and "3 of the card's 541" in text
    assert "1 answered prompt could not be scored" in text
    assert study_anchor("/somewhere/stories260K", stages, items) is None  # no published number
    assert study_anchor("/somewhere/smollm2-135m-instruct", {"sft": "sft"}, items) is None  # no base column
