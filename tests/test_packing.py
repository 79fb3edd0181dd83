"""Padding-free packing (core/packing.py) and the benchmark's plain-PyTorch ceiling (bench/ceiling.py).

The central check: packed and unpacked training give the same summed response-token loss, the
same number of targets and the same LoRA gradients on the same examples, in fp32, to rtol 1e-5 /
atol 1e-6 (only summation order may differ; on the development CPU they were bit-identical), with
the prompt masked and with ``train_on_inputs``, with and without the boolean ``logits_to_keep``
mask, for ``sdpa`` and ``eager`` attention. ``flex_attention`` has no backward on CPU: a slow test
checks its loss here, a GPU test (skipped without CUDA) its gradients.
"""
from __future__ import annotations

import random

import pytest
import torch

from core.packing import (IGNORE_INDEX, PackedBatchSampler, PackedCollator, PackingError, check_packed_attention,
                          plan_packs, segment_lengths, token_budget)
from core.losses import response_token_loss_sum
from core.tokenization import PaddingCollator

RTOL, ATOL = 1e-5, 1e-6  # fp32
VOCAB, EOS, PAD = 97, 2, 0
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_lora_llama(attn: str = "sdpa", seed: int = 0):
    """A random 2-layer Llama (hidden 32, fp32) with a LoRA adapter whose B is random too (with
    the usual zero B, the A matrices would get zero gradients and compare trivially)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD, use_cache=False,
                         tie_word_embeddings=False)
    config._attn_implementation = attn
    base = LlamaForCausalLM(config).float()
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none",
                      task_type="CAUSAL_LM", init_lora_weights=False)
    return get_peft_model(base, lora).train()


def make_examples(n: int = 5, train_on_inputs: bool = False, seed: int = 0) -> list[dict]:
    """SFT-shaped examples: BOS + prompt (+ response + EOS); labels -100 on the prompt unless
    ``train_on_inputs``, the EOS supervised."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        prompt = [1] + [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 9))]
        response = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 8))] + [EOS]
        ids = prompt + response
        labels = list(ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt) + response
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "length": len(ids)})
    return examples


def loss_and_grads(model, batch, logits_mask: bool):
    model.zero_grad(set_to_none=True)
    loss_sum, count = response_token_loss_sum(model, batch, logits_mask)
    loss_sum.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss_sum.detach(), count, grads


