"""``--preview N``: what exactly does the model see? N training examples as tokens, loss tokens marked.

    python -m sft.train_sft_mac --preview 3
    python -m sft.train_sft_mac --template chat --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct --preview 2

Each example is printed as text with the tokens that carry the loss between ``[[`` and ``]]``
(so the end token the model learns to stop with is visible), then its counts. Nothing is trained
and the output dir is not touched.
"""
from __future__ import annotations

from core.prompting import prompt_format
from core.tokenization import IGNORE_INDEX, STATUS_DROPPED, encode_records
from sft.dataset import read_sft_rows

LOSS_OPEN, LOSS_CLOSE = "[[", "]]"


def marked_text(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """The example's text with each run of loss-carrying tokens wrapped in [[ ]]."""
    pieces, run, in_loss = [], [], False
    for token, label in zip(input_ids, labels):
        carries = label != IGNORE_INDEX
        if carries != in_loss and run:
            text = tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            pieces.append(f"{LOSS_OPEN}{text}{LOSS_CLOSE}" if in_loss else text)
            run = []
        run.append(token)
        in_loss = carries
    if run:
        text = tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        pieces.append(f"{LOSS_OPEN}{text}{LOSS_CLOSE}" if in_loss else text)
    return "".join(pieces)


def preview(config, tokenizer, log=print) -> None:
    """Print ``config.preview`` examples of the training file, rendered with the run's template."""
    template = config.prompt_template()
    fmt = prompt_format(template, tokenizer)
    rows = read_sft_rows(config.train_file, config.response_key)[:config.preview]
    encoded = encode_records(rows, fmt, config.max_seq_length, config.train_on_inputs)
    log(f"template {template.name!r}; loss on {'prompt and response' if config.train_on_inputs else 'response tokens only'} "
        f"(marked {LOSS_OPEN} {LOSS_CLOSE}); stops at {[tokenizer.convert_ids_to_tokens(i) for i in fmt.stop_ids]}")
    for number, (row, example) in enumerate(zip(rows, encoded), start=1):
        log(f"\n----- example {number} of {len(rows)} ({config.train_file}) -----")
        if example.status == STATUS_DROPPED:
            log(f"dropped: the prompt alone fills max_seq_length={config.max_seq_length}")
            continue
        log(marked_text(tokenizer, example.input_ids, example.labels))
        in_loss = sum(label != IGNORE_INDEX for label in example.labels)
        log(f"----- {len(example.input_ids)} tokens, {in_loss} in the loss, {len(example.input_ids) - in_loss} not; "
            f"status {example.status}" + ("" if example.round_trip_exact else "; tokens do not decode back to the exact text"))
