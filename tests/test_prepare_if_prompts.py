"""scripts/prepare_if_prompts.py: held-out types stay out of training, a planted overlap is decontaminated,
the rows are in the release format, and the same inputs and seed give the same bytes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.cli import run_cli
from core.release_format import checked_samples, numbered_rows
from scripts import prepare_if_prompts as prep
from scripts.decontaminate import is_contaminated, overlap_share, ngram_set

PLANTED = "Write a short story about a lonely lighthouse keeper who finds a message in a bottle"
TOPICS = ("apples", "rivers", "engines", "poems", "clouds", "castles", "robots", "gardens", "oceans", "violins")


@pytest.fixture()
def raw_dir(tmp_path) -> Path:
    records = [{"instruction": f"Describe {topic} number {i} in your own words.", "input": "" if i % 2 else f"Context {i}.",
                "output": "An answer."} for i, topic in enumerate(TOPICS * 8)]
    records.append({"instruction": PLANTED + ".", "input": "", "output": "Once upon a time."})
    records.append({"instruction": "An instruction without an answer.", "input": "", "output": ""})
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "tiny.json").write_text(json.dumps(records), encoding="utf-8")
    (raw / "test_prompts.jsonl").write_text(json.dumps({"key": 1, "prompt": PLANTED.lower() + ", in 300 words.",
                                                        "instruction_id_list": [], "kwargs": []}) + "\n", encoding="utf-8")
    return raw


def prepare(raw_dir: Path, out: Path, *extra: str) -> dict:
    prep.main(["--raw_dir", str(raw_dir), "--sources", "tiny.json", "--out_dir", str(out), "--num_train", "40",
               "--num_val", "8", "--decontaminate", str(raw_dir / "test_prompts.jsonl"), *extra])
    return json.loads((out / prep.OUTPUT_FILES["stats"]).read_text())


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_files_split_types_and_instructions_and_account_for_every_record(raw_dir, tmp_path):
    stats = prepare(raw_dir, tmp_path / "out")
    files = {split: rows(tmp_path / "out" / prep.OUTPUT_FILES[split]) for split in prep.SPLITS}
    held, seen = set(stats["held_out_types"]), set(stats["seen_types"])
    assert all(not held & set(r["instruction_id_list"]) for r in files["train"] + files["val_seen"])
    assert all(set(r["instruction_id_list"]) <= held for r in files["val_heldout"])
    assert all(set(r["instruction_id_list"]) <= set(stats["ood_types"]) for r in files["val_ood"])
    assert seen | held == set(prep.registries()[0]) and not seen & held
    sources = [r["source_id"] for rs in files.values() for r in rs]
    assert len(sources) == len(set(sources))  # no instruction in two files
    for split, rs in files.items():
        assert all(r["prompt"] == r["instruction"] and r["input"] == "" for r in rs)
        assert all(1 <= len(r["instruction_id_list"]) <= 3 for r in rs)
        checked_samples("ifbench" if split == "val_ood" else "ifeval",
                        numbered_rows(tmp_path / "out" / prep.OUTPUT_FILES[split], split))
    counted = sum(f["rows"] for f in stats["files"].values()) + stats["unused_instructions"]
    assert counted + sum(stats["dropped"].values()) + stats["decontamination"]["dropped"] == stats["instructions_read"] == 82
    # 80 usable (82 read, 1 without an answer, 1 contaminated): 3 x 8 to validation, 40 train, 16 unused
    assert stats["files"]["if_train.jsonl"]["rows"] == 40 and stats["unused_instructions"] == 16
    assert stats["dropped"] == {"empty_output": 1}


def test_input_is_folded_into_the_prompt(raw_dir, tmp_path):
    prepare(raw_dir, tmp_path / "out")
    with_input = [r for split in prep.SPLITS for r in rows(tmp_path / "out" / prep.OUTPUT_FILES[split])
                  if "\n\nContext " in r["prompt"]]
    assert with_input and all(r["prompt"].startswith("Describe ") for r in with_input)


def test_planted_overlap_is_dropped_with_its_reason(raw_dir, tmp_path):
    stats = prepare(raw_dir, tmp_path / "out")
    assert stats["decontamination"]["dropped"] == 1
    rejected = rows(tmp_path / "out" / prep.OUTPUT_FILES["rejected"])
    assert [r["record"]["instruction"] for r in rejected if r["reason"] == "contaminated_8gram"] == [PLANTED + "."]
    kept = [r["prompt"] for split in prep.SPLITS for r in rows(tmp_path / "out" / prep.OUTPUT_FILES[split])]
    assert not any(PLANTED in prompt for prompt in kept)


def test_tulu_rule_needs_more_than_half_the_tokens_in_shared_8grams():
    grams = ngram_set(["one two three four five six seven eight"])
    assert overlap_share("One two, three four five six seven eight nine ten", grams) == 0.8
    assert is_contaminated("one two three four five six seven eight a b c d e f g", grams)  # 8 of 15
    assert not is_contaminated("one two three four five six seven eight a b c d e f g h", grams)  # 8 of 16: half
    assert not is_contaminated("one two three", grams)  # shorter than an 8-gram


def test_same_inputs_and_seed_give_the_same_bytes(raw_dir, tmp_path):
    prepare(raw_dir, tmp_path / "a")
    prepare(raw_dir, tmp_path / "b")
    for name in prep.OUTPUT_FILES.values():
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    prepare(raw_dir, tmp_path / "c", "--seed", "5")
    assert (tmp_path / "c" / "if_train.jsonl").read_bytes() != (tmp_path / "a" / "if_train.jsonl").read_bytes()


def test_held_out_list_is_obeyed(raw_dir, tmp_path):
    stats = prepare(raw_dir, tmp_path / "out", "--held_out", "punctuation:no_comma,startend:quotation")
    assert stats["held_out_types"] == ["punctuation:no_comma", "startend:quotation"]
    train = rows(tmp_path / "out" / "if_train.jsonl")
    assert not any({"punctuation:no_comma", "startend:quotation"} & set(r["instruction_id_list"]) for r in train)


def test_unknown_held_out_type_is_one_line_and_writes_nothing(raw_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(prep.main, ["--raw_dir", str(raw_dir), "--sources", "tiny.json", "--out_dir", str(tmp_path / "out"),
                            "--held_out", "made:up"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --held_out: unknown IFEval instruction type(s) made:up") and "\n" not in err
    assert not (tmp_path / "out").exists()
