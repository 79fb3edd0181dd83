"""The SFT data-preparation stage (scripts/prepare_sft_data.py) and its file helpers (scripts/data_io.py).

Every test builds its own small raw files in tmp_path; nothing touches the network.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so `import scripts...` works under plain `pytest` too
    sys.path.insert(0, str(REPO_ROOT))

from scripts import data_io, prepare_sft_data  # noqa: E402
from scripts.prepare_sft_data import OUTPUT_FILES, main  # noqa: E402
from scripts.raw_sources import RAW_FILES, RawFile  # noqa: E402
from core.cli import UserError, run_cli  # noqa: E402
from core.prompting import render_prompt  # noqa: E402

ALPACA, CODE_RAW, CODE = "alpaca_data.json", "code_alpaca_20k.json", "cleaned_data.json"


def record(i, instruction=None, input="", output=None):
    return {"instruction": instruction or f"Instruction {i}.", "input": input, "output": output or f"Answer {i}."}


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value, indent=2), encoding="utf-8")
    return path


def make_raw(tmp_path: Path, alpaca=None, code=None, code_name=CODE) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    write_json(raw / ALPACA, alpaca if alpaca is not None else [record(i) for i in range(40)])
    write_json(raw / code_name, code if code is not None else [record(i, output=f"print({i})") for i in range(100, 120)])
    return raw


def prepare(raw: Path, out: Path, *extra: str) -> dict:
    assert main(["--raw_dir", str(raw), "--out_dir", str(out), *extra]) == 0
    return json.loads((out / "stats.json").read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def all_rows(out: Path) -> list[dict]:
    return read_jsonl(out / "sft_train.jsonl") + read_jsonl(out / "sft_val.jsonl")


def run_as_cli(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    return exit_info.value.code, capsys.readouterr().err


# ----------------------------------------------------------------------------- rows and template


def test_rows_are_template_free_with_every_field_later_stages_use(tmp_path):
    raw = make_raw(tmp_path, alpaca=[record(1, "Translate.", "  Bonjour  ", " Hello \n")], code=[record(2, "Say hi.")])
    write_json(raw / "braces.json", [record(3, "Fill {name} in {0}.", "{input}", "{}")])
    prepare(raw, tmp_path / "out", "--val_ratio", "0.5", "--sources", ALPACA, CODE, "braces.json")
    rows = {row["instruction"]: row for row in all_rows(tmp_path / "out")}
    with_input, without_input = rows["Translate."], rows["Say hi."]
    assert rows["Fill {name} in {0}."]["input"] == "{input}" and rows["Fill {name} in {0}."]["output"] == "{}"

    # No rendered prompt: the training run's --template renders the row (core/prompting.py).
    assert set(with_input) == {"id", "source", "instruction", "input", "output"}
    assert with_input["input"] == "Bonjour" and with_input["output"] == "Hello"
    assert "### Input:\nBonjour\n\n### Response:\n" in render_prompt(with_input["instruction"], with_input["input"])
    assert with_input["source"] == ALPACA and without_input["source"] == CODE


def test_null_or_missing_input_selects_the_no_input_variant(tmp_path):
    alpaca = [{"instruction": "A.", "input": None, "output": "a"}, {"instruction": "B.", "output": "b"}]
    prepare(make_raw(tmp_path, alpaca=alpaca, code=[]), tmp_path / "out", "--val_ratio", "0.5")
    for row in all_rows(tmp_path / "out"):
        assert row["input"] == "" and "### Input:" not in render_prompt(row["instruction"], row["input"])


def test_ids_follow_content_not_position(tmp_path):
    records = [record(i) for i in range(30)]
    prepare(make_raw(tmp_path / "a", alpaca=records), tmp_path / "out_a", "--seed", "1")
    prepare(make_raw(tmp_path / "b", alpaca=records[::-1]), tmp_path / "out_b", "--seed", "2")
    ids_a = {row["instruction"]: row["id"] for row in all_rows(tmp_path / "out_a")}
    ids_b = {row["instruction"]: row["id"] for row in all_rows(tmp_path / "out_b")}
    assert ids_a == ids_b
    assert len(set(ids_a.values())) == len(ids_a)
    assert ids_a["Instruction 3."].startswith("alpaca-") and len(ids_a["Instruction 3."]) == len("alpaca-") + 12


def test_no_input_markers_in_alpaca_are_normalised_and_counted(tmp_path):
    alpaca = [record(1, input="<noinput>"), record(2, input="< No Input >"), record(3, input="real input")]
    stats = prepare(make_raw(tmp_path, alpaca=alpaca), tmp_path / "out")
    rows = {row["instruction"]: row for row in all_rows(tmp_path / "out")}
    assert rows["Instruction 1."]["input"] == ""
    assert rows["Instruction 3."]["input"] == "real input"
    assert stats["sources"][ALPACA]["repaired"]["no_input_marker"] == 2


# ----------------------------------------------------------------------------- rejections


BAD_RECORDS = [
    ("not_an_object", ["instruction", "input", "output"]),
    ("not_an_object", "just text"),
    ("missing_instruction", {"input": "", "output": "x"}),
    ("missing_instruction", {"instruction": None, "output": "x"}),
    ("instruction_not_string", {"instruction": 7, "output": "x"}),
    ("empty_instruction", {"instruction": " \n\t", "output": "x"}),
    ("input_not_string", {"instruction": "Do.", "input": ["a"], "output": "x"}),
    ("missing_output", {"instruction": "Do.", "input": ""}),
    ("output_not_string", {"instruction": "Do.", "output": {"text": "x"}}),
    ("empty_output", {"instruction": "Do.", "input": "", "output": "   "}),
    ("placeholder_output", {"instruction": "Draw.", "output": "<nooutput>"}),
    ("placeholder_output", {"instruction": "Render.", "output": "<nooutput> This type of instruction cannot be fulfilled by a GPT model."}),
    ("placeholder_output", {"instruction": "Paint.", "output": " <No Output - this is a visual task.>"}),
    ("placeholder_output", {"instruction": "Sing.", "output": "<nooutput - cannot create audio"}),
    ("placeholder_output", {"instruction": "Film.", "output": "No Output"}),
]


@pytest.mark.parametrize("reason, bad", BAD_RECORDS, ids=[f"{r}-{i}" for i, (r, _) in enumerate(BAD_RECORDS)])
def test_each_rejection_reason_is_counted_and_written_with_the_record(tmp_path, reason, bad):
    good = [record(i) for i in range(10)]
    stats = prepare(make_raw(tmp_path, alpaca=good[:5] + [bad] + good[5:]), tmp_path / "out")
    rejected = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert rejected == [{"source": ALPACA, "index": 5, "reason": reason, "record": bad}]
    counts = stats["sources"][ALPACA]
    assert counts["dropped"][reason] == 1 and sum(counts["dropped"].values()) == 1
    assert counts["read"] == 11 and counts["kept"] == 10


def test_outputs_that_only_mention_no_output_in_a_sentence_are_kept(tmp_path):
    alpaca = [record(1, output="No output is printed because the loop never runs."), record(2, output="It prints <nooutput>.")]
    stats = prepare(make_raw(tmp_path, alpaca=alpaca, code=[]), tmp_path / "out", "--val_ratio", "0.5")
    assert stats["totals"]["kept"] == 2


def test_read_equals_kept_plus_dropped_and_every_drop_is_in_rejected_jsonl(tmp_path):
    alpaca = [record(i) for i in range(20)] + [{"instruction": "", "output": "x"}, 5, record(3)]
    code = [record(i, output=f"f({i})") for i in range(10)] + [{"instruction": "Draw.", "output": "<no output>"}]
    stats = prepare(make_raw(tmp_path, alpaca=alpaca, code=code), tmp_path / "out")
    for counts in [*stats["sources"].values(), stats["totals"]]:
        assert counts["read"] == counts["kept"] + sum(counts["dropped"].values())
        assert counts["kept"] == counts["train"] + counts["val"]
    assert len(read_jsonl(tmp_path / "out" / "rejected.jsonl")) == sum(stats["totals"]["dropped"].values()) == 4


# ----------------------------------------------------------------------------- duplicates and leakage


def test_exact_duplicates_across_files_are_kept_once_and_counted(tmp_path):
    alpaca = [record(i) for i in range(10)] + [record(1, "Fix  this\ncode.", "x = 1", "x  = 2")]
    code = [record(1, " Fix this code. ", "x = 1\n", "x  =  2"), record(2, "Fix this code.", "x = 1", "y = 2")]
    stats = prepare(make_raw(tmp_path, alpaca=alpaca, code=code), tmp_path / "out")
    rows = [row for row in all_rows(tmp_path / "out") if row["instruction"].startswith("Fix")]
    assert sorted(row["output"] for row in rows) == ["x  = 2", "y = 2"]  # inner whitespace kept as written
    kept_first = next(row for row in rows if row["output"] == "x  = 2")
    assert kept_first["source"] == ALPACA
    assert stats["sources"][CODE]["dropped"]["duplicate"] == 1
    [rejected] = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert rejected["reason"] == "duplicate" and rejected["source"] == CODE and rejected["index"] == 0
    assert rejected["duplicate_of"] == kept_first["id"]


def test_duplicates_within_one_file_are_kept_once(tmp_path):
    alpaca = [record(1), record(2), record(1), record(1)]
    stats = prepare(make_raw(tmp_path, alpaca=alpaca, code=[]), tmp_path / "out", "--val_ratio", "0.5")
    assert stats["sources"][ALPACA]["kept"] == 2 and stats["sources"][ALPACA]["dropped"]["duplicate"] == 2


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_a_prompt_never_appears_in_both_train_and_val(tmp_path, seed):
    # 30 prompts with 4 different answers each (some spelled with extra whitespace), 60 singletons.
    alpaca = [record(i, f"Shared  prompt {i}.", "ctx", f"answer {k}") for i in range(30) for k in range(2)]
    code = [record(i, f"Shared prompt {i}.", " ctx ", f"other {k}") for i in range(30) for k in range(2)]
    code += [record(i) for i in range(1000, 1060)]
    stats = prepare(make_raw(tmp_path, alpaca=alpaca, code=code), tmp_path / "out", "--val_ratio", "0.3", "--seed", str(seed))

    def prompt_keys(name):
        return {(" ".join(r["instruction"].split()), " ".join(r["input"].split())) for r in read_jsonl(tmp_path / "out" / name)}

    assert not prompt_keys("sft_train.jsonl") & prompt_keys("sft_val.jsonl")
    assert stats["split"]["prompt_groups_with_several_records"] == 30
    assert stats["split"]["records_in_shared_prompt_groups"] == 120
    assert stats["split"]["prompts_in_both_splits"] == 0
    assert 0 <= stats["totals"]["val"] - 54 < 4  # about 30 % of 180: at most one group (of 4) over the target


def test_val_ratio_sets_the_split_size(tmp_path):
    stats = prepare(make_raw(tmp_path, alpaca=[record(i) for i in range(180)], code=[]), tmp_path / "out")
    assert (stats["totals"]["train"], stats["totals"]["val"]) == (162, 18)


# ----------------------------------------------------------------------------- determinism and atomic writes


def output_bytes(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in OUTPUT_FILES.values()}


def test_same_inputs_and_seed_give_byte_identical_outputs(tmp_path):
    alpaca = [record(i, input="ctx" if i % 3 else "") for i in range(60)] + [{"instruction": "", "output": "x"}]
    raw = make_raw(tmp_path, alpaca=alpaca, code=[record(i, output="<noinput>") for i in range(200, 230)], code_name=CODE_RAW)
    prepare(raw, tmp_path / "one")  # builds cleaned_data.json on the way
    prepare(raw, tmp_path / "two")  # uses the built file
    assert output_bytes(tmp_path / "one") == output_bytes(tmp_path / "two")
    prepare(raw, tmp_path / "three", "--seed", "7")
    assert (tmp_path / "three" / "sft_train.jsonl").read_bytes() != (tmp_path / "one" / "sft_train.jsonl").read_bytes()


@pytest.mark.parametrize(
    "broken, message",
    [
        ('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]',
         r"alpaca_data\.json: not valid JSON at line 3, column 23: Expecting ',' delimiter"),
        ('{"instruction": "a", "output": "b"}', r"alpaca_data\.json: top level is an object at line 1, column 1; expected a list"),
        # an empty or whitespace-only file says so (it read "not valid JSON at line 1" / "line 3, column 3")
        ("", r"error: \S+alpaca_data\.json is empty$"),
        ("\n\n  ", r"error: \S+alpaca_data\.json is empty$"),
    ],
)
def test_a_malformed_file_fails_in_one_line_and_leaves_earlier_outputs_untouched(tmp_path, capsys, broken, message):
    raw, out = make_raw(tmp_path), tmp_path / "out"
    prepare(raw, out)
    before = output_bytes(out)
    capsys.readouterr()
    (raw / ALPACA).write_text(broken)

    code, err = run_as_cli(["--raw_dir", str(raw), "--out_dir", str(out)], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err), err
    assert output_bytes(out) == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_a_malformed_code_file_is_named_when_building_cleaned_data(tmp_path, capsys):
    raw = make_raw(tmp_path, code_name=CODE_RAW)
    (raw / CODE_RAW).write_text("[1, 2,,]")
    code, err = run_as_cli(["--raw_dir", str(raw), "--out_dir", str(tmp_path / "out")], capsys)
    assert code == 2 and "code_alpaca_20k.json: not valid JSON at line 1, column 7" in err
    assert not (raw / CODE).exists() and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- raw files, flags, download


def test_cleaned_data_is_built_from_the_raw_code_file_when_missing(tmp_path, capsys):
    code = [record(1, " Reverse. ", "<noinput>", "s[::-1]"), record(2, "Add.", "No input", "    a + b\n")]
    raw = make_raw(tmp_path, code=code, code_name=CODE_RAW)
    stats = prepare(raw, tmp_path / "out", "--val_ratio", "0.5")
    assert json.loads((raw / CODE).read_text()) == [
        {"instruction": "Reverse.", "input": "", "output": "s[::-1]"},
        {"instruction": "Add.", "input": "", "output": "a + b"},
    ]
    assert "built" in capsys.readouterr().out
    assert stats["sources"][CODE]["kept"] == 2


def test_missing_raw_files_are_named_with_their_source_and_the_download_flag(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    code, err = run_as_cli(["--raw_dir", str(raw), "--out_dir", str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "alpaca_data.json" in err and RAW_FILES[ALPACA].url in err
    assert "cleaned_data.json" in err and "code_alpaca_20k.json" in err and RAW_FILES[CODE_RAW].url in err
    assert "--download" in err


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    raw = make_raw(tmp_path)
    for argv in (["--val_ratio", "1.5"], ["--val_ratio", "0"], ["--sources", ALPACA, ALPACA]):
        code, err = run_as_cli(["--raw_dir", str(raw), "--out_dir", str(tmp_path / "out"), *argv], capsys)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1


def test_sources_flag_selects_files(tmp_path):
    raw = make_raw(tmp_path)
    write_json(raw / "extra.json", [record(i, output="extra") for i in range(500, 510)])
    stats = prepare(raw, tmp_path / "out", "--sources", "extra.json")
    assert list(stats["sources"]) == ["extra.json"] and stats["totals"]["kept"] == 10
    assert all(row["id"].startswith("extra-") for row in all_rows(tmp_path / "out"))


def test_all_records_rejected_is_a_clear_error(tmp_path):
    raw = make_raw(tmp_path, alpaca=[{"instruction": "a", "output": ""}], code=[])
    with pytest.raises(UserError, match="no usable records.*empty_output 1"):
        main(["--raw_dir", str(raw), "--out_dir", str(tmp_path / "out")])


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def code_only_raw(tmp_path: Path) -> Path:
    raw = make_raw(tmp_path)
    (raw / CODE).unlink()
    return raw


def test_download_without_network_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    raw = code_only_raw(tmp_path)
    code, err = run_as_cli(["--raw_dir", str(raw), "--out_dir", str(tmp_path / "out"), "--download"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "could not download https://" in err and "name resolution" in err
    assert sorted(p.name for p in raw.iterdir()) == [ALPACA]  # no partial download left


def test_download_rejects_a_checksum_mismatch(tmp_path, capsys, monkeypatch):
    body = json.dumps([record(1, output="print(1)")]).encode()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: FakeResponse(body))
    pinned = RawFile(url=RAW_FILES[CODE_RAW].url, sha256="0" * 64, expected_records=1, licence="test")
    monkeypatch.setitem(prepare_sft_data.RAW_FILES, CODE_RAW, pinned)
    raw = code_only_raw(tmp_path)
    code, err = run_as_cli(["--raw_dir", str(raw), "--out_dir", str(tmp_path / "out"), "--download"], capsys)
    assert code == 2 and "SHA-256 mismatch" in err and hashlib.sha256(body).hexdigest() in err
    assert sorted(p.name for p in raw.iterdir()) == [ALPACA]


def test_download_with_a_matching_checksum_is_used(tmp_path, capsys, monkeypatch):
    body = json.dumps([record(1, input="<noinput>", output="print(1)")]).encode()
    requested = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: requested.append(url) or FakeResponse(body))
    pinned = RawFile(url=RAW_FILES[CODE_RAW].url, sha256=hashlib.sha256(body).hexdigest(), expected_records=1, licence="test")
    monkeypatch.setitem(prepare_sft_data.RAW_FILES, CODE_RAW, pinned)
    stats = prepare(code_only_raw(tmp_path), tmp_path / "out", "--download")
    assert requested == [RAW_FILES[CODE_RAW].url]
    assert "SHA-256 verified" in capsys.readouterr().out
    assert stats["sources"][CODE]["kept"] == 1


def test_download_without_a_pinned_checksum_says_it_was_not_verified(tmp_path, capsys, monkeypatch):
    body = json.dumps([record(1, output="print(1)")]).encode()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: FakeResponse(body))
    unpinned = RawFile(url=RAW_FILES[CODE_RAW].url, sha256=None, expected_records=1, licence="test")
    monkeypatch.setitem(prepare_sft_data.RAW_FILES, CODE_RAW, unpinned)
    prepare(code_only_raw(tmp_path), tmp_path / "out", "--download")
    err = capsys.readouterr().err
    assert hashlib.sha256(body).hexdigest() in err and "could not be verified" in err


# ----------------------------------------------------------------------------- summary and entry points


def test_summary_table_shows_per_source_figures_and_matches_stats_json(tmp_path, capsys):
    alpaca = [record(i) for i in range(18)] + [{"instruction": "x", "output": "<nooutput>"}]
    stats = prepare(make_raw(tmp_path, alpaca=alpaca), tmp_path / "out")
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if ALPACA in line)
    assert CODE in header and "total" in header
    assert next(line for line in lines if line.startswith("dropped: placeholder_output")).split()[2:] == ["1", "0", "1"]
    read = next(line for line in lines if line.startswith("read")).split()[1:]
    assert read == [str(stats["sources"][ALPACA]["read"]), str(stats["sources"][CODE]["read"]), str(stats["totals"]["read"])]
    train = next(line for line in lines if line.startswith("train")).split()[1:]
    assert train[-1] == str(stats["totals"]["train"])
    assert stats["outputs"] == OUTPUT_FILES


@pytest.mark.parametrize("command", [["scripts/prepare_sft_data.py"], ["-m", "scripts.prepare_sft_data"]])
def test_help_works_as_a_file_and_as_a_module(command):
    result = subprocess.run([sys.executable, *command, "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in ("--raw_dir", "--out_dir", "--val_ratio", "--seed", "--sources", "--download"):
        assert flag in result.stdout


# ----------------------------------------------------------------------------- data_io helpers


def test_write_jsonl_atomic_keeps_unicode_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "rows.jsonl"
    assert data_io.write_jsonl_atomic(path, [{"b": "é 日本", "a": 1}, {"c": None}]) == 2
    assert path.read_text(encoding="utf-8") == '{"b": "é 日本", "a": 1}\n{"c": null}\n'
    assert [p.name for p in path.parent.iterdir()] == ["rows.jsonl"]


def test_an_interrupted_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    data_io.write_jsonl_atomic(path, [{"old": True}])
    with pytest.raises(TypeError):
        data_io.write_jsonl_atomic(path, [{"new": object()}])  # fails while serialising
    with pytest.raises(TypeError):
        data_io.write_json_atomic(path, {"new": object()})
    assert path.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_load_json_records_reports_problems_with_their_position(tmp_path):
    with pytest.raises(UserError, match=r"missing\.json: file not found"):
        data_io.load_json_records(tmp_path / "missing.json")
    (tmp_path / "s.json").write_text('\n  "text"')
    with pytest.raises(UserError, match=r"top level is a string at line 2, column 3"):
        data_io.load_json_records(tmp_path / "s.json")
    (tmp_path / "latin1.json").write_bytes(b'[\n{"a": "caf\xe9"}]')
    with pytest.raises(UserError, match=r"not UTF-8 text at line 2, column 11"):
        data_io.load_json_records(tmp_path / "latin1.json")
    (tmp_path / "bom.json").write_bytes(b'\xef\xbb\xbf[{"a": 1}]')
    assert data_io.load_json_records(tmp_path / "bom.json") == [{"a": 1}]


def test_load_jsonl_records_reads_plain_and_gzip_and_names_the_bad_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"x": 1}\n\n{"x": 2}\n')
    assert data_io.load_jsonl_records(tmp_path / "a.jsonl") == [{"x": 1}, {"x": 2}]
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b'{"x": 1}\n{"x": }\n'))
    with pytest.raises(UserError, match=r"b\.jsonl\.gz: not valid JSON at line 2, column 7"):
        data_io.load_jsonl_records(tmp_path / "b.jsonl.gz")


def test_format_table_aligns_labels_left_and_figures_right():
    table = data_io.format_table(["", "a", "total"], [["read", 52002, 7], ["kept", 3]])
    assert table.splitlines() == [
        "           a  total",
        "----  ------  -----",
        "read  52,002      7",
        "kept       3",
    ]


def test_download_refuses_plain_http(tmp_path):
    with pytest.raises(UserError, match="only https://"):
        data_io.download_file("http://example.com/x.json", tmp_path / "x.json")


def test_a_write_that_fails_midway_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "stats.json"
    data_io.write_json_atomic(path, {"old": True})

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data_io.os, "fsync", disk_full)
    with pytest.raises(UserError, match=r"cannot write .*stats\.json: No space left on device"):
        data_io.write_json_atomic(path, {"new": True})
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]
