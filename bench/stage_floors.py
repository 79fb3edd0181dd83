"""The floor of each phase of a stage run: counted tokens x FLOPs per token / this machine's matmul FLOP/s.

Pure arithmetic over what a run left (``metrics.json``, ``trainer_state.json``, ``adapter_config.json``);
``bench/profile_study.py`` measures the FLOP/s and prints the table.

FLOPs per token (as in ``bench/ceiling.py``; N = the weights used as matmuls, attention scores and
element-wise work not counted):

- a trained token: 4 per frozen weight + 6 per trained one (forward 2, input gradient 2, weight gradient 2):
  ~4N with LoRA, 6N for full fine-tuning;
- a forwarded or generated token (reference, reward model, evaluation, prefill and decode): 2N.

Which tokens each phase is charged with, by stage (a phase with no counted tokens has no floor):

- SFT: ``training_compute`` the non-padding tokens trained (``train_tokens_seen``); ``evaluation``
  the held-out set's tokens x the evaluations in the log.
- DPO: ``training_compute`` the chosen + rejected tokens trained; ``reference_forwards`` the same
  tokens once more (the reference's forward at every step; held-out reference forwards not counted).
- reward model: ``training_compute`` the tokens trained.
- RLOO: ``training_compute``, ``reference_forwards`` and ``generation_decode`` each the prompt +
  completion tokens of the training rollouts (``tokens_sampled_and_prompted``: a backward pass, the
  reference's forward, and prefill + decode); ``reward_forwards`` the same tokens through a reward
  model of the policy's size when the reward is a model (the checker has no floor); monitoring
  samples are not counted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# phase -> ("train" | "forward", the metrics key holding its tokens), per stage kind
PHASE_TOKENS: dict[str, dict[str, tuple[str, str]]] = {
    "sft": {"training_compute": ("train", "train_tokens_seen"), "evaluation": ("forward", "held_out_tokens_evaluated")},
    "dpo": {"training_compute": ("train", "train_tokens_seen"), "reference_forwards": ("forward", "train_tokens_seen")},
    "reward": {"training_compute": ("train", "train_tokens_seen")},
    "rloo": {"training_compute": ("train", "tokens_sampled_and_prompted"),
             "reference_forwards": ("forward", "tokens_sampled_and_prompted"),
             "generation_decode": ("forward", "tokens_sampled_and_prompted"),
             "reward_forwards": ("forward", "reward_model_tokens")},
}


@dataclass(frozen=True)
class ModelFlops:
    """Matmul weights of a stage's model: the frozen base and what the run trained (its LoRA adapter)."""

    frozen: int
    trained: int

    @property
    def train_per_token(self) -> int:
        return 4 * self.frozen + 6 * self.trained

    @property
    def forward_per_token(self) -> int:
        return 2 * (self.frozen + self.trained)

    def per_token(self, kind: str) -> int:
        return self.train_per_token if kind == "train" else self.forward_per_token


def lora_parameters(linear_shapes: dict[str, tuple[int, int]], adapter_config: dict | None) -> int:
    """LoRA's trained matmul weights: r x (in + out) per targeted linear layer (``linear_shapes``: name ->
    (in, out)); 0 without an adapter. ``all-linear`` targets every linear layer but the LM head."""
    if not adapter_config:
        return 0
    rank, targets = int(adapter_config.get("r") or 0), adapter_config.get("target_modules") or []
    if isinstance(targets, str) and targets != "all-linear":
        targets = [targets]

    def targeted(name: str) -> bool:
        if targets == "all-linear":
            return not name.endswith("lm_head")
        return name.rsplit(".", 1)[-1] in targets

    return sum(rank * (fan_in + fan_out) for name, (fan_in, fan_out) in linear_shapes.items() if targeted(name))


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def counted_tokens(kind: str | None, run_dir: Path, metrics: dict) -> dict[str, int]:
    """The token counts the floors use, by metrics key (derived ones added: the held-out tokens evaluated,
    the reward model's tokens)."""
    counts = {key: int(value) for key, value in metrics.items() if key.endswith(("tokens_seen", "_prompted"))
              and isinstance(value, (int, float))}
    if kind == "sft":
        val_tokens = ((metrics.get("data") or {}).get("val") or {}).get("tokens")
        history = (read_json(run_dir / "trainer_state.json") or {}).get("log_history", [])
        evaluations = sum(1 for entry in history if "eval_loss" in entry)
        if val_tokens and evaluations:
            counts["held_out_tokens_evaluated"] = int(val_tokens) * evaluations
    if kind == "rloo" and "tokens_sampled_and_prompted" in counts:
        run_config = read_json(run_dir / "rloo_config.json") or {}
        if "model" in str((run_config.get("config") or {}).get("reward", "model")):
            counts["reward_model_tokens"] = counts["tokens_sampled_and_prompted"]
    return counts


@dataclass(frozen=True)
class PhaseRow:
    phase: str
    seconds: float | None
    tokens: int | None
    floor_seconds: float | None

    @property
    def share(self) -> float | None:
        return self.floor_seconds / self.seconds if self.floor_seconds is not None and self.seconds else None


def phase_rows(kind: str | None, phases: dict[str, float] | None, tokens: dict[str, int], flops: ModelFlops | None,
               flop_per_s: float | None) -> list[PhaseRow]:
    """One row per phase (or, without phases, one per phase that has counted tokens, with no seconds)."""
    rules = PHASE_TOKENS.get(kind or "", {})
    names = list(phases) if phases else list(rules)
    rows = []
    for name in names:
        rule = rules.get(name)
        count = tokens.get(rule[1]) if rule else None
        floor = (count * flops.per_token(rule[0]) / flop_per_s
                 if count is not None and flops is not None and flop_per_s else None)
        if phases or count is not None:
            rows.append(PhaseRow(name, phases.get(name) if phases else None, count, floor))
    return rows


def stage_floor(rows: list[PhaseRow]) -> float | None:
    floors = [row.floor_seconds for row in rows if row.floor_seconds is not None]
    return sum(floors) if floors else None


def stage_output_dir(command: list[str]) -> str | None:
    """Where a study stage's command writes (``--output_dir`` or ``--out_dir``)."""
    for flag in ("--output_dir", "--out_dir"):
        if flag in command[:-1]:
            return command[command.index(flag) + 1]
    return None


def peak_rss(metrics: dict) -> float | None:
    """Peak RSS, MiB: the phase clock's (this process or its largest child), else a CPU run's peak_memory_mb."""
    phases = metrics.get("phases")
    if phases:
        return max(phases.get("peak_rss_mb") or 0, phases.get("peak_rss_children_mb") or 0) or None
    if metrics.get("peak_memory_kind") == "process peak RSS":
        return metrics.get("peak_memory_mb")
    return None

