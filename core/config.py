"""Strict, typed config parsing shared by every stage's config (SFT, DPO, reward model, RLOO).

A run's config is a dataclass. Values come, lowest priority first, from the dataclass defaults,
the entry point's preset (``mac`` / ``cuda``), a ``--config`` YAML/JSON file, then command-line
flags (``--key value`` or ``--key=value``). Unknown keys and values of the wrong type are a
:class:`ConfigError` naming the key, raised before any model is loaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

from core.cli import SuggestingParser, UserError

# Every linear projection of a Llama-style attention and MLP block: adapting only q/v (the old
# alpaca-lora default) leaves most of the model's capacity untouched.
ALL_LINEAR_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Shortest usable sequence: the Alpaca template alone is ~40 tokens, and a response needs room.
MIN_SEQ_LENGTH = 64

_NONE_WORDS = {"none", "null"}
_TRUE_WORDS = {"true", "1", "yes", "y", "on"}
_FALSE_WORDS = {"false", "0", "no", "n", "off"}


class ConfigError(UserError):
    """A config key, value or combination that cannot be used."""


# --------------------------------------------------------------------------- declaring keys


def key(default: Any, help: str, **extra: Any) -> Any:
    """A config field with its help text (and optional choices) next to the default."""
    metadata = {"help": help, **extra}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_training_keys(config: Any, *, length_key: str, extra_positive: Sequence[str] = (),
                        extra_optional_positive: Sequence[str] = ()) -> None:
    """The checks every training config (SFT and DPO) shares; raises ConfigError naming the key."""
    positive = ["lora_r", "lora_alpha", "per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "logging_steps", "eval_steps", "save_steps", *extra_positive]
    for key in positive:
        if getattr(config, key) <= 0:
            raise ConfigError(f"{key} must be > 0, got {getattr(config, key)}")
    length = getattr(config, length_key)
    if length < MIN_SEQ_LENGTH:
        raise ConfigError(f"{length_key} must be at least {MIN_SEQ_LENGTH} (the prompt template alone is ~40 tokens), got {length}")
    if not 0.0 <= config.lora_dropout < 1.0:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {config.lora_dropout}")
    if config.learning_rate <= 0:
        raise ConfigError(f"learning_rate must be > 0, got {config.learning_rate}")
    if not 0.0 <= config.warmup_ratio < 1.0:
        raise ConfigError(f"warmup_ratio must be in [0, 1), got {config.warmup_ratio}")
    if config.max_steps == 0 or config.max_steps < -1:
        raise ConfigError(f"max_steps must be -1 (use epochs) or > 0, got {config.max_steps}")
    if config.max_steps == -1 and config.num_train_epochs <= 0:
        raise ConfigError("num_train_epochs must be > 0 when max_steps is -1")
    if not config.lora_target_modules:
        raise ConfigError("lora_target_modules is empty: name at least one module to adapt")
    for key in ("max_train_samples", "max_eval_samples", "save_total_limit", *extra_optional_positive):
        value = getattr(config, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{key} must be > 0 or none, got {value}")
    if config.resume and config.overwrite_output_dir:
        raise ConfigError("choose one of resume (continue the run in output_dir) and overwrite_output_dir (start over)")
    if config.template is not None:
        from core.prompting import load_template

        try:
            load_template(config.template, getattr(config, "system_prompt", None))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


# --------------------------------------------------------------------------- field types


def _field_type(cls: type, field: dataclasses.Field) -> tuple[type, bool]:
    """Return (base type, optional?) for a field: ``Optional[int]`` -> (int, True)."""
    hint = typing.get_type_hints(cls)[field.name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return hint, False


def _is_list(tp: type) -> bool:
    return typing.get_origin(tp) is list


def _item_type(tp: type) -> type:
    """The element type of a list key (``list[str]``, ``list[float]``)."""
    return (typing.get_args(tp) or (str,))[0]


def _type_name(tp: type, optional: bool) -> str:
    name = f"list of {_item_type(tp).__name__}" if _is_list(tp) else tp.__name__
    return f"{name} or none" if optional else name


def _coerce_string(text: str, tp: type, optional: bool) -> Any:
    """Convert a command-line string to the field's type (raises ValueError)."""
    if optional and text.strip().lower() in _NONE_WORDS:
        return None
    if tp is bool:
        word = text.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise ValueError(text)
    if _is_list(tp):
        return [_item_type(tp)(part.strip()) for part in text.split(",") if part.strip()]
    return tp(text)


def _check_value(key: str, value: Any, tp: type, optional: bool) -> Any:
    """Check a value that came typed (from YAML/JSON or a preset); ints are accepted for floats."""
    if value is None and optional:
        return None
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
        or (_is_list(tp) and isinstance(value, list) and all(_item_ok(v, _item_type(tp)) for v in value))
    )
    if _is_list(tp) and isinstance(value, str):  # "q_proj,v_proj" is a convenient spelling
        return _coerce_string(value, tp, optional)
    if not ok:
        raise ConfigError(f"config key {key!r} expects {_type_name(tp, optional)}, got {value!r} ({type(value).__name__})")
    if _is_list(tp) and _item_type(tp) is float:
        return [float(v) for v in value]
    return float(value) if tp is float else value


