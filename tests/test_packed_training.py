"""Packing wired into SFT (``--packing true``) and the sync-free step, end to end on CPU.

- packed and unpacked batches of the same examples give the same loss and LoRA gradients through
  ``SFTTrainer.compute_loss`` (fp32, rtol 1e-5 / atol 1e-6: only summation order may differ);
- a packed run trains, writes every output, counts every token once per epoch (EOS included, also
  where pad == EOS), and its adapter reloads with stock PEFT;
- resume after SIGKILL with packing ends with the same adapter as an uninterrupted packed run;
- the step's changes for the GPU (device-side counters, cached FLOP count, fused AdamW on CUDA)
  give the same numbers as what they replace.
"""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from core.cli import UserError
from core.modeling import load_tokenizer
from core.packing import IGNORE_INDEX, PackedBatchSampler, PackedCollator
from core.tokenization import PaddingCollator, ensure_pad_token
from core.training import DevicePlan, effective_optim
from sft.dataset import load_sft_datasets
from sft.sft_config import parse_sft_config
from sft.train_sft_mac import plan_mac
from sft.training import build_lora_model, build_trainer, run_sft
from test_training import (LogitsAtEnd, _child, assert_same_run, sigkill_after_first_checkpoint, supervised_batch,
                           train_argv)

import tiny_assets

RTOL, ATOL = 1e-5, 1e-6
CPU = DevicePlan(torch.device("cpu"), "fp32")


def _trainer(tmp_path, tiny_llama_dir, sft_data, **overrides):
    config = parse_sft_config(train_argv(tiny_llama_dir, sft_data, tmp_path / "out", lora_dropout=0.0, **overrides))
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    ensure_pad_token(tokenizer)
    datasets = load_sft_datasets(config, tokenizer, log=lambda _: None)
    model = build_lora_model(config, CPU)
    with torch.no_grad():  # non-zero B: every LoRA matrix gets a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return build_trainer(config, model, tokenizer, datasets, CPU), datasets, tokenizer


