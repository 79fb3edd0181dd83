"""Exact prompt/response tokenisation, the padding collator and JSONL reading: shared by every stage.

Three guarantees, each tested (tests/test_dataset.py, tests/test_chat_template.py):

- The first tokens of an example are exactly ``encode_prompt(prompt)``, what the model sees at
  generation time; the response is tokenised *in context* after them. Llama-style SentencePiece
  tokenizers insert a spurious ``▁`` when the response is tokenised on its own, and any BPE can
  merge tokens across the prompt/response boundary when the two are joined: both are handled, and
  every example is checked to decode back to exactly ``prompt + response``.
- Labels are -100 on the prompt (unless ``train_on_inputs``) and equal the input ids on the response
  and on a final end token (EOS, or a chat template's end-of-turn), appended whenever the whole
  response fits. A too-long response loses its tail (and gets no end token: the text did not end
  there); an example whose prompt alone fills ``max_seq_length`` has nothing to learn from and is
  dropped. Both are counted by the callers and reported.
- Padding happens per batch in :class:`PaddingCollator`, on the right, with the attention mask built
  from sequence lengths, never from ``input_ids == pad_token_id`` (the pad token is often EOS).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from core.cli import UserError

IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy (and every HF model) skips
STATUS_OK, STATUS_TRUNCATED, STATUS_DROPPED = "ok", "truncated", "dropped"

# Fallback for a boundary merge: tokenise the response after a short prefix that ends a token, then
# strip the prefix's tokens. Several are tried because a prefix can itself merge with some
# responses (a byte-level BPE merges "\n" + "\n...", for instance).
_CONTINUATION_PREFIXES = ("\n", "x", "\n\n§", " ")
# Text used to find which special tokens a tokenizer wraps around text (BOS before, EOS after, ...).
_FRAMING_PROBE = "Hello world"



# --------------------------------------------------------------------------- tokenizer setup


def ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token one, without adding a token where an existing one will do.

    Reusing ``unk`` (when distinct from EOS) or else EOS needs no new embedding row. It cannot
    break EOS learning here, because padding is masked by *position* (collator and labels), never
    by id. Only a tokenizer with neither gets a new ``<pad>`` token; the caller must then resize
    the model's embeddings (``len(tokenizer)`` exceeds the embedding count). Padding side is left
    alone: the collator pads on the right itself, and generation code sets left padding itself.
    """
    if tokenizer.pad_token is not None:
        return
    if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})


@dataclass(frozen=True)
class _Framing:
    """The special tokens a tokenizer puts around text: e.g. Llama ([BOS], []), GPT-2 ([], [])."""

    prefix: list[int]
    suffix: list[int]


