"""Copy a finished study's results into a folder to commit (``results/<model>/``): never weights or data.

Run from the repository root:

    python scripts/publish_study.py --study runs/study_small --out results/smollm2-135m-instruct

It copies ``study.json`` (commands, seconds and commit per stage, versions, CPU, seeds) and from
``report/``: ``report.md``, ``metrics.json``, ``charts/*.png``, the example generations
(``generations.jsonl``) and the per-prompt verdicts compressed (``per_prompt.jsonl.gz``: what
``scripts/verify_study.py`` re-derives every number of the report from). The IF benchmarks' full
answers stay in the study folder with the adapters, checkpoints, training data and logs.

Paths of the machine the study ran on are rewritten in every copied text file: a path inside the study
folder becomes relative to it (``sft``, ``data/prefs_val.jsonl``), any other absolute path becomes
``path/to/<its last part>``. How many of each were rewritten is printed.
"""
from __future__ import annotations

import gzip
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from core.cli import UserError, make_parser, run_cli  # noqa: E402

REPORT_FILES = ("report.md", "metrics.json", "generations.jsonl", "per_prompt.jsonl.gz")
REPORT_PATTERNS = ("charts/*.png",)
# An absolute path of two or more parts, not the tail of a word or of a relative path ("strict/loose", "charts/a.png").
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])(/[\w.+-]+(?:/[\w.+-]+)+)/?")


def parse_args(argv: Sequence[str] | None = None):
    p = make_parser(description=__doc__.split("\n")[0])
    p.add_argument("--study", required=True, help="a finished study folder (run_study.py's --out_dir)")
    p.add_argument("--out", required=True, help="the folder to write, e.g. results/smollm2-135m-instruct")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier publication in --out")
    return p.parse_args(argv)


def files_to_publish(study: Path) -> list[Path]:
    """The study's files that go into the publication, relative to the study folder."""
    report = study / "report"
    if not (report / "report.md").is_file() or not (study / "study.json").is_file():
        raise UserError(unfinished(study))
    found = [Path("study.json")] + [Path("report") / name for name in REPORT_FILES if (report / name).is_file()]
    for pattern in REPORT_PATTERNS:
        found += sorted(path.relative_to(study) for path in report.glob(pattern))
    return found


# How a stage's status in study.json reads when the study has not finished (scripts/run_study.py writes them).
STATUS_WORDS = {"running": "is still running, or its process was killed: publish once the study has finished, or",
                "failed": "failed:", "interrupted": "was interrupted:", "pending": "has not run:"}


def unfinished(study: Path) -> str:
    """What a folder without a finished study holds, and the command that finishes it."""
    record_file = study / "study.json"
    if not record_file.is_file():
        return f"{study} holds no study (no study.json): run scripts/run_study.py --out_dir {study} first"
    from scripts.run_study import resume_command

    record = json.loads(record_file.read_text(encoding="utf-8"))
    stages = record.get("stages", {})
    done = [name for name, info in stages.items() if info.get("status") in ("ran", "skipped")]
    waiting = [name for name in stages if name not in done] or ["report"]
    status = stages.get(waiting[0], {}).get("status", "pending")
    return (f"the study in {study} has finished {len(done)} of {len(stages)} stages ({', '.join(done) or 'none'}); the "
            f"{waiting[0]} stage {STATUS_WORDS.get(status, 'has not finished:')} resume it with "
            f"`{resume_command(record.get('argv', []), study)}`")


def machine_free(text: str, study: Path, counts: dict[str, int]) -> str:
    """``text`` with the study's absolute paths made relative to it and any other absolute path cut to its name."""
    root = str(study)

    def rewrite(match: re.Match) -> str:
        path = match.group(1)
        if path == root or path.startswith(root + "/"):
            counts["inside the study"] += 1
            return path[len(root) + 1:] or "."
        counts["elsewhere"] += 1
        return f"path/to/{Path(path).name}"

    return ABSOLUTE_PATH.sub(rewrite, text)


def target_name(relative: Path) -> Path:
    """report/x -> x: the publication is the report folder itself, with study.json beside report.md."""
    return Path(*relative.parts[1:]) if relative.parts[0] == "report" else relative


def publish(study: Path, out: Path, overwrite: bool) -> tuple[list[Path], dict[str, int]]:
    study = study.resolve()
    files = files_to_publish(study)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} is not empty: pass --overwrite to replace an earlier publication")
    counts = {"inside the study": 0, "elsewhere": 0}
    written = []
    for relative in files:
        source, target = study / relative, out / target_name(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.suffix == ".png":
            shutil.copyfile(source, target)
        elif source.suffix == ".gz":  # the per-prompt verdicts: rewritten inside, compressed again (mtime 0: same bytes)
            text = machine_free(gzip.decompress(source.read_bytes()).decode("utf-8"), study, counts)
            target.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))
        else:
            target.write_text(machine_free(source.read_text(encoding="utf-8"), study, counts), encoding="utf-8")
        written.append(target)
    return written, counts


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    study, out = Path(args.study), Path(args.out)
    if not study.is_dir():
        raise UserError(f"--study {study}: no such folder")
    written, counts = publish(study, out, args.overwrite)
    size = sum(path.stat().st_size for path in written)
    print(f"published {len(written)} files ({size / 1e6:.1f} MB) to {out}; absolute paths rewritten: "
          f"{counts['inside the study']} inside the study (now relative), {counts['elsewhere']} elsewhere (now path/to/<name>)")
    return 0


if __name__ == "__main__":
    run_cli(main)
