"""Padding-free packing: several examples in one row, attention confined to each example.

Three pieces, used together (``tests/test_packing.py`` checks each, and that packed and unpacked
training give the same summed loss and gradients):

- :func:`plan_packs` / :class:`PackedBatchSampler`: which examples share a row. Examples are
  packed best-fit-decreasing under a token budget (:func:`token_budget`), so rows are nearly full
  and their number is the same every epoch (the ``Trainer`` computes the steps of an epoch once,
  from ``len(dataloader)``). Which examples share a pack depends on the seed alone (ties between
  equal lengths are broken by a seeded permutation); the order of the packs depends on
  (seed, epoch) alone, as :class:`core.training.SeededLengthGroupedSampler` does, so a resumed run
  sees the same batches. The pack with the most tokens goes first, so an out-of-memory shows at
  once. An example longer than the budget gets a pack of its own (it is never cut or dropped).
- :class:`PackedCollator`: one pack -> ONE row of shape ``(1, N)``: ``input_ids``, ``labels``,
  ``position_ids`` restarting at 0 for each example, ``use_cache=False`` and *no*
  ``attention_mask``. Labels are each example's own (prompt -100 unless ``train_on_inputs``, EOS
  supervised), except that the first position of every example is set to -100: with the shifted
  loss, position t predicts label t+1, so the last token of one example would otherwise be trained
  to predict the first token of the next one. (Unpacked, an example's first label is never a
  target either, so the targets are exactly the unpacked ones, also with ``train_on_inputs``.)
  Optional padding to a multiple adds one extra "example" of pad tokens (its own positions from 0,
  labels -100), so nothing attends across it either.
- :func:`check_packed_attention`: refuses (a :class:`PackingError`) a model whose attention would
  silently cross example boundaries on such a row.

How attention is confined (transformers 5.23, Llama, checked in tests/test_packing.py on CPU)
-------------------------------------------------------------------------------------------
transformers detects packing in ``masking_utils.create_causal_mask``: when the 2D
``attention_mask`` is ``None`` *and there is no KV cache*, ``find_packed_sequence_indices`` reads
document boundaries from ``position_ids`` (wherever a position is not the previous one plus 1) and
the causal mask becomes block-diagonal causal.

- ``sdpa``: confined (verified: packed logits equal per-example logits to ~1e-7 in fp32). The mask
  is a dense ``(1, 1, N, N)`` boolean tensor, so SDPA runs its masked kernel (memory-efficient or
  math), not the flash kernel: attention costs N^2 per row rather than the sum of L_i^2.
- ``eager``: confined (verified the same way); also a dense N x N mask.
- ``flex_attention``: confined (verified the same way, forward only: torch 2.13 has no FlexAttention
  backward on CPU, so training with it needs a GPU; on CPU the first call compiles, ~50 s). The
  ``BlockMask`` skips fully masked blocks, so attention cost follows the documents.
- ``flash_attention_2`` / ``flash_attention_3``: transformers' ``_flash_attention_forward`` runs the
  varlen kernel with ``cu_seqlens`` taken from the collator's ``cu_seq_lens_q/k`` and
  ``max_length_q/k`` (``PackedCollator(flash_attention_kwargs=True)``) or, without them, derived
  from ``position_ids`` in every layer (a device sync per layer). Accepted by the check from
  reading that code; NOT verified here (flash-attn needs a CUDA GPU).
- Not confined, silently: any of the above when the batch carries an ``attention_mask`` (even all
  ones: packed detection only runs without one), or when the model builds a KV cache in training
  (``use_cache=True`` in the forward or ``config.use_cache`` true without gradient checkpointing:
  ``LlamaModel`` then creates a ``DynamicCache`` and packed detection is skipped; verified: the
  packed logits then differ from the per-example ones by ~0.25). Hence the collator sends
  ``use_cache=False`` and emits no mask, and the check refuses ``config.use_cache=True``.
- Refused as unknown: any other ``attn_implementation`` (hub kernels, paged attention, custom
  registrations: masking_utils returns no mask for them), models with ``is_causal=False``, and
  models whose module does not build its mask with ``masking_utils`` (remote code).
"""
from __future__ import annotations

import bisect
import sys
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

IGNORE_INDEX = -100

# attn_implementation -> how packed rows are confined (see the module docstring).
MASKED_ATTENTION = ("sdpa", "eager", "flex_attention")  # block-diagonal mask from masking_utils
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")  # cu_seqlens from position_ids / collator
CONFINING_ATTENTION = MASKED_ATTENTION + VARLEN_ATTENTION


