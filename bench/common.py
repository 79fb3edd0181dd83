"""What the benchmark scripts share: benchmark data, child processes with their peak memory,
medians, tables, machine description and result files.

Every measured run happens in a fresh child process, so its peak resident memory (``ru_maxrss``
from ``os.wait4``) is its own and not the high-water mark of an earlier run in the same process.
"""
from __future__ import annotations

import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a file: make `sft` and `bench` importable
    sys.path.insert(0, str(REPO_ROOT))

from core.cli import UserError  # noqa: E402
from core.config import write_json_atomic  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
# An optional folder of local material (data/, tokenizers/tinyllama/) for offline machines, named by
# BENCH_SHARED_DIR; every script also takes explicit paths (a user's clone has data/processed/ after
# scripts/prepare_sft_data.py, and downloads the tokenizer from the hub).
SHARED_DIR = Path(os.environ["BENCH_SHARED_DIR"]) if os.environ.get("BENCH_SHARED_DIR") else None
# The real TinyLlama (Llama-2) tokenizer: the local copy if there is one, else from the hub.
_LOCAL_TOKENIZER = SHARED_DIR / "tokenizers" / "tinyllama" if SHARED_DIR else None
DEFAULT_TOKENIZER = str(_LOCAL_TOKENIZER) if _LOCAL_TOKENIZER and _LOCAL_TOKENIZER.is_dir() else "TinyLlama/TinyLlama_v1.1"
PROCESSED_TRAIN = REPO_ROOT / "data" / "processed" / "sft_train.jsonl"
RAW_ALPACA_CANDIDATES = (REPO_ROOT / "data" / "raw" / "alpaca_data.json",
                         *((SHARED_DIR / "data" / "alpaca_data.json",) if SHARED_DIR else ()))


# ----------------------------------------------------------------------------- data


def default_data_path() -> Path:
    """Prepared SFT rows if present, else the raw Alpaca file (rendered through our template)."""
    for path in (PROCESSED_TRAIN, *RAW_ALPACA_CANDIDATES):
        if path.is_file():
            return path
    raise UserError(
        f"no benchmark data: run scripts/prepare_sft_data.py (writes {PROCESSED_TRAIN}) or pass --data "
        "PATH to an alpaca_data.json-style file"
    )


def _rows_from_file(path: Path) -> list[dict]:
    """Rows with ``prompt`` and ``response``: a prepared ``.jsonl`` (read and checked by the
    training code's own reader) or a raw Alpaca ``.json`` list rendered through our template."""
    from sft.dataset import read_sft_rows
    from core.prompting import load_template

    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    template = load_template()
    if path.suffix == ".jsonl":  # template-free prepared rows: rendered here exactly as training renders them
        return [{"prompt": template.render(r["instruction"], r["input"]), "response": r["output"],
                 "instruction": r["instruction"], "input": r["input"], "output": r["output"]}
                for r in read_sft_rows(path) if "messages" not in r]
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"cannot parse {path}: {exc}") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and "instruction" in r for r in records):
        raise UserError(f"{path} is not an Alpaca-style JSON list of {{instruction, input, output}} records")
    return [
        {"prompt": template.render(r["instruction"], r.get("input") or ""), "response": r["output"],
         "instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]}
        for r in records
        if isinstance(r.get("output"), str) and r["output"].strip()  # an empty answer teaches nothing
    ]


def sample_rows(n: int, seed: int, data: str | Path | None = None) -> tuple[list[dict], Path]:
    """A fixed random sample of ``n`` {prompt, response} rows: same file and seed, same rows."""
    path = Path(data) if data else default_data_path()
    rows = _rows_from_file(path)
    if len(rows) < n:
        raise UserError(f"{path} has {len(rows)} usable rows; the benchmark needs {n}")
    return random.Random(seed).sample(rows, n), path


def write_sft_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    """Rows in the prepare script's format, so our training entry point reads them as users' data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for i, row in enumerate(rows):
            record = {"id": f"bench-{i}", "source": "bench", "instruction": row["instruction"], "input": row["input"],
                      "output": row["output"]}  # template-free, as prepared data is
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


# ----------------------------------------------------------------------------- models


# Random Llama shapes, with the vocabulary of the tokenizer (32,000 for Llama-2 / TinyLlama).
SHAPES: dict[str, dict[str, int]] = {
    # ~45M parameters: big enough that the LM head and projections dominate, as in real models,
    # small enough for repeated runs on a 2-core CPU.
    "small": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 4},
    # TinyLlama-1.1B's shape, for GPUs.
    "tinyllama": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                  "num_attention_heads": 32, "num_key_value_heads": 4},
    # TinyLlama's 22 layers (154 LoRA-wrapped projections) at 1/16 of its width: the same operator
    # calls per step with almost no arithmetic, so on a CPU a step's time is its fixed overhead
    # (Python, dispatch, the training loop): what a GPU step is bound by when its matrix work is small.
    "tinyllama_thin": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 22,
                       "num_attention_heads": 2, "num_key_value_heads": 1},
}


def build_random_llama(out_dir: Path, tokenizer_path: str, shape: str, seed: int) -> Path:
    """A randomly initialised Llama of ``shape`` saved with the tokenizer (no download)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load tokenizer {tokenizer_path}: {str(exc).splitlines()[0]}") from None
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **SHAPES[shape])
    model = LlamaForCausalLM(config)
    if shape == "tinyllama":  # 2.2 GB on disk instead of 4.4; runs load it in their own precision
        model = model.to(torch.bfloat16)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def count_parameters(model_dir: Path) -> int:
    """Parameters of a saved model, counted on the meta device (nothing is loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- measuring


def peak_rss_mb(maxrss: int | None = None) -> float:
    """Peak resident memory in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if maxrss is None else maxrss
    return value / (1024 * 1024) if sys.platform == "darwin" else value / 1024


