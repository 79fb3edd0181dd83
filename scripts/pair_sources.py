"""Where preference pairs come from: parsing pair files (``--format pairs``) and HH-RLHF dialogues.

Used by ``scripts/prepare_dpo_data.py``; every row is either kept as a template-free pair or
dropped with a reason (counted in the summary table and written to ``prefs_rejected.jsonl``).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from core.cli import UserError
from core.prompting import PromptTemplate
from scripts.data_io import content_id, load_json_records, normalise_whitespace, read_data_text

# Why a row is dropped, per source kind, in the order the checks run (and the table lists them).
_READ_REASONS = ("invalid_json", "not_an_object", "missing_field", "field_not_string")
_PAIR_REASONS = ("empty_prompt", "empty_chosen", "empty_rejected", "chosen_equals_rejected", "duplicate")
FILE_REASONS = {
    "pairs": _READ_REASONS + _PAIR_REASONS,
    "hh-rlhf": _READ_REASONS + ("no_assistant_turn", "prompt_mismatch", "last_turn_not_human") + _PAIR_REASONS,
}

ASSISTANT_MARKER = "\n\nAssistant:"
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
# A prompt in Alpaca layout, with or without the preamble and whatever spacing the variant uses.
ALPACA_LAYOUT = re.compile(
    r"### Instruction:[ \t]*\n(?P<instruction>.*?)\n\n(?:### Input:[ \t]*\n(?P<input>.*?)\n\n)?### Response:\s*\Z",
    re.DOTALL,
)


class Rejected(Exception):
    """A row that cannot be used; ``reason`` is one of the *_REASONS names."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Collected:
    """Rows kept and rejected from one source, with the counts the summary shows."""

    source: str
    reasons: tuple[str, ...]
    rows: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    read: int = 0
    notes: dict[str, int] = field(default_factory=dict)  # about kept rows, e.g. prompts re-rendered
    seen: dict[tuple, str] = field(default_factory=dict)

    def drop(self, index: int, reason: str, record: Any) -> None:
        entry = {"source": self.source, "index": index, "reason": reason, "record": record}
        self.rejected.append(entry)

    def note(self, name: str) -> None:
        self.notes[name] = self.notes.get(name, 0) + 1

    def dropped_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.reasons, 0)
        for entry in self.rejected:
            counts[entry["reason"]] += 1
        return counts


# ----------------------------------------------------------------------------- one pair -> one row


def make_row(source: str, instruction: str, input_text: str, chosen: str, rejected: str) -> dict:
    """A pair in the output format, its id a hash of its content (so it follows the pair, not its position)."""
    key = pair_key(instruction, input_text, chosen, rejected)
    return {
        "id": content_id("pref", *key),
        "source": source,
        "instruction": instruction,
        "input": input_text,
        "chosen": chosen,
        "rejected": rejected,
    }


def pair_key(instruction: str, input_text: str, chosen: str, rejected: str) -> tuple[str, ...]:
    return tuple(normalise_whitespace(text) for text in (instruction, input_text, chosen, rejected))


def check_responses(chosen: str, rejected: str) -> tuple[str, str]:
    """Both replies stripped; empty or identical replies teach DPO nothing."""
    chosen, rejected = chosen.strip(), rejected.strip()
    if not chosen:
        raise Rejected("empty_chosen")
    if not rejected:
        raise Rejected("empty_rejected")
    if normalise_whitespace(chosen) == normalise_whitespace(rejected):
        raise Rejected("chosen_equals_rejected")
    return chosen, rejected


def text_fields(record: Any, names: Iterable[str]) -> dict[str, str]:
    if not isinstance(record, dict):
        raise Rejected("not_an_object")
    values = {}
    for name in names:
        if name not in record or record[name] is None:
            raise Rejected("missing_field")
        if not isinstance(record[name], str):
            raise Rejected("field_not_string")
        values[name] = record[name]
    return values


# ----------------------------------------------------------------------------- format: pairs


def parse_prompt_text(prompt: str, template: PromptTemplate) -> tuple[str, str, str]:
    """(instruction, input, how) from a rendered prompt; ``how`` says what was done to fit the template."""
    match = ALPACA_LAYOUT.search(prompt.rstrip())
    if match is None:
        return prompt.strip(), "", "prompt_used_as_instruction"
    instruction, input_text = match["instruction"].strip(), (match["input"] or "").strip()
    how = "prompt_in_template" if template.render(instruction, input_text) == prompt else "prompt_parsed_from_variant"
    return instruction, input_text, how