def _loss_and_grads(trainer, batch, num_items):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, trainer._prepare_inputs(batch), num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_packed_and_unpacked_give_the_same_loss_and_gradients_through_the_trainer(tmp_path, tiny_llama_dir, sft_data):
    trainer, datasets, tokenizer = _trainer(tmp_path, tiny_llama_dir, sft_data)
    features = [datasets.train[i] for i in range(6)]
    unpacked = PaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)(features)
    packed = PackedCollator(tokenizer.pad_token_id)(features)
    targets = int((unpacked["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert targets == int((packed["labels"][:, 1:] != IGNORE_INDEX).sum()) > 0
    num_items = torch.tensor(targets)  # what the Trainer passes: targets of the whole optimizer step

    loss_u, grads_u = _loss_and_grads(trainer, unpacked, num_items)
    loss_p, grads_p = _loss_and_grads(trainer, packed, num_items)
    torch.testing.assert_close(loss_p, loss_u, rtol=RTOL, atol=ATOL)
    assert grads_u.keys() == grads_p.keys() and grads_u
    for name in grads_u:
        assert grads_u[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_p[name], grads_u[name], rtol=RTOL, atol=ATOL, msg=name)


def test_packing_refuses_attention_that_would_cross_examples_in_one_line(tmp_path, tiny_llama_dir, sft_data):
    trainer, _, _ = _trainer(tmp_path, tiny_llama_dir, sft_data, packing=True, max_tokens_per_batch=256)
    trainer.model.config.use_cache = True
    with pytest.raises(UserError, match="--packing: .*use_cache") as info:
        trainer.get_train_dataloader()
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_packed_run_counts_every_token_and_adapter_reloads(tmp_path, tiny_llama_dir, sft_data):
    probe = supervised_batch(tiny_llama_dir, tiny_assets.rendered_rows()[:3])
    recorder = LogitsAtEnd(probe)
    out = tmp_path / "out"
    argv = train_argv(tiny_llama_dir, sft_data, out, packing="true", max_tokens_per_batch=256, max_steps=-1,
                      num_train_epochs=2, gradient_accumulation_steps=1, pad_to_multiple_of=8)
    run_sft(argv, preset="mac", plan_model=plan_mac, prog="test", description="", callbacks=[recorder])

    metrics = json.loads((out / "metrics.json").read_text())
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    ensure_pad_token(tokenizer)
    train = load_sft_datasets(parse_sft_config(argv), tokenizer, log=lambda _: None).train
    # Every example once per epoch, no padding in a packed row (pad_to_multiple_of does not apply).
    assert metrics["train_tokens_seen"] == 2 * sum(train["length"])
    assert metrics["supervised_tokens_seen"] == 2 * sum(sum(x != IGNORE_INDEX for x in labels[1:]) for labels in train["labels"])
    assert metrics["packing_tokens_per_row"] == 256
    assert metrics["val_loss_after"] < metrics["val_loss_before"]
    assert metrics["global_step"] == 2 * len(PackedBatchSampler(train["length"], 256, seed=42))  # one pack per step
    for name in ("adapter_model.safetensors", "adapter_config.json", "sft_config.json", "metrics.json"):
        assert (out / name).is_file(), name
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(out)).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    torch.testing.assert_close(logits, recorder.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_packed_resume_after_sigkill_matches_uninterrupted_run(tmp_path, tiny_llama_dir, sft_data):
    # ~10 packs of <= 256 tokens per epoch, 2 per step: 10 steps cross an epoch boundary; dropout on.
    common = dict(max_steps=10, save_steps=3, eval_steps=5, lora_dropout=0.1, save_total_limit=2,
                  packing="true", max_tokens_per_batch=256)
    straight = tmp_path / "straight"
    run_sft(train_argv(tiny_llama_dir, sft_data, straight, **common), preset="mac", plan_model=plan_mac,
            prog="test", description="")

    out = tmp_path / "killed"
    sigkill_after_first_checkpoint(tmp_path, train_argv(tiny_llama_dir, sft_data, out, **common), out, pause_s=0.3)

    child = _child(tmp_path, train_argv(tiny_llama_dir, sft_data, out, **common) + ["--resume"], "none")
    log = child.communicate(timeout=180)[0]
    assert child.returncode == 0, log
    assert "resuming from" in log and "packing:" in log

    assert_same_run(straight, out, ("train_tokens_seen", "supervised_tokens_seen"))


def test_packing_keys_are_not_resume_free():
    from core.runs import RESUME_FREE_KEYS

    assert not {"packing", "max_tokens_per_batch"} & RESUME_FREE_KEYS


# --------------------------------------------------------------------------- the step without syncs


def test_device_side_counters_match_the_trainers_own_count(tmp_path, tiny_llama_dir, sft_data):
    """Our _track_num_input_tokens (summed on the device, read at log/save time) counts what the
    Trainer's per-batch .item() counted, for padded batches; the cached FLOP estimate is the Trainer's."""
    from transformers import Trainer

    trainer, datasets, tokenizer = _trainer(tmp_path, tiny_llama_dir, sft_data)
    batches = [PaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)([datasets.train[i] for i in range(k, k + 3)])
               for k in (0, 3, 6)]
    stock = trainer.state.num_input_tokens_seen
    for batch in batches:
        Trainer._track_num_input_tokens(trainer, batch)
    stock = trainer.state.num_input_tokens_seen - stock
    before = trainer.state.num_input_tokens_seen
    for batch in batches:
        trainer._track_num_input_tokens(batch)
    assert trainer.state.num_input_tokens_seen == before  # nothing read back yet
    trainer._flush_counters()
    assert trainer.state.num_input_tokens_seen - before == stock == sum(int(b["attention_mask"].sum()) for b in batches)
    for batch in batches:
        assert trainer.floating_point_ops(batch) == Trainer.floating_point_ops(trainer, batch) > 0


def test_plain_adamw_runs_fused_on_cuda_only():
    assert effective_optim("adamw_torch", torch.device("cuda", 0)) == "adamw_torch_fused"
    assert effective_optim("adamw_torch", torch.device("cpu")) == "adamw_torch"
    assert effective_optim("paged_adamw_8bit", torch.device("cuda", 0)) == "paged_adamw_8bit"


def test_fused_adamw_gives_the_same_update_as_the_plain_one():
    """Why the swap is safe: on the same gradients, fused and for-loop AdamW agree (CPU fused kernel)."""
    torch.manual_seed(0)
    params = [torch.randn(16, 8), torch.randn(8)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    results = []
    for fused in (False, True):
        copies = [torch.nn.Parameter(p.clone()) for p in params]
        optimizer = torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.01, fused=fused, foreach=False if not fused else None)
        for step in grads:
            for p, g in zip(copies, step):
                p.grad = g.clone()
            optimizer.step()
        results.append([p.detach() for p in copies])
    for plain, fused in zip(*results):
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-7)


def test_a_training_step_reads_nothing_back_from_the_device_in_our_code_or_the_trainer(tmp_path, tiny_llama_dir, sft_data):
    """Every .item()/int()/float() on a tensor (aten::_local_scalar_dense) during a step that does
    not log, evaluate or save, with the code that asked for it: none may come from sft/, core/ or
    transformers' Trainer (what is left is the for-loop AdamW of the CPU, which CUDA runs fused,
    and transformers' SDPA mask check)."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import TrainerCallback

    callers: list[str] = []

    class RecordSyncs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                callers.append(" <- ".join(f"{f.filename}:{f.name}" for f in traceback.extract_stack()[-12:]))
            return func(*args, **(kwargs or {}))

    class Window(TrainerCallback):
        mode = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                self.mode = RecordSyncs()
                self.mode.__enter__()
            elif state.global_step == 4 and self.mode is not None:
                self.mode.__exit__(None, None, None)

    for packing in ("false", "true"):
        callers.clear()
        argv = train_argv(tiny_llama_dir, sft_data, tmp_path / f"out-{packing}", max_steps=5, logging_steps=5,
                          eval_steps=100, save_steps=100, packing=packing, max_tokens_per_batch=256)
        run_sft(argv, preset="mac", plan_model=plan_mac, prog="test", description="", callbacks=[Window()])
        assert callers, "the window saw no step"  # the CPU's for-loop AdamW reads its step count
        ours = [c for c in callers if any(part in c for part in ("/sft/", "/core/", "transformers/trainer.py"))]
        assert not ours, ours[:3]