def gpu_peak_mb() -> float | None:
    """Peak GPU memory allocated by torch in this process, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / (1024 * 1024)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


@dataclass
class ChildRun:
    returncode: int
    wall_s: float
    peak_rss_mb: float
    log: str  # the child's stdout + stderr
    others_cpu_share: float | None = None  # CPU share other processes used while it ran (Linux)


def cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat; None off Linux."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def busy_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Share of all CPUs' time that was busy between two ``cpu_ticks`` readings."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def wait_until_idle(threshold: float = 0.15, window_s: float = 3.0, max_wait_s: float = 900.0) -> float:
    """Wait until the CPUs are mostly idle (other users of a shared machine distort timings).

    Returns the seconds waited; gives up after ``max_wait_s`` (the run then goes ahead, and the
    share of CPU others used during it is recorded with its result).
    """
    started = time.perf_counter()
    while time.perf_counter() - started < max_wait_s:
        before = cpu_ticks()
        time.sleep(window_s)
        share = busy_share(before, cpu_ticks())
        if share is None or share < threshold:
            break
    return time.perf_counter() - started


def run_child(argv: Sequence[str], env: dict[str, str] | None = None, cwd: Path = REPO_ROOT) -> ChildRun:
    """Run a command to completion; its wall time, its own peak RSS (via ``os.wait4``) and the
    CPU share other processes took meanwhile (a busy machine makes any timing unreliable).

    Output goes to a temporary file rather than a pipe, so a chatty child cannot block on a
    full pipe while we wait for it.
    """
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as log:
        ticks_before = cpu_ticks()
        started = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        ticks_after = cpu_ticks()
        proc.returncode = os.waitstatus_to_exitcode(status)  # tell Popen it is reaped
        log.seek(0)
        busy = busy_share(ticks_before, ticks_after)
        others = None
        if busy is not None:
            child_cpu_share = (usage.ru_utime + usage.ru_stime) / (wall * (os.cpu_count() or 1))
            others = max(0.0, busy - child_cpu_share)
        return ChildRun(proc.returncode, wall, peak_rss_mb(usage.ru_maxrss), log.read(), others)


def child_env(threads: int) -> dict[str, str]:
    """Environment for a measured child: fixed thread count, offline, quiet."""
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    })
    return env


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# ----------------------------------------------------------------------------- reporting


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table with aligned columns (readable in a terminal, pastes into a README)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(text.ljust(width) for text, width in zip(row, widths)) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, threads, memory, GPU and library versions (core/environment.py)."""
    import torch

    from core.environment import cpu_model, gpu_name, package_version, ram_gib

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": ram_gib(),
        "gpu": gpu_name(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    for package in ("torch", "transformers", "peft", "trl", "accelerate", "datasets"):
        info[package] = package_version(package)
    return info


BUSY_SHARE = 0.10  # other processes' CPU share above which a timing is flagged (and, with retries, rerun)


def print_run_footer(rows: dict[str, dict[str, Any]], info: dict[str, Any], command: str) -> None:
    """Warn about rows timed while other processes were busy, then name the machine and the command."""
    busy = [str(name) for name, row in rows.items() if row["others_cpu_share_median"] > BUSY_SHARE]
    if busy:
        print(f"warning: other processes used over {BUSY_SHARE:.0%} of the CPUs during most runs of "
              f"{', '.join(busy)}: those timings are unreliable (rerun on an idle machine, or with --wait_idle 600)")
    print(f"machine: {describe_machine(info)}")
    print(f"command: {command}")


def describe_machine(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    return (
        f"{info['cpu']} ({info['cpu_count']} cores, torch threads {info['torch_threads']}), "
        f"{info['ram_gib']} GiB RAM{gpu}; {info['platform']}; python {info['python']}, torch {info['torch']}, "
        f"transformers {info['transformers']}, peft {info['peft']}, trl {info['trl']}"
    )


def write_results(name: str, payload: dict, results_dir: Path = RESULTS_DIR) -> Path:
    """``<results_dir>/<name>.json`` (the latest run) plus a timestamped copy kept for history."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = {"benchmark": name, "timestamp": stamp, **payload}
    write_json_atomic(results_dir / f"{name}-{stamp}.json", payload)
    latest = results_dir / f"{name}.json"
    write_json_atomic(latest, payload)
    return latest


def command_line(prog: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces this run, for the results file and the README."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python -m", prog, *args])
