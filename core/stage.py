"""One training run of any stage, written once: the steps every stage takes, in order.

A stage (``sft/``, ``dpo/``, ``rlhf/``) subclasses :class:`StageRun` and fills in what is its own:
its config class, the checks before anything is loaded, its data, model, trainer, metrics, curves
and model card. :meth:`StageRun.run` reads top to bottom as the run happens:

1. the session clock starts; the entry point's device plan (``plan_model``);
2. the stage's checks before loading (:meth:`~StageRun.check`: start point, data files; one-line
   errors, nothing written yet);
3. the output dir: another run there is refused unless ``--resume`` / ``--overwrite_output_dir``;
   the checkpoint to resume from (``core.runs.prepare_output_dir``);
4. the resolved config in a few lines (every key goes to the file of step 5), the device line and the stage's own lines (:meth:`~StageRun.intro`);
5. ``<stage>_config.json`` (config, template, base model, :meth:`~StageRun.record`), rank 0 only;
6. the tokenizer, with a pad token;
7. the data (:meth:`~StageRun.load_data`);
8. the model (:meth:`~StageRun.load_model`), its trainable-parameter line;
9. the trainer (:meth:`~StageRun.build_trainer`);
10. train, or only restore a checkpoint that is already the last step (``core.training.train_or_finish``);
11. the outputs: model and trainer state, ``metrics.json``, curves, the model card ``README.md`` and
    the summary line (:meth:`~StageRun.finish`).

Every run keeps a :class:`core.phases.PhaseClock` (data, model load, trainer build, training with
the trainer's evaluation, checkpoints, logging, reference / reward forwards and generation charged
to their own phases, outputs): ``metrics.json``'s ``phases``, read by ``bench/profile_study.py``.

``run_<stage>(argv, preset=..., plan_model=..., ...)`` is :meth:`StageRun.launch` of the stage's class.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from core.log import is_main_process, say
from core.modeling import trainable_parameter_summary
from core.phases import DATA, MODEL_LOAD, OUTPUTS, TRAINER_BUILD, TRAINING, PhaseClock
from core.reporting import write_metrics, write_model_card
from core.runs import prepare_output_dir
from core.stages import stage_info
from core.training import DevicePlan, train_or_finish

METRICS_FILENAME = "metrics.json"


def tokenizer_with_pad(base_model: str, tokenizer_source: str | None, trust_remote_code: bool):
    """The run's tokenizer (its own saved one, else the base model's), with a pad token (``ensure_pad_token``)."""
    from core.modeling import load_tokenizer
    from core.tokenization import ensure_pad_token

    tokenizer = load_tokenizer(base_model, tokenizer_source, trust_remote_code)
    ensure_pad_token(tokenizer)
    return tokenizer


class StageRun:
    """A stage's run; subclasses set :attr:`config_class` and override the hooks below."""

    config_class: Any = None  # the stage's config (a ``core.keys.StageConfig``); its STAGE names it in the registry

    def __init__(self, config, *, preset: str, plan_model: Callable[[Any], DevicePlan], entry_point: str,
                 callbacks: Sequence = ()):
        self.config, self.preset, self.plan_model = config, preset, plan_model
        self.entry_point, self.callbacks = entry_point, list(callbacks)
        self.plan: DevicePlan | None = None
        self.resume_from: Path | None = None
        self.tokenizer = None  # a stage may load it in check(), to check its data before anything is written
        self.data = None
        self.clock = PhaseClock()  # restarted at the run's start by run(); core/phases.py

    @classmethod
    def launch(cls, argv: Sequence[str] | None, *, preset: str, plan_model: Callable[[Any], DevicePlan], prog: str,
               description: str, entry_point: str = "", callbacks: Sequence = (), config=None) -> int:
        """Everything both entry points of a stage do; ``plan_model`` is the only part that differs.
        ``config``: already parsed by the entry point (else parsed from ``argv``)."""
        started = time.perf_counter()
        config = config or cls.config_class.parse(argv, preset=preset, prog=prog, description=description)
        run = cls(config, preset=preset, plan_model=plan_model, entry_point=entry_point or prog, callbacks=callbacks)
        return run.run(started)

    # --------------------------------------------------------------------------- the run, top to bottom

    def run(self, started: float | None = None) -> int:
        started = time.perf_counter() if started is None else started
        self.clock = PhaseClock(started)
        config = self.config
        self.plan = self.plan_model(config)
        if not self.check():
            return 0
        self.resume_from = prepare_output_dir(config, stage_info(config.STAGE).config_file, log=say,
                                              is_main=is_main_process())
        say(config.summary(self.preset, Path(config.output_dir) / stage_info(config.STAGE).config_file))
        say(self.plan.line())
        for line in self.intro():
            say(line)
        if is_main_process():
            self.save_config()
        with self.clock.phase(DATA):
            if self.tokenizer is None:
                self.tokenizer = self.load_tokenizer()
            self.data = self.load_data()
        with self.clock.phase(MODEL_LOAD):
            model = self.load_model()
        self.model_loaded(model)
        with self.clock.phase(TRAINER_BUILD):
            trainer = self.build_trainer(model)
        self.clock.wrap_trainer(trainer)
        self.trainer_built(trainer)
        with self.clock.phase(TRAINING):
            self.train(trainer)
        with self.clock.phase(OUTPUTS):
            self.finish(trainer, time.perf_counter() - started)
        return 0

    def finish(self, trainer, session_seconds: float) -> dict:
        """The model and trainer state, ``metrics.json``, curves, ``README.md`` and the summary line."""
        output_dir = Path(self.config.output_dir)
        self.save_model(trainer, output_dir)
        trainer.save_state()
        metrics = {**self.metrics(trainer, session_seconds), "phases": self.clock.report()}
        if trainer.is_world_process_zero():
            write_metrics(output_dir / METRICS_FILENAME, metrics)
            self.plot(trainer.state.log_history, output_dir)
            title, sections = self.card(metrics, output_dir)
            write_model_card(output_dir / "README.md", title, sections)
            say(self.summary_line(metrics, output_dir))
        return metrics

    # --------------------------------------------------------------------------- hooks with a default

    def check(self) -> bool:
        """Checks before anything is loaded or written (one-line errors); False: the run is done already."""
        return True

    def intro(self) -> list[str]:
        """Lines said after the config and the device line: where the run starts, what it trains against."""
        return []

    def template(self):
        """The prompt template the run renders its data with (saved with the config)."""
        raise NotImplementedError

    def base_model(self) -> str | None:
        """The base model saved with the config (None: the config's ``model_name_or_path``)."""
        return None

    def record(self) -> dict:
        """What the saved config holds beside the config and template (entry point, the run started from)."""
        return {"entry_point": self.entry_point}

    def save_config(self) -> None:
        self.config.save(self.config.output_dir, self.template(), preset=self.preset, base_model=self.base_model(),
                         extra=self.record())

    def model_loaded(self, model) -> None:
        say(trainable_parameter_summary(model))

    def trainer_built(self, trainer) -> None:
        """After the trainer exists, before training (restore counters, start a generation engine: in
        ``self.clock.phase(ENGINE_START)``)."""

    def train(self, trainer) -> None:
        train_or_finish(trainer, self.resume_from)

    # --------------------------------------------------------------------------- hooks every stage fills in

    def load_tokenizer(self):
        raise NotImplementedError

    def load_data(self):
        raise NotImplementedError

    def load_model(self):
        raise NotImplementedError

    def build_trainer(self, model):
        raise NotImplementedError

    def save_model(self, trainer, output_dir: Path) -> None:
        """Called on every process (the adapter and tokenizer; a stage saves on rank 0 only where it must)."""
        raise NotImplementedError

    def metrics(self, trainer, session_seconds: float) -> dict:
        raise NotImplementedError

    def plot(self, log_history: list, output_dir: Path) -> None:
        raise NotImplementedError

    def card(self, metrics: dict, output_dir: Path) -> tuple[str, dict[str, str]]:
        """The model card's title and sections (``core.reporting.write_model_card``)."""
        raise NotImplementedError

    def summary_line(self, metrics: dict, output_dir: Path) -> str:
        raise NotImplementedError


class RunFromSFT(StageRun):
    """A stage that starts from an SFT run (DPO, the reward model, RLOO): its :meth:`check` sets ``self.start``
    (``core.policy.read_sft_start``), whose template, base model and record the run saves."""

    start = None  # a core.policy.SFTStart, once check() has read it

    def template(self):
        return self.start.template

    def base_model(self) -> str:
        return self.start.base_model

    def record(self) -> dict:
        return self.start.record(self.entry_point)
