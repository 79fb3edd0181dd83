"""The ``ceiling`` row: the same model, LoRA adapter, precision and tokens in a plain PyTorch loop.

What the GPU does with the work when nothing but the work is there: dense blocks of real tokens
(the run's examples concatenated and cut into ``rows x block_len`` blocks: no padding, no prompt
masking, causal attention over each whole block), a plain forward with full-vocabulary logits, a
token-mean cross-entropy in fp32, ``backward``, and AdamW (``fused=True`` where the device
supports it) over the LoRA parameters. bf16/fp16 autocast when asked (fp16 with a GradScaler),
SDPA attention, no gradient clipping unless asked, no host sync inside the timed steps. The first
``warmup_steps`` steps (allocator, kernel selection, autotuning) run before the clock starts and
are not counted; the clock is CUDA-synchronised at both ends.

It is an upper bound for a trainer on the same tokens, not a competitor: it trains on every
token, so it does more LM-head work than a response-only loss, and it lets documents attend to
each other inside a block, which a correct packed run must not (see core/packing.py).

MFU
---
``flops_per_token = 2 * N_frozen * 2 + 2 * N_trained * 3``: a matmul weight costs 2 FLOPs per
token in the forward pass and 2 more for the input gradient in the backward pass; trained (LoRA)
weights need 2 more for their own gradient. With LoRA, N_trained is ~1% of N, so this is ~4N
(full fine-tuning would be 6N). N counts the weights used as matmuls: every parameter except the
input embedding (a lookup), unless it is tied to the LM head; 4-bit weights count at their
unpacked size. Attention scores (QK^T, AV: ~4 x layers x block_len x hidden FLOPs per token in
the forward) and element-wise work are not counted, as in the usual 6N convention.
``mfu = tokens/s x flops_per_token / peak``, with ``peak`` the dense (no sparsity) tensor-core
FLOP/s of :data:`PEAK_TFLOPS` for the precision, matched on ``torch.cuda.get_device_name()``, or
``peak_tflops`` when given. No peak is known for CPUs or fp32, so ``mfu`` is then ``None``.

How bench/bench_train.py should call it (one fresh process, like the other rows):

    from bench.ceiling import run_ceiling
    result = run_ceiling(spec)   # spec as bench_train.make_spec builds it; optional keys:
                                 # "warmup_steps" (3), "ceiling_block_len", "ceiling_base_dtype"
    result["tokens_per_s"], result["mfu"], result["train_s"], result["useful_tokens"], ...

or, with a model and tokens of its own, :func:`ceiling_throughput`.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

# Dense tensor-core peak, TFLOP/s, by precision; the first name found in the device name wins,
# so more specific names come first. Vendor data sheets (SXM parts unless named).
PEAK_TFLOPS: dict[str, tuple[tuple[str, float], ...]] = {
    "bf16": (("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("A100", 312.0),
             ("L40S", 362.05), ("L4", 121.0), ("A10", 125.0)),
    "fp16": (("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("A100", 312.0),
             ("L40S", 362.05), ("L4", 121.0), ("A10", 125.0), ("V100", 125.0), ("T4", 65.0)),
}

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def peak_tflops_for(device: torch.device, precision: str) -> float | None:
    """The table's dense peak for this CUDA device and precision, or None if unknown."""
    if device.type != "cuda" or precision not in PEAK_TFLOPS:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS[precision] if key in name), None)


def _numel(p: torch.nn.Parameter) -> int:
    quant_state = getattr(p, "quant_state", None)  # bitsandbytes 4-bit: count the unpacked weight
    return math.prod(quant_state.shape) if quant_state is not None else p.numel()


def matmul_parameters(model) -> tuple[int, int]:
    """(frozen, trained) parameters used as matmul weights: all but an untied input embedding."""
    embed = model.get_input_embeddings()
    skip = set()
    out = model.get_output_embeddings()
    if embed is not None and (out is None or out.weight is not embed.weight):
        skip.add(id(embed.weight))
    frozen = trained = 0
    for p in model.parameters():
        if id(p) in skip:
            continue
        if p.requires_grad:
            trained += _numel(p)
        else:
            frozen += _numel(p)
    return frozen, trained


def flops_per_token(model) -> int:
    """Training FLOPs per token: 4 per frozen matmul weight, 6 per trained one (see the module docstring)."""
    frozen, trained = matmul_parameters(model)
    return 4 * frozen + 6 * trained


def token_blocks(sequences: Sequence[Sequence[int]], rows: int, block_len: int) -> torch.Tensor:
    """The sequences' tokens concatenated in order and cut into ``(num_blocks, rows, block_len)``;
    the incomplete tail is dropped."""
    flat = torch.tensor([t for seq in sequences for t in seq], dtype=torch.long)
    per_block = rows * block_len
    num_blocks = flat.numel() // per_block
    if num_blocks < 1:
        raise ValueError(f"{flat.numel()} tokens do not fill one block of {rows} x {block_len}")
    return flat[:num_blocks * per_block].view(num_blocks, rows, block_len)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _adamw(params, lr: float, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True), "fused"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, foreach=device.type != "cpu"), "foreach" if device.type != "cpu" else "for-loop"


