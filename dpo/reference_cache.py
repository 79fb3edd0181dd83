"""Each pair's reference log-probs computed once, the first time the pair is used, and reused after.

The reference is frozen, so a pair's reference log-probs never change; TRL's DPOTrainer recomputes
them at every training step and at every held-out evaluation (a full reference forward of the
held-out pairs each time). Here the first forward of a pair keeps its two sums (chosen, rejected),
keyed by the pair's tokens, and every later use (each held-out evaluation after the first, a later
epoch, a resumed run) reads them. ``--reference_cache false`` restores TRL's forward at every use.

Why our own cache and not TRL's ``precompute_ref_log_probs``: TRL precomputes *every* training pair
before the first step, inside ``DPOTrainer.__init__``:

- a run shorter than an epoch pays for pairs it never trains on (the ``small`` study: 50 steps x 4
  = 200 of 320 training pairs), so it would save only on the held-out side; here a training pair
  costs one reference forward when it is first trained on, as without the cache, and never more;
- it runs before :func:`core.policy.match_reference_dtype`, so on a 4-bit base the reference it
  stores would be the fp32 copy, not the exact starting policy (step-0 rewards not exactly 0);
- it writes its cache to a temporary folder for in-memory datasets (gone at exit: a resumed run
  pays again), keyed by a hash of every weight of the model.

The values are TRL's own: a missing pair's batch goes through ``DPOTrainer.compute_ref_log_probs``
(TRL's reference forward of one batch, in the batch as it comes), and the sums reach TRL's loss the
way its own precomputed ones do (``ref_chosen_logps`` / ``ref_rejected_logps`` in the batch, with
``precompute_ref_logps`` set). A pair first used in the batch it is used in gives the very numbers
the forward at every step gives; a pair read back in another batch (a later epoch) differs from a
fresh forward only by the float rounding of another padding length.

The cache goes into every checkpoint (``reference_logps.json``, written before the checkpoint is
marked complete), with a fingerprint of the reference (its adapter weights, the base model, dtype
and device); ``--resume`` reads it back when the fingerprint matches, and computes afresh when not.
Each process keeps the pairs of its own batches; the main process's are saved (another process
recomputes its own on resume: the same numbers).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from pathlib import Path
from typing import Any

CACHE_FILENAME = "reference_logps.json"
MODES = ("train", "eval")
MODE_NAMES = {"train": "training", "eval": "held-out"}


def pair_keys(inputs: dict) -> list[str]:
    """One key per pair of a collated DPO batch (chosen rows, then rejected rows): a hash of each side's
    tokens and completion mask, without padding, so the same pair has the same key in any batch."""
    ids, attention, completion = (inputs[name].cpu() for name in ("input_ids", "attention_mask", "completion_mask"))
    pairs = ids.shape[0] // 2
    keys = []
    for row in range(pairs):
        digest = hashlib.blake2b(digest_size=16)
        for side in (row, row + pairs):
            kept = attention[side].bool()
            tokens, counted = ids[side][kept], completion[side][kept]
            digest.update(struct.pack("<q", int(tokens.numel())))
            digest.update(tokens.to(dtype=ids.dtype).numpy().tobytes())
            digest.update(counted.to(dtype=completion.dtype).numpy().tobytes())
        keys.append(digest.hexdigest())
    return keys


def reference_fingerprint(model, base_model: str, adapter: str) -> str:
    """What the cached numbers depend on besides the pair: the reference adapter's weights (small: LoRA),
    the base model they sit on, and the dtype and device they are computed in."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(base_model.encode())
    for name, param in model.named_parameters():
        if f".{adapter}." in name:
            digest.update(f"{name}:{param.dtype}:{param.device.type}".encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


class ReferenceCache:
    """Reference log-probs by pair key, with counts of what was computed, reused and read back."""

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint
        self.values: dict[str, tuple[float, float]] = {}
        self.computed = dict.fromkeys(MODES, 0)  # pairs sent through the reference forward
        self.reused = dict.fromkeys(MODES, 0)  # pairs answered from the cache
        self.seconds = 0.0
        self.read: int = 0  # pairs read back from a checkpoint
        self.read_from: str | None = None
        self.dtype = None  # of the log-probs TRL's forward returns (restored with the values)

    # ------------------------------------------------------------------ during the run

    def fill(self, trainer, inputs: dict, mode: str) -> dict:
        """``inputs`` with ``ref_chosen_logps`` / ``ref_rejected_logps``: from the cache when every pair of
        the batch is in it, else from TRL's reference forward of the batch (kept for next time)."""
        import torch

        if "ref_chosen_logps" in inputs:  # TRL's own precomputed values (a dataset passed to evaluate())
            return inputs
        keys = pair_keys(inputs)
        if all(key in self.values for key in keys):
            self.reused[mode] += len(keys)
            chosen, rejected = zip(*(self.values[key] for key in keys))
            device = inputs["input_ids"].device
            ref_chosen = torch.tensor(chosen, dtype=self.dtype or torch.float32, device=device)
            ref_rejected = torch.tensor(rejected, dtype=self.dtype or torch.float32, device=device)
        else:
            started = time.perf_counter()
            ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, inputs)  # TRL's reference forward
            self.seconds += time.perf_counter() - started
            self.computed[mode] += len(keys)
            self.dtype = ref_chosen.dtype
            self.values.update(zip(keys, zip(ref_chosen.tolist(), ref_rejected.tolist())))
        return {**inputs, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}

    # ------------------------------------------------------------------ in checkpoints

    def save(self, checkpoint: str | Path) -> Path:
        path = Path(checkpoint) / CACHE_FILENAME
        payload = {"fingerprint": self.fingerprint, "dtype": str(self.dtype or "torch.float32").removeprefix("torch."),
                   "pairs": {key: list(value) for key, value in self.values.items()}}
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(payload), encoding="utf-8")
        os.replace(temporary, path)
        return path

    def load(self, checkpoint: str | Path) -> str | None:
        """Read a checkpoint's cache; None when read, else why not (no file, another reference)."""
        import torch

        path = Path(checkpoint) / CACHE_FILENAME
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return f"{Path(checkpoint).name} holds no {CACHE_FILENAME}"
        except ValueError:
            return f"{path} is unreadable"
        if payload.get("fingerprint") != self.fingerprint:
            return f"{path} was computed for another reference (fingerprint differs)"
        pairs = {key: (float(chosen), float(rejected)) for key, (chosen, rejected) in payload["pairs"].items()}
        self.values.update(pairs)
        self.dtype = getattr(torch, payload.get("dtype", "float32"))
        self.read, self.read_from = len(pairs), Path(checkpoint).name
        return None

    # ------------------------------------------------------------------ what happened

    def record(self) -> dict[str, Any]:
        """``metrics.json``'s ``reference_cache``: this session's counts."""
        return {"computed_pairs": dict(self.computed), "reused_pairs": dict(self.reused), "seconds": round(self.seconds, 3),
                "read_pairs": self.read, "read_from": self.read_from, "distinct_pairs": len(self.values)}

    def summary(self) -> str | None:
        """The one console line, or None when the session used no reference log-probs."""
        if not any(self.computed.values()) and not any(self.reused.values()):
            return None
        computed = " + ".join(f"{self.computed[mode]} {MODE_NAMES[mode]}" for mode in MODES)
        reused = ", ".join(f"{self.reused[mode]} {MODE_NAMES[mode]}" for mode in MODES)
        read = f"; {self.read} read from {self.read_from}" if self.read_from else ""
        return (f"reference log-probs: computed once for {computed} pairs ({self.seconds:.1f} s), reused for "
                f"{reused} pairs{read} (--reference_cache)")