# --------------------------------------------------------------------------- packed == unpacked


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("train_on_inputs", [False, True])
@pytest.mark.parametrize("logits_mask", [True, False])
def test_packed_and_unpacked_give_the_same_loss_and_gradients(attn, train_on_inputs, logits_mask):
    torch.set_num_threads(1)
    model = tiny_lora_llama(attn)
    examples = make_examples(train_on_inputs=train_on_inputs)
    assert check_packed_attention(model) == attn

    unpacked = PaddingCollator(PAD, pad_to_multiple_of=8)(examples)
    packed = PackedCollator(PAD, pad_to_multiple_of=8)(examples)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed

    loss_u, count_u, grads_u = loss_and_grads(model, unpacked, logits_mask)
    loss_p, count_p, grads_p = loss_and_grads(model, packed, logits_mask)

    assert count_p == count_u
    # The Trainer's num_items_in_batch (labels[..., 1:] != -100) counts the same targets too.
    assert int((packed["labels"][:, 1:] != IGNORE_INDEX).sum()) == int((unpacked["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss_p, loss_u, rtol=RTOL, atol=ATOL)
    assert grads_u.keys() == grads_p.keys() and len(grads_u) == 2 * len(LORA_TARGETS) * 2
    for name in grads_u:
        assert grads_u[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_p[name], grads_u[name], rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.slow
def test_flex_attention_confines_packed_rows_forward_on_cpu():
    """FlexAttention has no backward on CPU (torch 2.13): the loss only; gradients in the GPU test."""
    torch.set_num_threads(1)
    model = tiny_lora_llama("flex_attention")
    examples = make_examples(n=3, train_on_inputs=True)
    assert check_packed_attention(model) == "flex_attention"
    with torch.no_grad():
        loss_u, count_u = response_token_loss_sum(model, PaddingCollator(PAD, pad_to_multiple_of=None)(examples))
        loss_p, count_p = response_token_loss_sum(model, PackedCollator(PAD)(examples))
    assert count_p == count_u
    torch.testing.assert_close(loss_p, loss_u, rtol=RTOL, atol=ATOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_packed_and_unpacked_gradients_match_on_the_gpu(attn):
    model = tiny_lora_llama(attn).cuda()
    examples = make_examples(train_on_inputs=True)
    to_gpu = lambda batch: {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}  # noqa: E731
    loss_u, count_u, grads_u = loss_and_grads(model, to_gpu(PaddingCollator(PAD, pad_to_multiple_of=8)(examples)), True)
    loss_p, count_p, grads_p = loss_and_grads(model, to_gpu(PackedCollator(PAD, pad_to_multiple_of=8)(examples)), True)
    assert count_p == count_u
    # GPU kernels may pick other reduction orders (and TF32 is off by default for matmuls): a looser bound.
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-4, atol=1e-4)
    for name in grads_u:
        torch.testing.assert_close(grads_p[name], grads_u[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_what_the_guard_prevents_really_crosses_examples(attn):
    """Why the collator sends no attention_mask and use_cache=False, and the check refuses
    config.use_cache=True: with either, transformers attends across the packed examples."""
    torch.set_num_threads(1)
    model = tiny_lora_llama(attn).eval()
    examples = make_examples(n=3)
    packed = PackedCollator(PAD)(examples)
    separate = [model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0] for e in examples]
    reference = torch.cat(separate)
    with torch.no_grad():
        good = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        with_cache = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=True).logits[0]
        with_mask = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False,
                          attention_mask=torch.ones_like(packed["input_ids"])).logits[0]
    torch.testing.assert_close(good, reference, rtol=RTOL, atol=1e-5)
    assert (with_cache - reference).abs().max() > 1e-3
    assert (with_mask - reference).abs().max() > 1e-3


def test_check_refuses_paths_that_would_attend_across_examples():
    model = tiny_lora_llama("sdpa")
    model.config.use_cache = True
    with pytest.raises(PackingError, match="use_cache"):
        check_packed_attention(model)
    model.config.use_cache = False
    model.config._attn_implementation = "paged|sdpa"
    with pytest.raises(PackingError, match="attn_implementation"):
        check_packed_attention(model)

    class RemoteCodeLM(torch.nn.Module):  # a model whose module does not use transformers' masks
        def __init__(self, config):
            super().__init__()
            self.config = config

    config = tiny_lora_llama("sdpa").config
    with pytest.raises(PackingError, match="masking_utils"):
        check_packed_attention(RemoteCodeLM(config))


# --------------------------------------------------------------------------- collator


def test_collator_boundaries_positions_and_labels():
    a = {"input_ids": [1, 10, 11, 20, 2], "labels": [-100, -100, -100, 20, 2]}
    b = {"input_ids": [1, 12, 21, 2], "labels": [1, 12, 21, 2]}  # train_on_inputs: BOS labelled
    c = {"input_ids": [1, 13, 2], "labels": [-100, -100, 2], "length": 3}
    batch = PackedCollator(PAD, pad_to_multiple_of=8)([a, b, c])

    assert batch["input_ids"].tolist() == [[1, 10, 11, 20, 2, 1, 12, 21, 2, 1, 13, 2, PAD, PAD, PAD, PAD]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3]]
    # Every example's first label is -100 (the previous example's EOS must not predict it); the
    # rest are the example's own labels, EOS included; padding -100.
    assert batch["labels"].tolist() == [[-100, -100, -100, 20, 2, -100, 12, 21, 2, -100, -100, 2,
                                         -100, -100, -100, -100]]
    assert batch["use_cache"] is False and "attention_mask" not in batch
    assert segment_lengths(batch["position_ids"]) == [5, 4, 3, 4]

    exact = PackedCollator(PAD)([a, b])
    assert exact["input_ids"].shape == (1, 9) and segment_lengths(exact["position_ids"]) == [5, 4]

    flash = PackedCollator(PAD, pad_to_multiple_of=8, flash_attention_kwargs=True)([a, b, c])
    assert flash["cu_seq_lens_q"].tolist() == [0, 5, 9, 12, 16] and flash["cu_seq_lens_q"].dtype == torch.int32
    assert flash["max_length_q"] == flash["max_length_k"] == 5


def test_collator_single_token_examples_are_separate_segments():
    batch = PackedCollator(PAD)([{"input_ids": [5], "labels": [5]}, {"input_ids": [6], "labels": [6]},
                                 {"input_ids": [7, 8], "labels": [7, 8]}])
    assert batch["position_ids"].tolist() == [[0, 0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8]]
    assert segment_lengths(batch["position_ids"]) == [1, 1, 2]


# --------------------------------------------------------------------------- planner


def _lengths(n=200, seed=0, low=3, high=120):
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(n)]


def test_plan_covers_every_example_once_within_the_budget():
    lengths = _lengths()
    packs = plan_packs(lengths, 256, seed=3)
    flat = sorted(i for pack in packs for i in pack)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in pack) <= 256 for pack in packs)
    # Best-fit decreasing leaves little room: at most one pack more than the lower bound, here.
    lower_bound = -(-sum(lengths) // 256)
    assert len(packs) <= lower_bound + 2


def test_an_example_longer_than_the_budget_gets_a_pack_of_its_own():
    lengths = [10, 300, 20, 64, 5]
    packs = plan_packs(lengths, 64, seed=0)
    assert [1] in packs and [3] in packs  # over the budget; exactly the budget
    assert sorted(i for p in packs for i in p) == list(range(5))
    assert all(sum(lengths[i] for i in p) <= 64 for p in packs if p not in ([1],))


def test_sampler_order_depends_on_seed_and_epoch_alone():
    lengths = _lengths(300)
    sampler = PackedBatchSampler(lengths, token_budget(4, 64), seed=7)
    assert token_budget(4, 64) == 256 and token_budget(4, 64, max_tokens_per_batch=500) == 500
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    resumed = PackedBatchSampler(lengths, 256, seed=7)  # a new process after a restart
    resumed.set_epoch(1)
    assert list(resumed) == epoch1
    resumed.set_epoch(0)
    assert list(resumed) == epoch0
    assert epoch0 != epoch1 and len(epoch0) == len(epoch1) == len(sampler)
    for epoch in (epoch0, epoch1):
        assert sorted(i for pack in epoch for i in pack) == list(range(len(lengths)))
        assert max(sum(lengths[i] for i in p) for p in epoch) == sum(lengths[i] for i in epoch[0])  # fullest first
    assert list(PackedBatchSampler(lengths, 256, seed=8)) != epoch0
    assert 0.9 < sampler.fill_ratio() <= 1.0


def test_sampler_and_collator_in_a_dataloader():
    from torch.utils.data import DataLoader

    examples = make_examples(n=12)
    sampler = PackedBatchSampler([e["length"] for e in examples], 40, seed=0)
    loader = DataLoader(examples, batch_sampler=sampler, collate_fn=PackedCollator(PAD))
    batches = list(loader)
    assert len(batches) == len(sampler)
    assert sum(b["input_ids"].shape[1] for b in batches) == sum(e["length"] for e in examples)
    assert all(b["input_ids"].shape[1] <= 40 for b in batches)


# --------------------------------------------------------------------------- bench ceiling


def test_ceiling_loop_runs_on_cpu_and_reports_positive_numbers():
    from bench.ceiling import ceiling_throughput, flops_per_token, matmul_parameters, token_blocks

    torch.set_num_threads(1)
    model = tiny_lora_llama("sdpa")
    sequences = [e["input_ids"] for e in make_examples(n=20)]
    blocks = token_blocks(sequences, rows=2, block_len=16)
    assert blocks.shape[1:] == (2, 16) and blocks.shape[0] >= 2
    frozen, trained = matmul_parameters(model)
    assert trained == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert frozen == sum(p.numel() for p in model.parameters() if not p.requires_grad) - VOCAB * 32  # no embedding
    assert flops_per_token(model) == 4 * frozen + 6 * trained

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = ceiling_throughput(model, blocks, steps=2, warmup_steps=1, precision="fp32")
    assert result["tokens_per_s"] > 0 and result["train_s"] > 0 and result["tokens"] == 2 * 2 * 16
    assert result["mfu"] is None  # no peak known for a CPU
    assert result["attn_implementation"] == "sdpa"
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)

    bf16 = ceiling_throughput(model, blocks, steps=2, warmup_steps=0, precision="bf16", peak_tflops=1.0)
    assert bf16["tokens_per_s"] > 0 and bf16["mfu"] > 0


