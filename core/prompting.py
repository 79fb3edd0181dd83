"""Prompt templates, applied at tokenization: the run's ``--template`` decides how a record becomes text.

Prepared data, preference pairs and eval prompts are *template-free* records::

    {"instruction": "...", "input": "...", "output": "..."}          # Alpaca-style
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}

and a :class:`PromptFormat` (a template bound to the run's tokenizer) turns one into text
segments, alternating prompt (no loss) and response (loss). Training, evaluation, DPO pair
building and DPO/reward training all get the format from the run's saved template, so a
train/eval template mismatch cannot happen by construction.

Two kinds of template:

- ``text`` templates are data files (``core/templates/<name>.json``, e.g. ``alpaca``): the prompt is
  the rendered instruction/input, the response is the output followed by the tokenizer's EOS.
- ``chat`` uses the tokenizer's own chat template: the prompt is the conversation up to an
  assistant turn with the generation prompt, exactly as ``apply_chat_template(...,
  add_generation_prompt=True)`` renders it; the response is what the template puts between that
  and the end of the turn: the assistant's text plus the end-of-turn token (``</s>`` for
  TinyLlama-Chat, ``<|im_end|>`` for ChatML models such as SmolLM2 and Qwen). Every assistant turn
  of a conversation is a response.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from core.cli import UserError

TEMPLATE_DIR = Path(__file__).parent / "templates"
DEFAULT_TEMPLATE = "alpaca"
CHAT = "chat"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    prompt_input: str = ""
    prompt_no_input: str = ""
    response_split: str = ""
    description: str = ""
    kind: str = "text"  # text | chat
    system_prompt: str | None = None  # chat only: a system message put before every conversation

    def render(self, instruction: str, input: str | None = "") -> str:
        """The prompt text of a text template, ending exactly where the response begins.

        An empty input selects the no-input variant, so no empty ``### Input:`` section appears.
        """
        if self.kind == CHAT:
            raise ValueError("a chat template renders through the tokenizer: use prompt_format(template, tokenizer)")
        if input:
            return self.prompt_input.format(instruction=instruction, input=input)
        return self.prompt_no_input.format(instruction=instruction)

    def to_dict(self) -> dict:
        data = {"name": self.name, "kind": self.kind, "description": self.description}
        if self.kind == CHAT:
            return {**data, "system_prompt": self.system_prompt}
        return {**data, "prompt_input": self.prompt_input, "prompt_no_input": self.prompt_no_input,
                "response_split": self.response_split}


def known_templates() -> list[str]:
    return sorted([p.stem for p in TEMPLATE_DIR.glob("*.json")] + [CHAT])


def load_template(name_or_path: str = DEFAULT_TEMPLATE, system_prompt: str | None = None) -> PromptTemplate:
    """A template by name (``chat``, or a file in ``core/templates``) or by path to a JSON file."""
    if name_or_path == CHAT:
        return PromptTemplate(CHAT, kind=CHAT, system_prompt=system_prompt,
                              description="the tokenizer's own chat template (tokenizer.chat_template)")
    if system_prompt:
        raise ValueError("system_prompt needs --template chat (text templates have no system message)")
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = TEMPLATE_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ValueError(f"unknown prompt template {name_or_path!r} (known: {', '.join(known_templates())}, "
                         "or a path to a .json file)")
    data = json.loads(path.read_text(encoding="utf-8"))
    return template_from_dict(data, default_name=path.stem)


def template_from_dict(data: dict, default_name: str = "custom") -> PromptTemplate:
    """Rebuild a template from its saved form (e.g. the copy stored in a run's config)."""
    if data.get("kind") == CHAT:
        return PromptTemplate(data.get("name", CHAT), kind=CHAT, description=data.get("description", ""),
                              system_prompt=data.get("system_prompt"))
    return PromptTemplate(
        name=data.get("name", default_name),
        prompt_input=data["prompt_input"],
        prompt_no_input=data["prompt_no_input"],
        response_split=data["response_split"],
        description=data.get("description", ""),
    )


# --------------------------------------------------------------------------- records


def record_messages(record: dict, system_prompt: str | None = None) -> list[dict[str, str]]:
    """A record as a conversation: ``messages`` as given, or instruction (+ input) / output as one exchange."""
    if "messages" in record:
        messages = [dict(m) for m in record["messages"]]
    else:
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        messages = [{"role": "user", "content": user}]
        if record.get("output") is not None:
            messages.append({"role": "assistant", "content": record["output"]})
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def record_problem(row: Any) -> str | None:
    """Why a row is not a usable template-free record (None when it is)."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list"
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return f"each message needs a role ({', '.join(ROLES)}) and a string content"
        return None
    if not isinstance(row.get("instruction"), str):
        if isinstance(row.get("prompt"), str):
            return ("the row holds a rendered 'prompt' and no 'instruction': it was prepared before templates moved to "
                    "training; rerun the prepare script")
        return "needs 'instruction' (and optional 'input') or 'messages'"
    if "input" in row and row["input"] is not None and not isinstance(row["input"], str):
        return "'input' must be a string"
    return None


# --------------------------------------------------------------------------- formats


class Segment(NamedTuple):
    text: str
    supervised: bool  # True: a response (carries the loss)


class PromptFormat:
    """A template bound to a tokenizer: prompt text for generation, segments for training.

    ``end_ids`` are appended after each response by the encoder (a text template's EOS; empty
    for chat, whose responses already end with the end-of-turn token). ``stop_ids`` end a
    generation: EOS and the end-of-turn token.
    """

    def __init__(self, template: PromptTemplate, tokenizer):
        self.template = template
        self.tokenizer = tokenizer
        if tokenizer.eos_token_id is None:
            raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token: "
                            "the model could never learn to stop")
        self.end_text = ""
        self.end_ids = [tokenizer.eos_token_id]
        if template.kind == CHAT:
            self.end_text, end_id = _end_of_turn(tokenizer)
            self.end_ids = []
            self.stop_ids = sorted({tokenizer.eos_token_id, end_id})
            self.finish_ids = [end_id]
        else:
            self.stop_ids = [tokenizer.eos_token_id]
            self.finish_ids = [tokenizer.eos_token_id]
        # finish_ids: what closes a finished response in training (EOS, or the end-of-turn token), to
        # append to a generation that stopped before scoring it as a trained response (reward model).

    @property
    def is_chat(self) -> bool:
        return self.template.kind == CHAT

    def prompt(self, record: dict) -> str:
        """The text a model continues to answer ``record``: everything before its (last) response."""
        if not self.is_chat:
            instruction, input_text = _single_exchange(record)
            return self.template.render(instruction, input_text)
        messages = record_messages({k: v for k, v in record.items() if k != "output"}, self.template.system_prompt)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return self._render(messages, add_generation_prompt=True)

    def segments(self, record: dict) -> list[Segment]:
        """Prompt and response segments of a record with its response(s), alternating, ending with a response."""
        if not self.is_chat:
            instruction, input_text = _single_exchange(record)
            output = record.get("output")
            if output is None:
                output = next(m["content"] for m in record["messages"] if m["role"] == "assistant")
            return [Segment(self.template.render(instruction, input_text), False), Segment(output, True)]
        return self._chat_segments(record_messages(record, self.template.system_prompt))

    def response_segments(self, record: dict, response: str) -> list[Segment]:
        """Segments of ``record`` answered by ``response`` (a DPO/reward pair's chosen or rejected text)."""
        return self.segments({**{k: v for k, v in record.items() if k not in ("output", "messages")},
                              **_with_last_answer(record, response)})

    # --- chat ------------------------------------------------------------------------------
    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # jinja raises its own types (e.g. "roles must alternate")
            raise UserError(f"the tokenizer's chat template cannot render this conversation: {str(exc).splitlines()[0]}") from None

    def _chat_segments(self, messages: list[dict]) -> list[Segment]:
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not answers:
            raise UserError("a conversation without an assistant turn has nothing to learn from")
        full = self._render(messages[:answers[-1] + 1], add_generation_prompt=False)
        segments, cursor = [], 0
        for i in answers:
            prefix = self._render(messages[:i], add_generation_prompt=True)
            start = full.find(messages[i]["content"], len(prefix))
            if not full.startswith(prefix) or start < 0 or full[len(prefix):start].strip():
                raise UserError("this chat template renders a conversation differently from its prefix with the "
                                "generation prompt, so prompt and response cannot be cut token-exactly: use --template alpaca")
            end = start + len(messages[i]["content"])
            if not full.startswith(self.end_text, end):
                raise UserError(f"the chat template does not end an assistant turn with {self.end_text!r}")
            end += len(self.end_text)
            segments += [Segment(full[cursor:len(prefix)], False), Segment(full[len(prefix):end], True)]
            cursor = end
        return segments


def prompt_format(template: PromptTemplate, tokenizer) -> PromptFormat:
    """The format a run trains and is evaluated with; a one-line error for chat without a chat template."""
    if template.kind == CHAT and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"--template chat: tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template "
                        "(a base model, not an instruct/chat model): use --template alpaca")
    return PromptFormat(template, tokenizer)


def _single_exchange(record: dict) -> tuple[str, str]:
    """(instruction, input) of a record for a text template, which has room for one user turn."""
    if "messages" not in record:
        return record["instruction"], record.get("input") or ""
    roles = [m["role"] for m in record["messages"]]
    if roles not in (["user"], ["user", "assistant"]):
        raise UserError("a text template (e.g. alpaca) holds one user turn and one answer; conversations with "
                        "system messages or several turns need --template chat")
    return record["messages"][0]["content"], ""


def _with_last_answer(record: dict, response: str) -> dict:
    if "messages" not in record:
        return {"output": response}
    messages = [m for m in record["messages"]]
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return {"messages": messages + [{"role": "assistant", "content": response}]}


_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "PROBE_ANSWER"}]