class PackingError(ValueError):
    """Packing was asked for on a model or configuration where it would not be exact."""


# --------------------------------------------------------------------------- planning


def token_budget(rows: int, max_seq_length: int, max_tokens_per_batch: int | None = None) -> int:
    """Tokens per packed row: ``max_tokens_per_batch`` when given, else ``rows * max_seq_length``
    (what the worst unpacked batch of ``rows`` examples could hold)."""
    budget = max_tokens_per_batch if max_tokens_per_batch else rows * max_seq_length
    if budget < 1:
        raise PackingError(f"the packing token budget must be at least 1, got {budget}")
    return int(budget)


def plan_packs(lengths: Sequence[int], max_tokens: int, seed: int) -> list[list[int]]:
    """Example indices grouped into packs of at most ``max_tokens`` tokens (best-fit decreasing).

    Every index appears in exactly one pack. An example longer than ``max_tokens`` is a pack on its
    own. Deterministic for (lengths, max_tokens, seed): equal lengths are ordered by a permutation
    drawn from ``seed``. Inside a pack, examples are in the order they were placed (longest first).
    """
    if max_tokens < 1:
        raise PackingError(f"max_tokens must be at least 1, got {max_tokens}")
    n = len(lengths)
    rank = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    order = sorted(range(n), key=lambda i: (-int(lengths[i]), rank[i]))
    packs: list[list[int]] = []
    open_packs: list[tuple[int, int]] = []  # (room left, pack id), sorted: the best fit is found by bisect
    for i in order:
        length = int(lengths[i])
        if length >= max_tokens:  # fills (or overflows) a pack by itself
            packs.append([i])
            continue
        k = bisect.bisect_left(open_packs, (length, -1))  # the pack with the least room that fits
        if k < len(open_packs):
            room, pack_id = open_packs.pop(k)
            packs[pack_id].append(i)
        else:
            room, pack_id = max_tokens, len(packs)
            packs.append([i])
        room -= length
        if room > 0:
            bisect.insort(open_packs, (room, pack_id))
    return packs