def parse_pairs_record(record: Any, template: PromptTemplate) -> tuple[tuple[str, str, str, str], str]:
    """((instruction, input, chosen, rejected), how the prompt was obtained)."""
    if isinstance(record, dict) and "instruction" in record:
        values = text_fields(record, ("instruction", "chosen", "rejected"))
        input_text = record.get("input") or ""
        if not isinstance(input_text, str):
            raise Rejected("field_not_string")
        instruction, input_text, how = values["instruction"].strip(), input_text.strip(), "instruction_given"
    else:
        values = text_fields(record, ("prompt", "chosen", "rejected"))
        instruction, input_text, how = parse_prompt_text(values["prompt"], template)
    if not instruction:
        raise Rejected("empty_prompt")
    chosen, rejected = check_responses(values["chosen"], values["rejected"])
    return (instruction, input_text, chosen, rejected), how


# ----------------------------------------------------------------------------- format: hh-rlhf


def split_last_reply(dialogue: str) -> tuple[str, str]:
    """(everything before the last ``\\n\\nAssistant:``, the reply after it)."""
    cut = dialogue.rfind(ASSISTANT_MARKER)
    if cut < 0:
        raise Rejected("no_assistant_turn")
    return dialogue[:cut], dialogue[cut + len(ASSISTANT_MARKER):]


def dialogue_turns(prefix: str) -> list[tuple[str, str]]:
    """[(role, text), ...] of a ``\\n\\nHuman: ...\\n\\nAssistant: ...`` transcript."""
    if not prefix.startswith("\n\n"):
        prefix = "\n\n" + prefix.lstrip()  # a transcript that starts with "Human:" directly
    parts = HH_TURN.split(prefix)
    lead, rest = parts[0], parts[1:]
    turns = [(rest[i], rest[i + 1].strip()) for i in range(0, len(rest), 2)]
    if lead.strip():
        turns.insert(0, ("Human", lead.strip()))  # text before any marker: the user spoke first
    return turns


def dialogue_to_instruction(prefix: str) -> tuple[str, str]:
    """Instruction = the last Human turn; input = the earlier turns as ``Role: text`` lines."""
    turns = dialogue_turns(prefix)
    if not turns or turns[-1][0] != "Human":
        raise Rejected("last_turn_not_human")
    instruction = turns[-1][1]
    if not instruction:
        raise Rejected("empty_prompt")
    history = "\n".join(f"{role}: {text}" for role, text in turns[:-1])
    return instruction, history


def parse_hh_record(record: Any, template: PromptTemplate) -> tuple[tuple[str, str, str, str], str]:
    """((instruction, input, chosen, rejected), single_turn | multi_turn)."""
    values = text_fields(record, ("chosen", "rejected"))
    chosen_prefix, chosen = split_last_reply(values["chosen"])
    rejected_prefix, rejected = split_last_reply(values["rejected"])
    if chosen_prefix != rejected_prefix:
        raise Rejected("prompt_mismatch")  # the two replies answer different conversations
    instruction, history = dialogue_to_instruction(chosen_prefix)
    chosen, rejected = check_responses(chosen, rejected)
    return (instruction, history, chosen, rejected), ("multi_turn" if history else "single_turn")


PARSERS = {"pairs": parse_pairs_record, "hh-rlhf": parse_hh_record}


# ----------------------------------------------------------------------------- reading files


class InvalidJSON:
    """Stands in for a line that could not be parsed, so it is counted rather than aborting the run."""

    def __init__(self, line: str, message: str):
        self.line, self.message = line, message

    def as_record(self) -> dict:
        return {"line": self.line, "error": self.message}


def read_records(path: Path) -> list[tuple[int, Any]]:
    """(position, record) pairs: the line number for JSON Lines (``.jsonl``, ``.jsonl.gz``), the index for a JSON list."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.name.endswith((".json", ".json.gz")):
        return list(enumerate(load_json_records(path)))
    records = []
    for number, line in enumerate(read_data_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            records.append((number, InvalidJSON(line, f"column {exc.colno}: {exc.msg}")))
    return records


def collect_from_file(path: Path, fmt: str, template: PromptTemplate) -> Collected:
    """Parse every record; keep usable, non-duplicate pairs; count and keep the rest with a reason."""
    collected = Collected(source=f"{fmt}:{path.name}", reasons=FILE_REASONS[fmt])
    parse = PARSERS[fmt]
    for position, record in read_records(path):
        collected.read += 1
        try:
            if isinstance(record, InvalidJSON):
                raise Rejected("invalid_json")
            pair, note = parse(record, template)
        except Rejected as rejected:
            collected.drop(position, rejected.reason, record.as_record() if isinstance(record, InvalidJSON) else record)
            continue
        add_pair(collected, position, record, pair, note)
    return collected


def add_pair(collected: Collected, position: int, record: Any, pair: tuple[str, str, str, str],
             note: str | None = None) -> None:
    """Keep a parsed pair unless an identical pair (ignoring whitespace) is already kept."""
    key = pair_key(*pair)
    if key in collected.seen:
        collected.drop(position, "duplicate", record)
        collected.rejected[-1]["duplicate_of"] = collected.seen[key]
        return
    row = make_row(collected.source, *pair)
    collected.seen[key] = row["id"]
    collected.rows.append(row)
    if note:
        collected.note(note)
