"""The checker as RLOO's reward (RLVR): what it scores, what it counts, and how the reward is configured."""
from __future__ import annotations

import json

import pytest

from core.cli import UserError
from core.config import ConfigError
from core.if_checker import judge_response
from core.release_format import to_sample
from rlhf.rewards import reward_functions, reward_weights
from rlhf.rloo_config import parse_rloo_config
from rlhf.verifiable_reward import (VerifiableReward, constraint_columns, dataset_rows, mark_benchmark,
                                    monitor_set_metrics, require_constraints)

ROW = {"key": 7, "prompt": "Describe the sky. Do not use any commas. Answer in lowercase letters only.",
       "instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"], "kwargs": [{}, {}]}
RESPONSES = ["the sky is blue and wide", "the sky is blue, and wide", "The sky is blue, and wide"]


class CharTokenizer:
    """Characters as token ids; 0 is the stop token (never decoded)."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i)


def columns(rows: list[dict], monitor_set: str | None = None) -> dict[str, list]:
    marked = mark_benchmark([{"prompt": r["prompt"], **constraint_columns(r, "test")} for r in rows], "test")
    out = {key: [row[key] for row in marked] for key in ("key", "if_prompt", "instruction_id_list", "kwargs", "benchmark")}
    if monitor_set:
        out["monitor_set"] = [monitor_set] * len(rows)
    return out


@pytest.mark.parametrize("shape", ["fraction", "binary"])
def test_the_reward_is_the_checkers_verdict(shape):
    tokenizer = CharTokenizer()
    reward = VerifiableReward(tokenizer, stop_ids=[0], shape=shape)
    ids = [tokenizer.encode(text) + [0] for text in RESPONSES]  # stopped: the stop token is not part of the text
    got = reward(["p"] * 3, RESPONSES, ids, **columns([ROW] * 3))
    sample = to_sample("ifeval", ROW, "test")
    verdicts = [judge_response("ifeval", sample, text) for text in RESPONSES]
    assert [v.followed for v in verdicts] == [2, 1, 0]  # the three responses differ in what they follow
    assert got == [v.fraction if shape == "fraction" else float(v.all_followed) for v in verdicts]


def test_monitoring_rows_are_counted_per_set_and_flushed_once():
    tokenizer = CharTokenizer()
    reward = VerifiableReward(tokenizer, stop_ids=[0])
    ids = [tokenizer.encode(RESPONSES[0]) + [0], tokenizer.encode(RESPONSES[1]), tokenizer.encode(RESPONSES[2]) + [0]]
    reward(["p"] * 3, RESPONSES, ids, **columns([ROW] * 3, "if_val_seen"))
    reward(["p"], RESPONSES[:1], ids[:1], **columns([ROW]))  # a training row: not counted
    entries = reward.flush()
    assert entries["eval_if_val_seen/pass_k"] == 1 and entries["eval_if_val_seen/pass_n"] == 3
    assert entries["eval_if_val_seen/followed_k"] == 3 and entries["eval_if_val_seen/followed_n"] == 6
    assert entries["eval_if_val_seen/stop_rate"] == pytest.approx(2 / 3)
    assert entries["eval_if_val_seen/reward"] == pytest.approx(0.5)
    assert reward.flush() == {}
    history = [{"step": 0, **entries}, {"step": 5, **entries}]
    assert monitor_set_metrics(history, ["if_val_seen"])["if_val_seen"]["after"]["pass_k"] == 1


def test_a_row_without_constraints_gets_no_checker_reward():
    rows = [{"prompt": "a", **constraint_columns({"instruction": "a"}, "x")},
            {"prompt": "b", **constraint_columns(ROW, "y")}]
    table = dataset_rows(mark_benchmark(rows, "file"))
    assert table[0]["instruction_id_list"] == [] and table[1]["benchmark"] == "ifeval"
    reward = VerifiableReward(CharTokenizer(), stop_ids=[0])
    cols = {key: [row[key] for row in table] for key in table[0] if key != "prompt"}
    assert reward(["a", "b"], ["x", "y"], [[120], [121]], **cols)[0] is None
    with pytest.raises(UserError, match="no prompt with constraints"):
        require_constraints(rows[:1], "file")


def test_ifbench_files_are_judged_by_ifbench_checkers():
    from core.if_checker import checker_registry

    only_ifbench = sorted(set(checker_registry("ifbench")) - set(checker_registry("ifeval")))[0]
    row = {"key": 1, "prompt": "p", "instruction_id_list": [only_ifbench], "kwargs": [{}]}
    assert mark_benchmark([{"prompt": "p", **constraint_columns(row, "x")}], "f")[0]["benchmark"] == "ifbench"


class FakeReward:
    template = None


def test_reward_keys_choose_the_functions_and_their_weights(tmp_path):
    class Format:
        stop_ids = [0]

    def functions(*flags: str, monitor: tuple = ()):
        config = parse_rloo_config(["--output_dir", str(tmp_path), *flags])
        found = reward_functions(config, FakeReward() if config.uses_model else None, CharTokenizer(), Format(), monitor)
        return [f.__name__ for f in found], reward_weights(found)

    assert functions() == (["reward_model"], [1.0])  # today's default, unchanged
    assert functions(monitor=("if_val_seen",)) == (["reward_model", "checker"], [1.0, 0.0])  # counted, never optimised
    assert functions("--reward", "checker") == (["checker"], [1.0])
    assert functions("--reward", "checker+model", "--reward_weights", "2", "0.5") == (["reward_model", "checker"], [0.5, 2.0])
    for bad in (["--reward_weights", "1"], ["--reward_weights", "0", "0"], ["--reward_weights", "a", "b"],
                ["--reward", "rm"], ["--reward_shape", "half"]):
        with pytest.raises(ConfigError):
            parse_rloo_config(["--output_dir", str(tmp_path), *bad])
    assert json.dumps(parse_rloo_config(["--reward_weights", "1,0.25"]).reward_weights) == "[1.0, 0.25]"


def test_monitoring_rows_leave_per_prompt_means_for_the_monitors_paired_tests(tmp_path):
    from rlhf.monitor_record import PER_PROMPT_FILE, PerPromptScores, merge_rows, read_passes

    tokenizer, per_prompt = CharTokenizer(), PerPromptScores()
    reward = VerifiableReward(tokenizer, stop_ids=[0], weight=0.0, per_prompt=per_prompt)
    ids = [tokenizer.encode(text) + [0] for text in RESPONSES]
    reward(["p"] * 3, RESPONSES, ids, **columns([ROW] * 3, "if_val_seen"))  # one prompt, 3 completions: 2, 1, 0 of 2 followed
    reward(["p"], RESPONSES[:1], ids[:1], **columns([ROW]))  # a training row: not recorded
    per_prompt.add("reward_model", ["p"] * 3, columns([ROW] * 3, "if_val_seen"), [0.2, 0.4, 0.9], 1.0)
    assert per_prompt.rows() == [{"set": "if_val_seen", "key": "7", "completions": 3, "checker": pytest.approx(0.5),
                                  "pass": pytest.approx(1 / 3), "reward_model": pytest.approx(0.5)}]
    per_prompt.flush(0, tmp_path)
    per_prompt.add("reward_model", ["q"], {"monitor_set": ["held-back"]}, [1.0], 1.0)  # no key column: the prompt text
    per_prompt.flush(3, tmp_path)
    with (tmp_path / PER_PROMPT_FILE).open("a") as out:
        out.write('{"step": 4, "prom')  # cut by a kill mid-write: counted, not read
    passes, unreadable = read_passes(tmp_path)
    assert [p["step"] for p in passes] == [0, 3] and unreadable == 1
    assert passes[0]["weights"] == {"checker": 0.0, "reward_model": 1.0} and passes[1]["prompts"][0]["key"] == "q"
    per_prompt.flush(0, tmp_path)  # nothing since the last flush: nothing written
    per_prompt.add("reward_model", ["q"], {"monitor_set": ["held-back"]}, [1.0], 1.0)
    per_prompt.flush(0, tmp_path)  # step 0 starts the file again (a new run, not a resumed one)
    assert [p["step"] for p in read_passes(tmp_path)[0]] == [0]
    merged = merge_rows([[{"set": "s", "key": "k", "completions": 2, "pass": 1.0}],
                         [{"set": "s", "key": "k", "completions": 6, "pass": 0.0}]])
    assert merged == [{"set": "s", "key": "k", "completions": 8, "pass": pytest.approx(0.25)}]
