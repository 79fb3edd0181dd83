"""Merge a trained LoRA adapter into its base model: one standalone model, no PEFT needed to load it.

Run from the repository root:

    python scripts/merge_adapter.py --adapter_dir models/sft_output --out_dir models/sft_merged
    python scripts/merge_adapter.py --adapter_dir models/sft_output --out_dir models/sft_merged --dtype bf16

The result loads with ``AutoModelForCausalLM.from_pretrained(out_dir)`` alone (tokenizer included).
The base model is the one recorded in the run's ``sft_config.json`` (else ``adapter_config.json``),
or ``--base_model``. It is always reloaded in full precision (fp32, or bf16 on request), also
after QLoRA training: merging into 4-bit weights would round the adapter's update away. Before
saving, the merged model's logits on a probe prompt are compared with base + adapter and the
largest difference is printed.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a file: make `sft` importable
    sys.path.insert(0, str(REPO_ROOT))

from core.cli import SuggestingParser, UserError, run_cli  # noqa: E402
from core.model_source import MODEL_SOURCE_HELP  # noqa: E402

if TYPE_CHECKING:  # torch and core.modeling load once the arguments are parsed (--help answers at once)
    import torch

PROBE_TEXT = "Below is an instruction that describes a task.\n\n### Instruction:\nSay hello.\n\n### Response:\n"


class _Parser(SuggestingParser):
    def error(self, message: str):
        raise UserError(message)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="python scripts/merge_adapter.py", description=__doc__, allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter_dir", required=True, help="output_dir of an SFT (or DPO) run: holds adapter_config.json")
    parser.add_argument("--out_dir", required=True, help="where the merged model and tokenizer are written")
    parser.add_argument("--base_model", default=None, help=f"override the base model recorded with the adapter: {MODEL_SOURCE_HELP}")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="precision of the merge and of the saved weights")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow model code from the hub")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty out_dir")
    return parser.parse_args(argv)


def _check_out_dir(out_dir: Path, adapter_dir: Path, overwrite: bool) -> None:
    if out_dir.resolve() == adapter_dir.resolve():
        raise UserError("--out_dir must differ from --adapter_dir (the merged model would overwrite the run)")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise UserError(f"{out_dir} is not empty: pass --overwrite to replace it")
        shutil.rmtree(out_dir)


def _probe_logits(model, tokenizer) -> torch.Tensor:
    import torch

    device = next(model.parameters()).device
    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"].to(device)
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, *, base_model: str | None = None, dtype: str = "fp32",
                  trust_remote_code: bool = False, overwrite: bool = False) -> float:
    """Write the merged model to ``out_dir``; return the largest logit difference vs base + adapter."""
    from core.modeling import base_model_of, load_adapter_model, load_tokenizer, torch_dtype

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"no LoRA adapter in {adapter_dir} (adapter_config.json missing)")
    _check_out_dir(out_dir, adapter_dir, overwrite)
    base = base_model or base_model_of(adapter_dir)
    print(f"base model: {base} ({dtype}); adapter: {adapter_dir}", flush=True)
    # The run saved its tokenizer (pad token included) next to the adapter: prefer that copy.
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(adapter_dir) if has_tokenizer else base, trust_remote_code=trust_remote_code)
    model = load_adapter_model(adapter_dir, base_model=base, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    model.eval()
    before = _probe_logits(model, tokenizer)
    merged = model.merge_and_unload()
    difference = (before - _probe_logits(merged, tokenizer)).abs().max().item()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    print(f"merged model written to {out_dir} (max |logit difference| vs base + adapter on a probe: {difference:.2e})")
    return difference


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from core.threads import apply_thread_guard

    apply_thread_guard()
    merge_adapter(args.adapter_dir, args.out_dir, base_model=args.base_model, dtype=args.dtype,
                  trust_remote_code=args.trust_remote_code, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    run_cli(main)