def _item_ok(value: Any, tp: type) -> bool:
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


# --------------------------------------------------------------------------- parser


class _StrictParser(SuggestingParser):
    """argparse that raises ConfigError (one line, with "did you mean" for a near-miss key) instead
    of printing usage and exiting."""

    unknown_message = "unknown config key(s)"

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def ordered_fields(cls: type) -> list[dataclasses.Field]:
    """A config's fields with the stage's own keys first, then the shared ones (``core.keys``)."""
    own = set(vars(cls).get("__annotations__", {}))
    fields = dataclasses.fields(cls)
    return [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]


def _build_parser(cls: type, prog: str | None, description: str | None, defaults: Mapping[str, Any]) -> _StrictParser:
    parser = _StrictParser(
        prog=prog,
        description=description,
        allow_abbrev=False,  # --max_step must not silently mean --max_steps
        argument_default=argparse.SUPPRESS,  # only flags actually given override lower layers
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of config keys; command-line flags win over it")
    for field in ordered_fields(cls):
        tp, optional = _field_type(cls, field)
        help_text = f"{field.metadata.get('help', '')} [{_type_name(tp, optional)}; default: {defaults[field.name]!r}]"
        choices = field.metadata.get("choices")
        if choices:
            help_text += f" (one of: {', '.join(choices)})"
        kwargs: dict[str, Any] = {"help": help_text, "metavar": "VALUE", "dest": field.name}
        if tp is bool:
            kwargs.update(nargs="?", const="true")  # `--resume` alone means true
        elif _is_list(tp):
            kwargs.update(nargs="+")  # `--report_to tensorboard wandb` or `--report_to a,b`
        parser.add_argument(f"--{field.name}", **kwargs)
    return parser


def _load_config_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except (ValueError, Exception) as exc:  # yaml.YAMLError and json.JSONDecodeError
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"cannot parse config file {path}: {first_line}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value, got {type(data).__name__}")
    return data


def _merge_layer(cls: type, values: dict[str, Any], layer: Mapping[str, Any], origin: str) -> None:
    """Check a typed layer (preset or file) key by key and merge it into ``values``."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in layer.items():
        if key not in known:
            raise ConfigError(f"unknown config key {key!r} in {origin}")
        tp, optional = _field_type(cls, known[key])
        values[key] = _check_value(key, value, tp, optional)


def _merge_cli(cls: type, values: dict[str, Any], parsed: Mapping[str, Any]) -> None:
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key, raw in parsed.items():
        tp, optional = _field_type(cls, known[key])
        try:
            if _is_list(tp):
                items = [part for token in raw for part in _coerce_string(token, tp, optional) or []]
                # `--report_to none` means an empty list, as in Hugging Face TrainingArguments.
                values[key] = [] if items in (["none"], ["None"]) else items
            else:
                values[key] = _coerce_string(raw, tp, optional)
        except ValueError:
            raise ConfigError(f"--{key} expects {_type_name(tp, optional)}, got {raw!r}") from None


def _check_choices(cls: type, config: Any) -> None:
    for field in dataclasses.fields(cls):
        choices = field.metadata.get("choices")
        value = getattr(config, field.name)
        if choices and value not in choices:
            raise ConfigError(f"config key {field.name!r} must be one of {', '.join(choices)}; got {value!r}")


def resolve_config(
    cls: type,
    argv: Sequence[str] | None,
    preset: Mapping[str, Any] | None = None,
    preset_name: str = "",
    prog: str | None = None,
    description: str | None = None,
):
    """Build a ``cls`` instance from defaults < preset < ``--config`` file < command-line flags.

    Calls the dataclass's ``validate()`` (if any) so invalid combinations fail here, before any
    model or data is loaded. ``--help`` prints every key with its default and meaning.
    """
    values = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default) for f in dataclasses.fields(cls)}
    _merge_layer(cls, values, preset or {}, f"preset {preset_name!r}")
    parser = _build_parser(cls, prog, description, values)
    parsed = vars(parser.parse_args(list(argv) if argv is not None else None))
    config_file = parsed.pop("config", None)
    if config_file:
        _merge_layer(cls, values, _load_config_file(config_file), config_file)
    _merge_cli(cls, values, parsed)
    config = cls(**values)
    _check_choices(cls, config)
    if hasattr(config, "validate"):
        config.validate()
    return config


# --------------------------------------------------------------------------- printing / saving


def format_config(config: Any, title: str = "config") -> str:
    """An aligned ``key = value`` listing of every field, for the start of a run's log."""
    values = dataclasses.asdict(config)
    items = {field.name: values[field.name] for field in ordered_fields(type(config))}
    width = max(len(k) for k in items)
    lines = [f"{title}:"] + [f"  {key:<{width}} = {value!r}" for key, value in items.items()]
    return "\n".join(lines)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON via a temporary file and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def config_from_dict(cls: type, data: Mapping[str, Any]):
    """Rebuild a config saved by a run; keys this version no longer knows are an error."""
    values: dict[str, Any] = {}
    _merge_layer(cls, values, data, "saved config")
    return cls(**values)
