"""Prompt templates as data files (``core/templates/<name>.json``), one renderer for every stage.

Data preparation, training, evaluation and DPO all render prompts through :func:`render_prompt`
so the text the model is trained on is exactly the text it is prompted with later.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent / "templates"
DEFAULT_TEMPLATE = "alpaca"


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    prompt_input: str
    prompt_no_input: str
    response_split: str
    description: str = ""

    def render(self, instruction: str, input: str | None = "") -> str:
        """The prompt text, ending exactly where the response begins.

        An empty input selects the no-input variant, so no empty ``### Input:`` section appears.
        """
        if input:
            return self.prompt_input.format(instruction=instruction, input=input)
        return self.prompt_no_input.format(instruction=instruction)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "prompt_input": self.prompt_input,
            "prompt_no_input": self.prompt_no_input,
            "response_split": self.response_split,
        }


def load_template(name_or_path: str = DEFAULT_TEMPLATE) -> PromptTemplate:
    """Load a template by name (a file in ``core/templates``) or by path to a JSON file."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = TEMPLATE_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))
        raise ValueError(f"unknown prompt template {name_or_path!r} (known: {', '.join(known)}, or a path to a .json file)")
    data = json.loads(path.read_text(encoding="utf-8"))
    return template_from_dict(data, default_name=path.stem)


def template_from_dict(data: dict, default_name: str = "custom") -> PromptTemplate:
    """Rebuild a template from its saved form (e.g. the copy stored in a run's config)."""
    return PromptTemplate(
        name=data.get("name", default_name),
        prompt_input=data["prompt_input"],
        prompt_no_input=data["prompt_no_input"],
        response_split=data["response_split"],
        description=data.get("description", ""),
    )


def render_prompt(instruction: str, input: str | None = "", template: PromptTemplate | None = None) -> str:
    """Render with the given template (default: Alpaca)."""
    return (template or load_template()).render(instruction, input)
