"""The stage registry: what the rest of the project knows about each training stage, as data.

``core/runs.py`` (which config file a run holds), ``scripts/study_presets.py`` (which module trains
a stage, where its run goes) and ``evaluation/`` (how a column is named, what it is compared with,
whether its run has an implicit reward) read a stage from here and never import it: core imports no
stage, and no stage imports another. A new stage is a folder (its config, entry points and run, on
``core.stage.StageRun``) plus one :func:`register_stage` entry below (CONTRIBUTING.md: "Adding a stage").
A stage defined elsewhere (a test, a plug-in) may register itself the same way before it runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class StageInfo:
    """One training stage, as the rest of the project sees it."""

    name: str  # the run's stage in its config file ("dpo"), and its folder in a study
    title: str  # how reports name it ("DPO")
    entry_modules: Mapping[str, str] = field(default_factory=dict)  # preset -> module: {"mac": "dpo.train_dpo_mac"}
    starts_from: str | None = None  # the stage whose run it continues (None: the base model)
    policy: bool = True  # its adapter generates text (False: it scores text, as a reward model does)
    # Its policy's log-ratio to its reference is the reward it trained (DPO): evaluation's preference
    # metrics take beta, max_length and the held-out pairs from such a run.
    implicit_reward: bool = False

    @property
    def config_file(self) -> str:
        """The file a run of this stage writes first, and by which later readers recognise it."""
        return f"{self.name}_config.json"

    def entry_module(self, preset: str) -> str:
        """The module that trains this stage on ``preset``'s hardware (``mac`` or ``cuda``)."""
        return self.entry_modules[preset]

    def command(self, preset: str) -> str:
        return f"python -m {self.entry_module(preset)}"


_STAGES: dict[str, StageInfo] = {}  # in registration order, which is the pipeline's


def register_stage(info: StageInfo) -> StageInfo:
    """Add a stage (once: another stage under a taken name is an error); returns it."""
    known = _STAGES.get(info.name)
    if known is not None and known != info:
        raise ValueError(f"a stage named {info.name!r} is already registered: {known}")
    _STAGES[info.name] = info
    return info


def unregister_stage(name: str) -> None:
    """Remove a stage registered for a while (a test's toy stage)."""
    _STAGES.pop(name, None)


def registered_stages() -> list[StageInfo]:
    return list(_STAGES.values())


def stage_info(name: str) -> StageInfo:
    try:
        return _STAGES[name]
    except KeyError:
        raise KeyError(f"no stage named {name!r} is registered (known: {', '.join(_STAGES)})") from None


def find_stage(name: str) -> StageInfo | None:
    return _STAGES.get(name)


def _modules(package: str, name: str) -> dict[str, str]:
    return {preset: f"{package}.train_{name}_{preset}" for preset in ("mac", "cuda")}


# --------------------------------------------------------------------------- the project's stages, in pipeline order

register_stage(StageInfo("sft", "SFT", _modules("sft", "sft")))
register_stage(StageInfo("dpo", "DPO", _modules("dpo", "dpo"), starts_from="sft", implicit_reward=True))
register_stage(StageInfo("reward", "reward model", _modules("rlhf", "reward"), starts_from="sft", policy=False))
register_stage(StageInfo("rloo", "RLOO", _modules("rlhf", "rloo"), starts_from="sft"))
