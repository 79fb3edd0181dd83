"""scripts/publish_study.py: what a committed study holds (never weights or data) and no path of the machine."""
from __future__ import annotations

import json

import pytest

from core.cli import UserError
from scripts import publish_study


@pytest.fixture()
def study(tmp_path):
    root = tmp_path / "machine" / "study_small"
    (root / "report" / "charts").mkdir(parents=True)
    (root / "sft").mkdir()
    (root / "sft" / "adapter_model.safetensors").write_bytes(b"weights")
    (root / "data").mkdir()
    (root / "data" / "sft_train.jsonl").write_text("{}\n")
    (root / "report" / "charts" / "paired_differences.png").write_bytes(b"\x89PNG chart")
    (root / "report" / "generations.jsonl").write_text('{"prompt": "p", "response": "a/b and strict/loose"}\n')
    (root / "report" / "if_ifeval_generations.jsonl").write_text('{"key": 1, "response": "answer"}\n')  # megabytes
    (root / "report" / "report.md").write_text(
        f"# Study\nadapters: {root}/sft, {root}/dpo; base /home/someone/models/smollm2-135m-instruct/\n"
        f"![forest](charts/paired_differences.png) in {root}\n")
    (root / "study.json").write_text(json.dumps({"argv": ["--ifeval_data", "/srv/data/ifeval_input_data.jsonl"],
                                                 "out": str(root)}))
    return root


def test_the_publication_holds_the_report_charts_generations_and_record_and_no_weights(study, tmp_path, capsys):
    out = tmp_path / "results" / "smollm2"
    assert publish_study.main(["--study", str(study), "--out", str(out)]) == 0
    published = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert published == ["charts/paired_differences.png", "generations.jsonl", "report.md", "study.json"]
    assert (out / "charts" / "paired_differences.png").read_bytes() == b"\x89PNG chart"
    text = (out / "report.md").read_text() + (out / "study.json").read_text()
    assert str(tmp_path) not in text and "/home/" not in text and "/srv/" not in text
    assert "adapters: sft, dpo; base path/to/smollm2-135m-instruct" in text
    assert "in .\n" in text and '"out": "."' in text
    assert "path/to/ifeval_input_data.jsonl" in text
    assert "strict/loose" in (out / "generations.jsonl").read_text()  # a relative path is not a machine's
    assert "absolute paths rewritten: 4 inside the study (now relative), 2 elsewhere" in capsys.readouterr().out


def test_an_unfinished_study_or_an_earlier_publication_is_refused_in_one_line(study, tmp_path):
    (study / "report" / "report.md").unlink()
    with pytest.raises(UserError, match="has finished 0 of 0 stages"):
        publish_study.main(["--study", str(study), "--out", str(tmp_path / "out")])
    (study / "report" / "report.md").write_text("# Study\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("earlier")
    with pytest.raises(UserError, match="--overwrite"):
        publish_study.main(["--study", str(study), "--out", str(out)])
    assert publish_study.main(["--study", str(study), "--out", str(out), "--overwrite"]) == 0
    assert (out / "report.md").read_text() == "# Study\n"


def test_a_study_stopped_part_way_says_what_it_finished_and_how_to_resume_it(study, tmp_path):
    (study / "report" / "report.md").unlink()
    stages = {"prepare": "ran", "sft": "skipped", "eval_sft": "ran", "dpo_pairs": "interrupted", "dpo": "pending",
              "report": "pending"}
    record = {"argv": ["--quick", "--out_dir", "elsewhere", "--dpo_args", "--beta 0.2"],
              "stages": {name: {"status": status, "command": []} for name, status in stages.items()}}
    (study / "study.json").write_text(json.dumps(record))
    with pytest.raises(UserError) as error:
        publish_study.main(["--study", str(study), "--out", str(tmp_path / "out")])
    assert str(error.value) == (
        f"the study in {study} has finished 3 of 6 stages (prepare, sft, eval_sft); the dpo_pairs stage was interrupted: "
        f"resume it with `python scripts/run_study.py --quick --out_dir {study} --dpo_args '--beta 0.2' --resume`")
    record["stages"]["dpo_pairs"]["status"] = "running"
    (study / "study.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="the dpo_pairs stage is still running, or its process was killed"):
        publish_study.main(["--study", str(study), "--out", str(tmp_path / "out")])
    (study / "study.json").unlink()
    with pytest.raises(UserError, match=r"holds no study \(no study\.json\)"):
        publish_study.main(["--study", str(study), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_the_per_prompt_verdicts_stay_compressed_with_no_path_of_the_machine(study, tmp_path):
    import gzip

    row = json.dumps({"benchmark": "ifeval", "column": "sft", "key": 1, "source": f"{study}/report/x"})
    (study / "report" / "per_prompt.jsonl.gz").write_bytes(gzip.compress((row + "\n").encode()))
    out = tmp_path / "results" / "smollm2"
    assert publish_study.main(["--study", str(study), "--out", str(out)]) == 0
    text = gzip.decompress((out / "per_prompt.jsonl.gz").read_bytes()).decode()
    assert json.loads(text)["source"] == "report/x" and str(tmp_path) not in text
