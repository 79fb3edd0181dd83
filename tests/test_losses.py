"""The response-token loss a chunk of rows at a time (core/losses.py): same loss, log-probs and gradients as
the whole (labelled rows x vocabulary) logits at once, only labelled positions in it, and the LM head never
given more than a chunk of rows, in forward or backward."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from core.losses import response_token_loss_sum, sequence_logps
from core.modeling import attach_lora
from core.tokenization import IGNORE_INDEX, PaddingCollator

VOCAB, EOS, PAD = 97, 2, 0
CHUNK_ROWS = 3  # with VOCAB: logits_per_chunk = 3 x 97, so a batch's rows span many chunks, the last one short
SMALL_CHUNKS = CHUNK_ROWS * VOCAB
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_model(seed: int = 0):
    """A random 2-layer Llama with tied embeddings, LoRA with random B (so every adapter matrix gets a
    gradient) and a trainable EOS row: the LM head is PEFT's wrapper, as in SFT with train_eos_embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD, use_cache=False, tie_word_embeddings=True)
    model = attach_lora(LlamaForCausalLM(config), r=4, alpha=8, dropout=0.0, target_modules=LORA_TARGETS, seed=seed,
                        trainable_tokens={"embed_tokens": [EOS]})
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                param.normal_(0, 0.05)
    return model.train()


def sft_batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Padded SFT examples: BOS + prompt (labels -100) + response + EOS (labelled); prompts longer than responses."""
    rng = random.Random(seed)
    features = []
    for _ in range(n):
        prompt = [1] + [rng.randrange(3, VOCAB) for _ in range(rng.randint(6, 12))]
        response = [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 6))] + [EOS]
        features.append({"input_ids": prompt + response, "attention_mask": [1] * (len(prompt) + len(response)),
                         "labels": [IGNORE_INDEX] * len(prompt) + response})
    return PaddingCollator(PAD)(features)


def full_logits(model, batch) -> torch.Tensor:
    """(batch, seq-1, vocab) next-token logits of every position: the reference computes from these."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()


def reference_loss_sum(model, batch, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the positions whose next label in ``labels`` is not -100, from full logits."""
    return F.cross_entropy(full_logits(model, batch).transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX,
                           reduction="sum")


def grads_of(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("logits_mask", [True, False])
def test_chunked_loss_and_gradients_equal_the_whole_logits_at_once(logits_mask):
    model, batch = tiny_model(), sft_batch()
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert labelled > 3 * CHUNK_ROWS  # several chunks

    reference = reference_loss_sum(model, batch, batch["labels"])
    reference_grads = grads_of(model, reference)
    loss, count = response_token_loss_sum(model, batch, logits_mask, logits_per_chunk=SMALL_CHUNKS)
    grads = grads_of(model, loss)

    assert count == labelled
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    assert set(grads) == set(reference_grads) and any("trainable_tokens" in name for name in grads)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name  # every adapter matrix and the EOS row take part
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_no_prompt_token_enters_the_loss():
    model, batch = tiny_model(), sft_batch()
    with torch.no_grad():
        loss, count = response_token_loss_sum(model, batch, logits_mask=True, logits_per_chunk=SMALL_CHUNKS)
        response_only = reference_loss_sum(model, batch, batch["labels"])
        # The same examples with the prompt tokens labelled too (padding still not): what a leak would give.
        with_prompt = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        with_prompt_loss = reference_loss_sum(model, batch, with_prompt)
    assert count == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, response_only, rtol=1e-5, atol=1e-5)
    assert with_prompt_loss > response_only + 1.0  # the two differ, so the line above can tell them apart


def test_the_head_never_projects_more_than_a_chunk_of_rows_in_forward_or_backward():
    model, batch = tiny_model(), sft_batch()
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    head = model.get_base_model().get_output_embeddings()
    rows: list[int] = []
    hook = head.register_forward_hook(lambda module, inputs, output: rows.append(output.shape[0]))
    try:
        loss, _ = response_token_loss_sum(model, batch, logits_mask=True, logits_per_chunk=SMALL_CHUNKS)
        forward_rows, rows[:] = list(rows), []
        loss.backward()
        backward_rows = list(rows)
    finally:
        hook.remove()
    # Forward: the one probe row, projected by the model and again by the check that nothing follows its
    # head, then the labelled rows in chunks; backward recomputes each chunk. Never all rows at once.
    assert forward_rows[:2] == [1, 1] and sum(forward_rows[2:]) == labelled and max(forward_rows[2:]) == CHUNK_ROWS
    assert sum(backward_rows) == labelled and max(backward_rows) == CHUNK_ROWS


@pytest.mark.parametrize("logits_mask", [True, False])
def test_sequence_logps_chunked_equal_the_whole_logits_at_once(logits_mask):
    model, batch = tiny_model(), sft_batch()
    with torch.no_grad():
        logps = sequence_logps(model, batch, logits_mask, logits_per_chunk=SMALL_CHUNKS)
        token_logps = torch.log_softmax(full_logits(model, batch), dim=-1)
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    picked = token_logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = (picked * mask).sum(dim=1)
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    assert logps.shape == (batch["input_ids"].shape[0],) and torch.all(logps < 0)


def test_a_model_that_changes_logits_after_its_head_gets_its_own_logits():
    """Gemma 2 soft-caps its logits after the LM head: the hidden states through the head alone would
    give another loss, so the loss is computed from the model's logits."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                          final_logit_softcapping=0.5, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)  # logits well beyond the cap, so capping changes them
    batch = sft_batch()
    with torch.no_grad():
        loss, _ = response_token_loss_sum(model, batch, logits_mask=True, logits_per_chunk=SMALL_CHUNKS)
        reference = reference_loss_sum(model, batch, batch["labels"])
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        uncapped = F.cross_entropy(model.lm_head(hidden[:, :-1]).transpose(1, 2), batch["labels"][:, 1:],
                                   ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    assert abs(uncapped - reference) > 1.0  # the head alone would have been wrong


def test_a_batch_without_labelled_tokens_has_zero_loss_and_zero_gradients():
    model, batch = tiny_model(), sft_batch()
    batch["labels"][:] = IGNORE_INDEX
    loss, count = response_token_loss_sum(model, batch, logits_mask=True, logits_per_chunk=SMALL_CHUNKS)
    assert count == 0 and float(loss.detach()) == 0.0
    grads = grads_of(model, loss)
    assert all(float(g.abs().sum()) == 0.0 for g in grads.values())