def ceiling_throughput(model, blocks: torch.Tensor, *, steps: int, warmup_steps: int = 3, precision: str = "bf16",
                       lr: float = 2e-4, max_grad_norm: float | None = None, peak_tflops: float | None = None,
                       device: torch.device | str | None = None,
                       on_step: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train ``model`` (its trainable parameters) for ``warmup_steps`` untimed then ``steps`` timed
    steps; step s uses ``blocks[s % len(blocks)]`` (``blocks``: ``(num_blocks, rows, block_len)``
    token ids). ``on_step`` is called after every step (a profiler's ``step``). Returns tokens/s,
    MFU and what was run."""
    if steps < 1 or warmup_steps < 0:
        raise ValueError("steps must be >= 1 and warmup_steps >= 0")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    blocks = blocks.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer, optimizer_kind = _adamw(params, lr, device)
    autocast = precision in AUTOCAST_DTYPES
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    model.train()

    def step(index: int) -> torch.Tensor:
        x = blocks[index % blocks.shape[0]]
        with torch.autocast(device.type, dtype=AUTOCAST_DTYPES.get(precision, torch.bfloat16), enabled=autocast):
            logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten())
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step()
        return loss.detach()

    for i in range(warmup_steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _synchronize(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    for i in range(warmup_steps, warmup_steps + steps):
        loss = step(i)
    _synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started

    rows, block_len = int(blocks.shape[1]), int(blocks.shape[2])
    tokens = steps * rows * block_len
    tokens_per_s = tokens / seconds
    per_token = flops_per_token(model)
    peak = peak_tflops if peak_tflops is not None else peak_tflops_for(device, precision)
    achieved = tokens_per_s * per_token
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {
        "tokens_per_s": tokens_per_s, "train_s": seconds, "cpu_s": cpu_seconds, "timed_steps": steps, "warmup_steps": warmup_steps,
        "tokens": tokens, "rows": rows, "block_len": block_len, "last_loss": float(loss),
        "flops_per_token": per_token, "achieved_tflops": achieved / 1e12, "peak_tflops": peak,
        "mfu": achieved / (peak * 1e12) if peak else None,
        "flops_formula": "4 x frozen matmul params + 6 x trained params per token (attention scores not counted)",
        "precision": precision, "optimizer": f"AdamW ({optimizer_kind})",
        "attn_implementation": getattr(base.config, "_attn_implementation", None),
        "device": str(device), "gpu_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


def load_ceiling_model(model_dir: str, lora: dict, *, device: torch.device | str, load_in_4bit: bool = False,
                       precision: str = "bf16", base_dtype: torch.dtype = torch.float32, seed: int = 0):
    """The benchmark's model with SDPA attention and a fresh LoRA adapter (r, alpha, dropout,
    target_modules from ``lora``), on ``device``. ``base_dtype`` float32 matches the other bench
    rows (weights fp32, autocast); torch.bfloat16 matches ``sft.train_sft_cuda`` (bf16 base)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from core.modeling import quiet_peft_probe

    device = torch.device(device)
    kwargs: dict[str, Any] = {"dtype": base_dtype, "attn_implementation": "sdpa"}
    if load_in_4bit:
        kwargs.update(quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=AUTOCAST_DTYPES.get(precision, torch.float32)),
            device_map={"": device.index or 0})
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = model.to(device)
    model.config.use_cache = False
    torch.manual_seed(seed)
    with quiet_peft_probe():
        return get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                                target_modules=lora["target_modules"], bias="none", task_type="CAUSAL_LM"))


def example_sequences(spec: dict) -> list[list[int]]:
    """The bench's examples tokenised as ``ours`` tokenises them (prompt + response + EOS)."""
    from core.modeling import load_tokenizer
    from core.tokenization import ensure_pad_token
    from sft.dataset import load_sft_datasets
    from sft.sft_config import SFTConfig

    tokenizer = load_tokenizer(spec["model_dir"])
    ensure_pad_token(tokenizer)
    config = SFTConfig(model_name_or_path=spec["model_dir"], train_file=spec["train_file"], val_file=spec["val_file"],
                       max_seq_length=spec["max_seq_length"], train_on_inputs=True)
    return list(load_sft_datasets(config, tokenizer, use_cache=False, log=lambda _: None).train["input_ids"])


def mean_length(sequences: Sequence[Sequence[int]]) -> int:
    """The sequences' mean length in tokens (at least 2): ``batch_size`` of them is an average unpadded batch."""
    return max(2, sum(map(len, sequences)) // len(sequences))


def mean_example_tokens(spec: dict) -> int:
    """The bench examples' mean length (see :func:`mean_length`)."""
    return mean_length(example_sequences(spec))


def run_ceiling(spec: dict) -> dict[str, Any]:
    """The ``ceiling`` row for a bench_train spec: the spec's model, LoRA, precision and examples
    (tokenised as ``ours`` tokenises them), ``spec["steps"]`` timed steps of ``batch_size`` rows of
    ``block_len`` tokens, where ``block_len`` defaults to the examples' mean length, so a step holds
    the real tokens of an average unpadded batch. Keys shared with train_worker's results:
    ``train_s``, ``useful_tokens``, ``processed_tokens`` (equal: no padding), ``gpu_peak_mb``."""
    torch.manual_seed(spec["seed"])
    device = torch.device("cuda", 0) if spec["device"] == "cuda" else torch.device(spec["device"])
    sequences = example_sequences(spec)
    rows = spec["batch_size"]
    block_len = spec.get("ceiling_block_len") or mean_length(sequences)
    base_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.get("ceiling_base_dtype", "fp32"), torch.float32)
    model = load_ceiling_model(spec["model_dir"], spec["lora"], device=device, load_in_4bit=spec["load_in_4bit"],
                               precision=spec["precision"], base_dtype=base_dtype, seed=spec["seed"])
    result = ceiling_throughput(model, token_blocks(sequences, rows, block_len), steps=spec["steps"],
                                warmup_steps=spec.get("warmup_steps", 3), precision=spec["precision"], device=device)
    return {"config": "ceiling", **result, "useful_tokens": result["tokens"], "processed_tokens": result["tokens"],
            "supervised_tokens": result["tokens"] - result["timed_steps"] * rows}