def _end_of_turn(tokenizer) -> tuple[str, int]:
    """(text, id) of the special token the chat template puts right after an assistant's text."""
    try:
        full = tokenizer.apply_chat_template(_PROBE, tokenize=False)
    except Exception as exc:
        raise UserError(f"the tokenizer's chat template cannot render a conversation: {str(exc).splitlines()[0]}") from None
    tail = full[full.index("PROBE_ANSWER") + len("PROBE_ANSWER"):]
    special = {tokenizer.convert_ids_to_tokens(i): i for i in tokenizer.all_special_ids}
    special.update({t.content: i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()})
    for text in sorted(special, key=len, reverse=True):
        if text and tail.startswith(text):
            return text, special[text]
    raise UserError("the chat template ends an assistant turn without a special token, so the model could not "
                    "learn to stop: use --template alpaca")


def render_prompt(instruction: str, input: str | None = "", template: PromptTemplate | None = None) -> str:
    """Render with the given text template (default: Alpaca)."""
    return (template or load_template()).render(instruction, input)


def prompt_file_rows(path: str | Path, what: str, unit: str) -> list[dict]:
    """The rows of a file of prompts: the JSON objects of a JSONL file (a ``.jsonl`` name, or text that starts
    with ``{``), or each line of a text file as ``{"instruction": line}`` (blank and ``#`` lines skipped).

    Shared by the evaluation's ``--prompts`` and RLOO's ``--prompt_file``; each reads its rows its way.
    A missing file, or one without a row, is a one-line UserError: ``{what} PATH not found`` / ``holds no {unit}``.
    """
    from core.tokenization import read_jsonl_objects

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix == ".jsonl" or text.lstrip().startswith("{"):
        rows = read_jsonl_objects(path)
    else:
        lines = [line.strip() for line in text.splitlines()]
        rows = [{"instruction": line} for line in lines if line and not line.startswith("#")]
    if not rows:
        raise UserError(f"{what} {path} holds no {unit}")
    return rows