@pytest.mark.slow
def test_run_ceiling_on_a_bench_spec(tiny_llama_dir, sft_data):
    from bench.ceiling import run_ceiling

    torch.set_num_threads(1)
    train_file, _ = sft_data
    spec = {"model_dir": str(tiny_llama_dir), "train_file": str(train_file), "val_file": str(train_file),
            "steps": 2, "batch_size": 2, "max_seq_length": 128, "seed": 0, "device": "cpu", "precision": "fp32",
            "load_in_4bit": False, "threads": 1, "warmup_steps": 1,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.05, "target_modules": LORA_TARGETS}}
    result = run_ceiling(spec)
    assert result["config"] == "ceiling" and result["tokens_per_s"] > 0 and result["train_s"] > 0
    assert result["useful_tokens"] == result["processed_tokens"] == 2 * 2 * result["block_len"]
    assert result["attn_implementation"] == "sdpa" and result["mfu"] is None


# --------------------------------------------------------------------------- wiring (a sketch for SFTTrainer)


@pytest.mark.slow
def test_packing_wired_into_the_trainer_trains_every_example_once_per_epoch(tmp_path):
    """How SFTTrainer can take packing, without editing it here: a batch sampler + the packed
    collator in get_train_dataloader, and the attention check once. Two epochs, gradient
    accumulation 2: every example is seen once per epoch, in that epoch's order (set_epoch reaches
    the batch sampler), and the targets counted equal the unpacked count."""
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import TrainingArguments

    from sft.trainer import SFTTrainer

    torch.set_num_threads(1)
    examples = make_examples(n=16)
    dataset = Dataset.from_list(examples)
    sampler = PackedBatchSampler(dataset["length"], 48, seed=0)
    seen: list[list[int]] = []

    class Recorder:  # wraps the collator to record which examples each batch held
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, features):
            seen.append(sorted(f["input_ids"][1] * 1000 + len(f["input_ids"]) for f in features))
            return self.inner(features)

    class PackedSFTTrainer(SFTTrainer):
        def get_train_dataloader(self):
            check_packed_attention(self.model)
            loader = DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=Recorder(PackedCollator(PAD)),
                                num_workers=0)
            return self.accelerator.prepare(loader)

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=2,
                             num_train_epochs=2, learning_rate=1e-3, report_to="none", save_strategy="no",
                             eval_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
                             include_num_input_tokens_seen="non_padding", remove_unused_columns=False, seed=0,
                             logging_steps=1)
    trainer = PackedSFTTrainer(model=tiny_lora_llama("sdpa"), args=args, train_dataset=dataset,
                               data_collator=PackedCollator(PAD), train_lengths=dataset["length"])
    trainer.train()

    def key(i):
        return examples[i]["input_ids"][1] * 1000 + examples[i]["length"]

    per_epoch = len(sampler)
    expected = [sorted(key(i) for i in pack) for epoch in (0, 1) for pack in sampler.epoch_order(epoch)]
    assert seen == expected  # each epoch's own (seed, epoch) order: set_epoch reached the batch sampler
    for epoch in range(2):
        assert sorted(k for batch in seen[epoch * per_epoch:(epoch + 1) * per_epoch] for k in batch) == \
            sorted(key(i) for i in range(len(examples)))
    assert trainer.state.global_step == 2 * -(-per_epoch // 2)
    unpacked_targets = sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in examples)
    assert trainer.progress.supervised_tokens_seen == 2 * unpacked_targets
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