class PackedBatchSampler(Sampler[list[int]]):
    """Batch sampler over packs: yields one pack (a list of example indices) per batch.

    Pass it to a ``DataLoader`` as ``batch_sampler`` with :class:`PackedCollator`. Packs are
    planned once (:func:`plan_packs`, seeded by ``seed``), so ``len()`` is the same every epoch;
    their order is a permutation drawn from ``seed + epoch`` (the contract of
    ``SeededLengthGroupedSampler``), with the fullest pack moved first when ``shuffle``.
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, seed: int, shuffle: bool = True):
        self.lengths = [int(x) for x in lengths]
        self.max_tokens = int(max_tokens)
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.packs = plan_packs(self.lengths, self.max_tokens, seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.packs)

    def pack_tokens(self, pack: Sequence[int]) -> int:
        return sum(self.lengths[i] for i in pack)

    def epoch_order(self, epoch: int | None = None) -> list[list[int]]:
        """The packs in the order ``epoch`` (default: the current one) yields them."""
        if not self.shuffle:
            return [list(p) for p in self.packs]
        epoch = self.epoch if epoch is None else epoch
        generator = torch.Generator().manual_seed(self.seed + epoch)
        ordered = [list(self.packs[k]) for k in torch.randperm(len(self.packs), generator=generator).tolist()]
        if ordered:
            fullest = max(range(len(ordered)), key=lambda k: self.pack_tokens(ordered[k]))
            ordered.insert(0, ordered.pop(fullest))
        return ordered

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.epoch_order())

    def fill_ratio(self) -> float:
        """Real tokens / (packs x budget): how full the rows are (1.0 = no row has room left)."""
        return sum(self.lengths) / max(1, len(self.packs) * self.max_tokens)


# --------------------------------------------------------------------------- collating


@dataclass
class PackedCollator:
    """Concatenates a batch of examples into ONE row ``(1, N)`` for padding-free training.

    Returns ``input_ids``, ``labels``, ``position_ids`` (0.. for each example) and
    ``use_cache=False``; never an ``attention_mask`` (with one, transformers would not confine
    attention). The first label of every example is -100 (see the module docstring). With
    ``pad_to_multiple_of``, pad tokens are appended as one more segment with positions from 0 and
    labels -100. With ``flash_attention_kwargs``, ``cu_seq_lens_q/k`` (int32) and
    ``max_length_q/k`` are added, so FlashAttention's varlen path needs no per-layer device sync;
    only use it with a ``flash_attention_*`` model. Extra keys (``length``) are ignored.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    flash_attention_kwargs: bool = False

    def __call__(self, features: list[dict]) -> dict:
        if not features:
            raise PackingError("cannot pack an empty batch")
        lengths = [len(f["input_ids"]) for f in features]
        if min(lengths) < 1:
            raise PackingError("cannot pack an empty example")
        total = sum(lengths)
        multiple = self.pad_to_multiple_of or 1
        width = -(-total // multiple) * multiple
        segments = lengths + ([width - total] if width > total else [])

        input_ids = torch.full((1, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((1, width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.cat([torch.arange(n, dtype=torch.long) for n in segments]).unsqueeze(0)
        start = 0
        for feature, length in zip(features, lengths):
            input_ids[0, start:start + length] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            labels[0, start + 1:start + length] = torch.as_tensor(feature["labels"][1:], dtype=torch.long)
            start += length  # labels[0, start] stays -100: no target crosses into this example
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "use_cache": False}
        if self.flash_attention_kwargs:
            cu = torch.zeros(len(segments) + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(torch.tensor(segments, dtype=torch.int32), 0)
            batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone(),
                         max_length_q=max(segments), max_length_k=max(segments))
        return batch


def segment_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the segments of a packed ``(1, N)`` row, read from its position ids (a new
    segment starts wherever a position is not the previous one plus 1, as transformers reads it)."""
    pos = position_ids.reshape(-1)
    starts = [0] + (torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1).tolist() + [pos.numel()]
    return [b - a for a, b in zip(starts, starts[1:])]


# --------------------------------------------------------------------------- the model check


def _unwrap(model):
    """The plain transformers model under DDP/compile and PEFT wrappers."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _probe_mask_is_confined(config) -> bool:
    """Build the causal mask transformers would build for a packed row [3 tokens | 2 tokens] and
    check that it is block-diagonal causal (sdpa: bool, True = attend; eager: 0 = attend)."""
    from transformers.masking_utils import create_causal_mask

    position_ids = torch.tensor([[0, 1, 2, 0, 1]])
    mask = create_causal_mask(config=config, inputs_embeds=torch.zeros(1, 5, 1), attention_mask=None,
                              past_key_values=None, position_ids=position_ids)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return False
    allowed = mask[0, 0] if mask.dtype == torch.bool else mask[0, 0] == 0
    doc = torch.tensor([0, 0, 0, 1, 1])
    expected = (doc[:, None] == doc[None, :]) & torch.ones(5, 5, dtype=torch.bool).tril()
    return bool(torch.equal(allowed.cpu(), expected))


def check_packed_attention(model) -> str:
    """The model's attention implementation, if packed rows are confined to each example with it;
    otherwise a :class:`PackingError` saying why and what to do. Call once before training."""
    from transformers import masking_utils

    base = _unwrap(model)
    config = base.config
    impl = getattr(config, "_attn_implementation", None)
    name = type(base).__name__
    if impl not in CONFINING_ATTENTION:
        raise PackingError(
            f"packing needs attention confined to each packed example, and attn_implementation={impl!r} "
            f"of {name} is not known to do that: load the model with attn_implementation='sdpa' (or "
            f"'flex_attention', 'flash_attention_2'), or turn packing off")
    if not getattr(config, "is_causal", True):
        raise PackingError(f"{name} is not causal (is_causal=False): packing is for causal LMs only")
    if getattr(config, "use_cache", False):
        raise PackingError(
            f"{name} has config.use_cache=True: in training it would build a KV cache, and transformers then "
            f"ignores the packed position_ids, so packed examples would attend to each other; "
            f"set model.config.use_cache = False")
    module = sys.modules.get(type(base).__module__)
    builders = ("create_causal_mask", "create_sliding_window_causal_mask")
    uses_masking_utils = any(getattr(module, b, None) is getattr(masking_utils, b) for b in builders)
    if not uses_masking_utils:
        raise PackingError(
            f"{name} ({type(base).__module__}) does not build its attention mask with transformers.masking_utils, "
            f"so packed examples may attend to each other: turn packing off for this model")
    if impl in ("sdpa", "eager") and not _probe_mask_is_confined(config):
        raise PackingError(
            f"this transformers version does not build a per-example (block-diagonal) mask from packed "
            f"position_ids with attn_implementation={impl!r}: turn packing off")
    return impl