def _framing(tokenizer) -> _Framing:
    with_special = tokenizer(_FRAMING_PROBE, add_special_tokens=True)["input_ids"]
    plain = tokenizer(_FRAMING_PROBE, add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return _Framing(with_special[:start], with_special[start + len(plain):])
    raise ValueError(f"cannot tell which special tokens {type(tokenizer).__name__} adds around text")


def _strip_framing(ids: list[int], framing: _Framing) -> list[int]:
    """Text tokens only: drop the tokenizer's added prefix (one or more times) and suffix."""
    n = len(framing.prefix)
    # A prompt that itself starts with "<s>" would otherwise give two BOS.
    while n and ids[:n] == framing.prefix:
        ids = ids[n:]
    if framing.suffix and ids[-len(framing.suffix):] == framing.suffix:
        ids = ids[:-len(framing.suffix)]
    return ids


def encode_prompt(prompt: str, tokenizer) -> list[int]:
    """The prompt's token ids as the model sees them at generation time.

    The tokenizer's own encoding, with exactly one BOS where the tokenizer adds one and without a
    trailing EOS (from tokenizers configured with ``add_eos_token``): generation continues the
    prompt, it does not start after an end of text.
    """
    framing = _framing(tokenizer)
    return framing.prefix + _strip_framing(tokenizer(prompt, add_special_tokens=True)["input_ids"], framing)


# --------------------------------------------------------------------------- one example


@dataclass
class EncodedExample:
    """One example with what happened to it, so the loader can count rather than guess."""

    input_ids: list[int]
    labels: list[int]
    status: str  # ok | truncated (response tail cut, no EOS) | dropped (prompt alone too long)
    boundary_merge: bool = False  # joining prompt + response merged tokens across the boundary
    round_trip_exact: bool = True  # decode(text tokens) == prompt + response

    def as_features(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "attention_mask": [1] * len(self.input_ids), "labels": self.labels}


def _decodes_to(tokenizer, ids: list[int], text: str) -> bool:
    # No skip_special_tokens: text tokens only are passed, and a literal "</s>" in the data must
    # survive. No clean-up: it rewrites " ." to "." and would hide (or fake) differences.
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == text


def _response_after_prefix(tokenizer, response: str) -> list[int] | None:
    """Response ids as they come after a token boundary, or None if no prefix separates cleanly."""
    for prefix in _CONTINUATION_PREFIXES:
        prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        ids = tokenizer(prefix + response, add_special_tokens=False)["input_ids"]
        if ids[:len(prefix_ids)] == prefix_ids:
            return ids[len(prefix_ids):]
    return None


def _response_ids(tokenizer, prompt: str, response: str, prompt_text_ids: list[int],
                  joined_text_ids: list[int]) -> tuple[list[int], bool, bool]:
    """(response ids, boundary merged?, round trip exact?) for a response following the prompt.

    Preferred: the tail of the joined text's encoding, i.e. exactly how the tokenizer reads the
    response in context. When the joined encoding does not start with the prompt's own tokens
    (a merge across the boundary), the prompt tokens win (they are what generation sees) and the
    response is encoded after a separating prefix instead. Every candidate is verified by decoding.
    """
    text = prompt + response
    merged = joined_text_ids[:len(prompt_text_ids)] != prompt_text_ids

    def candidates():  # lazily: the first one almost always succeeds
        if not merged:
            yield joined_text_ids[len(prompt_text_ids):]
        after_prefix = _response_after_prefix(tokenizer, response)
        if after_prefix is not None:
            yield after_prefix
        yield tokenizer(response, add_special_tokens=False)["input_ids"]

    first = None
    for ids in candidates():
        if _decodes_to(tokenizer, prompt_text_ids + ids, text):
            return ids, merged, True
        first = ids if first is None else first
    return first, merged, False


def _assemble(prefix_ids: list[int], pieces: Sequence[tuple[list[int], bool]], end_ids: Sequence[int],
              max_seq_length: int, train_on_inputs: bool) -> tuple[list[int], list[int], str]:
    """One example from its segments' tokens: labels on responses (and their end ids), cut at max_seq_length."""
    input_ids = prefix_ids + pieces[0][0]
    if len(input_ids) >= max_seq_length:  # the prompt alone fills the window: nothing left to learn from
        return [], [], STATUS_DROPPED
    labels = list(input_ids) if train_on_inputs else [IGNORE_INDEX] * len(input_ids)
    for ids, supervised in pieces[1:]:
        tokens = ids + list(end_ids) if supervised else ids
        input_ids += tokens
        labels += tokens if supervised or train_on_inputs else [IGNORE_INDEX] * len(tokens)
    if len(input_ids) <= max_seq_length:
        return input_ids, labels, STATUS_OK
    # A too-long response loses its tail and its end token: the text did not end there.
    return input_ids[:max_seq_length], labels[:max_seq_length], STATUS_TRUNCATED


def encode_examples(prompts: Sequence[str], responses: Sequence[str], tokenizer, max_seq_length: int,
                    train_on_inputs: bool = False, end_ids: Sequence[int] | None = None) -> list[EncodedExample]:
    """Tokenise a batch of (prompt, response) pairs; the batch encodes run in the fast tokenizer's threads.

    ``end_ids`` follow each response (default: EOS); a chat format passes none, because its
    responses already end with the end-of-turn token.
    """
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token: the model could never learn to stop")
    end_ids = [tokenizer.eos_token_id] if end_ids is None else list(end_ids)
    framing = _framing(tokenizer)
    prompt_batch = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    joined_batch = tokenizer([p + r for p, r in zip(prompts, responses)], add_special_tokens=True)["input_ids"]
    examples = []
    for prompt, response, prompt_full, joined_full in zip(prompts, responses, prompt_batch, joined_batch):
        prompt_text_ids = _strip_framing(prompt_full, framing)
        response_ids, merged, exact = _response_ids(
            tokenizer, prompt, response, prompt_text_ids, _strip_framing(joined_full, framing))
        input_ids, labels, status = _assemble(
            framing.prefix, [(prompt_text_ids, False), (response_ids, True)], end_ids, max_seq_length, train_on_inputs)
        examples.append(EncodedExample(input_ids, labels, status, merged, exact))
    return examples


def encode_conversation(segments: Sequence[tuple[str, bool]], tokenizer, max_seq_length: int,
                        train_on_inputs: bool = False, end_ids: Sequence[int] = ()) -> EncodedExample:
    """Tokenise alternating prompt/response segments (several assistant turns), each in context after the last."""
    framing = _framing(tokenizer)
    text = segments[0][0]
    pieces = [(_strip_framing(tokenizer(text, add_special_tokens=True)["input_ids"], framing), False)]
    ids_so_far = list(pieces[0][0])
    merged_any, exact_all = False, True
    for segment_text, supervised in segments[1:]:
        joined = _strip_framing(tokenizer(text + segment_text, add_special_tokens=True)["input_ids"], framing)
        ids, merged, exact = _response_ids(tokenizer, text, segment_text, ids_so_far, joined)
        pieces.append((ids, supervised))
        ids_so_far += ids
        text += segment_text
        merged_any, exact_all = merged_any or merged, exact_all and exact
    input_ids, labels, status = _assemble(framing.prefix, pieces, end_ids, max_seq_length, train_on_inputs)
    return EncodedExample(input_ids, labels, status, merged_any, exact_all)


def encode_records(records: Sequence[dict], fmt, max_seq_length: int, train_on_inputs: bool = False) -> list[EncodedExample]:
    """Template-free records -> examples, rendered by ``fmt`` (a ``core.prompting.PromptFormat``).

    Single-exchange records (almost all) go through the batched :func:`encode_examples`;
    conversations with several assistant turns are encoded one by one.
    """
    segments = [fmt.segments(record) for record in records]
    simple = [i for i, s in enumerate(segments) if len(s) == 2]
    results: list[EncodedExample | None] = [None] * len(records)
    encoded = encode_examples([segments[i][0].text for i in simple], [segments[i][1].text for i in simple],
                              fmt.tokenizer, max_seq_length, train_on_inputs, fmt.end_ids) if simple else []
    for i, example in zip(simple, encoded):
        results[i] = example
    for i, s in enumerate(segments):
        if results[i] is None:
            results[i] = encode_conversation([(seg.text, seg.supervised) for seg in s], fmt.tokenizer, max_seq_length,
                                             train_on_inputs, fmt.end_ids)
    return results  # type: ignore[return-value]


def tokenize_example(prompt: str, response: str, tokenizer, max_seq_length: int,
                     train_on_inputs: bool = False) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask`` and ``labels`` (lists of ints) for one SFT example.

    Empty lists when the prompt alone fills ``max_seq_length`` (no supervised token would be left);
    use :func:`encode_examples` to also learn whether the example was truncated or dropped.
    """
    return encode_examples([prompt], [response], tokenizer, max_seq_length, train_on_inputs)[0].as_features()


# --------------------------------------------------------------------------- files


def read_jsonl_objects(path: Path, string_fields: Sequence[str] = ()) -> list[dict]:
    """The JSON objects of a JSONL file (blank lines skipped), each with ``string_fields`` as strings.

    Any problem is a one-line UserError naming the file and line. Shared by SFT rows, DPO pairs and
    the eval script's prompt files.
    """
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{line_number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            for key in string_fields:
                if not isinstance(row.get(key), str):
                    problem = "is missing" if key not in row else f"is {type(row[key]).__name__}, not a string"
                    raise UserError(f"{path}:{line_number}: field {key!r} {problem}")
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- collator


@dataclass
class PaddingCollator:
    """Pads a list of features per batch, on the right, to the longest (rounded up to a multiple).

    Labels are padded with -100 and the attention mask comes from each sequence's length, so a pad
    id equal to EOS never hides a real EOS. Extra keys (``length``) are ignored.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = 8

    def _padded_length(self, longest: int) -> int:
        multiple = self.pad_to_multiple_of or 1
        return -(-longest // multiple) * multiple

    def __call__(self, features: list[dict]) -> dict:
        import torch

        lengths = [len(f["input_ids"]) for f in features]
        width = self._padded_length(max(lengths))
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, (feature, length) in enumerate(zip(features, lengths)):
            input_ids[row, :length] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.as_tensor(feature["labels"], dtype=torch.long)
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
