"""Compare a base model with its fine-tuned adapter(s): side by side, and in numbers.

    python -m sft.eval_sft                                   # models/sft_output vs its base model
    python -m sft.eval_sft --adapter_dir models/sft_output --num_examples 50 --prompts my_prompts.txt
    python -m sft.eval_sft --adapter_dir models/sft_output models/dpo_output   # base | sft | dpo

Every prompt is rendered with the template the run was trained with (the copy saved in its
``<stage>_config.json``). One copy of the base model is loaded: adapter columns switch adapters on
it and the base column runs the same object with adapters disabled (see ``evaluation/models.py``
for adding a column type).

Per model: response-token validation loss and perplexity (teacher-forced, tokenized exactly as in
training), and on the generations: the share that stopped with EOS, the share that are empty, the
mean length in tokens and ROUGE-L F1 against the reference. With ``--ifeval`` / ``--ifbench`` (a local
JSONL or a hub id): verifiable instruction following per model, the four IFEval numbers and a
per-instruction-type breakdown (``evaluation/instruction_eval.py``). Written to ``--out_dir`` (default
``<first adapter_dir>/eval`` for one adapter, ``<first adapter_dir>/eval_<labels>`` for several, e.g.
``models/sft_output/eval_sft_dpo``; an evaluation of other columns there is refused without
``--overwrite``): ``report.md`` (a summary table with models as columns and the charts on
top), ``side_by_side.txt`` (the answers in columns; the console shows the first prompt's), ``generations.jsonl``,
``metrics.json``, ``charts/*.png`` and, per IF benchmark,
``if_<name>_generations.jsonl`` and ``if_<name>_scores.json``. With two or more columns and an IF
benchmark, ``report.md`` opens with the primary metric (IFEval prompt-level strict) and, with
``--primary_contrasts sft:base,dpo_if:control,...``, those contrasts Holm-adjusted (every other p-value is
exploratory), each arm over its seeds (a column ``<arm>_s<k>`` is seed k of <arm>: ``evaluation/seeds.py``),
then what each stage changed, with bootstrap intervals and p-values (``evaluation/study_report.py``; every
number in ``metrics.json``'s ``comparisons``). ``per_prompt.jsonl.gz`` keeps every prompt's verdicts, so
``python scripts/verify_study.py OUT_DIR`` can re-derive those numbers without the weights.

    python -m sft.eval_sft --adapter_dir models/sft_output models/dpo_output --ifeval data/raw/ifeval_input_data.jsonl \
        --ifeval_limit 100
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from core.cli import UserError, run_cli
from core.engines import EnginePool, Weights, choose_engine, vllm_settings
from core.generation import encode_prompts
from core.modeling import pick_device, resolve_precision, torch_dtype
from core.phases import EVALUATION, GENERATION, MODEL_LOAD, REWARD, PhaseClock
from core.prompting import prompt_format
from evaluation.config import EvalConfig, parse_eval_config
from evaluation.instruction_eval import (BenchmarkRun, column_generations, headline_table, load_requested,
                                        score_benchmark)
from evaluation.if_sets import load_if_sets
from evaluation.data import (BUILTIN_PROMPTS_FILE, EvalPrompt, ValExample, read_prompt_file, read_val_file,
                             sample_indices, tokenize_for_loss, validation_loss)
from evaluation.models import ColumnResult, ModelSpec, build_model_specs, build_shared_model, load_eval_tokenizer, same_model
from evaluation.preference import PER_PAIR_KEY, preference_columns, resolve_prefs_file
from evaluation.reward import check_reward_model, reward_columns
from evaluation.seeds import check_contrasts, parse_contrasts
from evaluation.report import metrics_table, side_by_side, write_outputs


# --------------------------------------------------------------------------- evaluation


def evaluate_column(spec: ModelSpec, model, tokenizer, prompts: Sequence[EvalPrompt], loss_examples: Sequence[ValExample],
                    config: EvalConfig, cache: dict, engine) -> ColumnResult:
    """Validation loss (the in-memory model) and generations (``engine``) for one column, with its weights active."""
    settings = spec.settings
    if settings not in cache:  # columns trained with the same template share tokenization
        fmt = prompt_format(settings.template, tokenizer)
        rendered = [p.render(fmt) for p in prompts]
        cache[settings] = (rendered, encode_prompts(tokenizer, rendered), fmt.stop_ids,
                           tokenize_for_loss(loss_examples, fmt, settings.max_seq_length))
    rendered, prompt_ids, stop_ids, (features, truncated, skipped) = cache[settings]
    with spec.active(model):
        loss = validation_loss(model, tokenizer, features, config.batch_size, desc=f"{spec.label}: val loss",
                               num_truncated=truncated, num_skipped=skipped) if features else None
        generations = engine.generate(prompt_ids, max_new_tokens=config.max_new_tokens, stop_ids=stop_ids,
                                      desc=f"{spec.label}: generating")
    return ColumnResult(spec, loss, generations, rendered)


def collect_prompts(config: EvalConfig, val_examples: Sequence[ValExample]) -> list[EvalPrompt]:
    prompts = read_prompt_file(BUILTIN_PROMPTS_FILE, "builtin") if config.builtin_prompts else []
    if config.prompts:
        prompts += read_prompt_file(config.prompts, "file")
    chosen = sample_indices(len(val_examples), config.num_examples, config.seed)
    prompts += [val_examples[i].as_prompt() for i in chosen]
    if not prompts:
        raise UserError("nothing to generate for: --builtin_prompts false, no --prompts file and --num_examples 0")
    return prompts


# --------------------------------------------------------------------------- main


def run_settings(config: EvalConfig, specs: Sequence[ModelSpec], val_file: str, loss_count: int, val_total: int) -> dict:
    loss_text = f"{loss_count} of {val_total} examples" + (f" (sampled with seed {config.seed})" if loss_count < val_total else "")
    first = specs[1]
    return {
        "base_model": specs[0].model_name_or_path,  # type: ignore[attr-defined]
        "adapters": ", ".join(s.adapter_dir for s in specs[1:]),  # type: ignore[attr-defined]
        "template": first.settings.template.name,
        "max_seq_length": first.settings.max_seq_length,
        "val_file": val_file,
        "val_loss_examples": loss_text,
        "num_examples": config.num_examples,
        "max_new_tokens": config.max_new_tokens,
        "seed": config.seed,
        "if_max_new_tokens": config.if_max_new_tokens,
        **({"primary_contrasts": config.primary_contrasts} if config.primary_contrasts else {}),
        "columns": [s.describe() for s in specs],
        "templates": {s.label: s.settings.template.to_dict() for s in specs},
    }


def main(argv: Sequence[str] | None = None) -> int:
    clock = PhaseClock()  # metrics.json's phases (core/phases.py); generation here includes each column's held-out loss
    config = parse_eval_config(argv)
    specs = build_model_specs(config.adapter_dir, config.base_model)
    check_contrasts(parse_contrasts(config.primary_contrasts), [s.label for s in specs])
    prefs_file = resolve_prefs_file(config.prefs_file, specs)
    if config.reward_model:
        check_reward_model(config.reward_model)
    base_spec, adapters = specs[0], specs[1:]
    val_file = config.val_file or adapters[0].run.val_file
    if not val_file:
        raise UserError(f"{adapters[0].adapter_dir} does not record an SFT validation file: pass --val_file")
    val_examples = read_val_file(val_file)
    loss_examples = [val_examples[i] for i in sample_indices(len(val_examples), config.max_eval_samples, config.seed)]
    prompts = collect_prompts(config, val_examples)
    out_dir = resolve_out_dir(config.out_dir, specs, config.overwrite)
    if_data = load_requested(config) + load_if_sets(config)  # a bad benchmark file fails here, before any model is loaded

    device = pick_device(config.device)
    dtype = torch_dtype(resolve_precision(config.precision, device))  # the shared model's, the engine's and the reward scores'
    # vllm asked for but not usable (here, or for this model): one line, before any loading
    choice = choose_engine(config.engine, device, base_spec.model_name_or_path)
    tokenizer = load_eval_tokenizer(adapters[0], base_spec.model_name_or_path, base_spec.trust_remote_code)
    with clock.phase(MODEL_LOAD):
        model = build_shared_model(specs, device, dtype)
    for spec in adapters:
        if not same_model(spec.trained_on, base_spec.model_name_or_path):
            print(f"note: {spec.label} was trained on {spec.trained_on}; evaluating it on {base_spec.model_name_or_path}")
    print(f"evaluating {', '.join(s.label for s in specs)} on {device}: {len(prompts)} prompts, "
          f"validation loss over {len(loss_examples)} of {len(val_examples)} examples")

    pool = EnginePool(choice, tokenizer=tokenizer, model=model, batch_size=config.batch_size,
                      dtype=dtype, settings=vllm_settings(config),
                      seed=config.seed, trust_remote_code=base_spec.trust_remote_code,
                      adapter_dirs=[s.adapter_dir for s in adapters], max_model_len=config.vllm_max_model_len)
    print(pool.choice.line())
    with pool, clock.phase(GENERATION):
        results, if_generations = generate_columns(pool, specs, model, tokenizer, prompts, loss_examples, config, if_data)
    references = [p.reference for p in prompts]
    metrics = {r.spec.label: r.metrics(references) for r in results}
    settings = {**run_settings(config, specs, val_file, len(loss_examples), len(val_examples)), "engine": pool.choice.line().split(": ", 1)[1],
                "generation": pool.record(), **({"if_sets": config.if_sets} if config.if_sets else {})}
    _report_dropped(results)
    pairs: dict = {}  # per column, each pair's outcome: what the report's intervals resample
    if prefs_file is not None:
        with clock.phase(EVALUATION):
            prefs, prefs_settings = preference_columns(prefs_file, specs, model, tokenizer, max_pairs=config.max_eval_samples,
                                                       seed=config.seed, batch_size=max(1, config.batch_size // 2))
        for label, values in prefs.items():
            pairs[label] = values.pop(PER_PAIR_KEY, None)
            metrics[label].update(values)
        settings.update(prefs_settings)
    if_runs = [score_benchmark(name, source, limit, samples, if_generations[name]) for name, source, limit, samples in if_data]
    for run in if_runs:
        for label in metrics:
            metrics[label].update(run.metrics(label))
    if config.reward_model:
        with clock.phase(REWARD):
            rewards, reward_settings = reward_columns(config.reward_model, prompts, results, base_spec.model_name_or_path,
                                                      tokenizer, device, dtype,
                                                      config.batch_size)
        for label, values in rewards.items():
            metrics[label].update(values)
        settings.update(reward_settings)

    written = write_outputs(out_dir, settings, metrics, prompts, results, if_runs, pairs, phases=clock.report())
    views = [side_by_side(prompt, {r.spec.label: r.generations[i].text for r in results},
                          config.show_width or shutil.get_terminal_size((120, 24)).columns) for i, prompt in enumerate(prompts)]
    written.insert(1, write_side_by_side(out_dir, views))
    print(side_by_side_summary(views, written[1], out_dir / "report.md"))
    print()
    print(metrics_table(metrics))
    _print_if_tables(if_runs, out_dir / "report.md")
    print(f"wrote {', '.join(str(p) for p in written)}")
    print(f"evaluation of {' | '.join(s.label for s in specs)}: {out_dir / 'report.md'}")
    return 0


SIDE_BY_SIDE_FILE = "side_by_side.txt"


def write_side_by_side(out_dir: Path, views: Sequence[str]) -> Path:
    """Every prompt's answers in columns, as the console used to show them: kept in a file, not printed."""
    path = out_dir / SIDE_BY_SIDE_FILE
    path.write_text("\n".join(views) + "\n", encoding="utf-8")
    return path


def side_by_side_summary(views: Sequence[str], path: Path, report: Path) -> str:
    """The console's part of the side-by-side view: how many prompts, where all of them are, the first one."""
    first = f"; the first:\n{views[0]}" if views else ""
    return f"answers side by side for {len(views)} prompts: {path} (with token counts: {report}){first}"


def generate_columns(pool: EnginePool, specs: Sequence[ModelSpec], model, tokenizer, prompts, loss_examples, config,
                     if_data) -> tuple[list[ColumnResult], dict[str, dict]]:
    """Column by column: loss and generations, then every IF benchmark's answers (one call), on one engine per column."""
    cache: dict = {}
    if_cache: dict = {}
    results, if_generations = [], {name: {} for name, *_ in if_data}
    for spec in specs:
        engine = pool.engine_for(column_weights(spec, specs[0]))
        results.append(evaluate_column(spec, model, tokenizer, prompts, loss_examples, config, cache, engine))
        if not if_data:
            continue
        with spec.active(model):
            answers = column_generations([(name, samples) for name, _, _, samples in if_data], spec, tokenizer, engine,
                                         config.if_max_new_tokens, if_cache)
        for name, column in answers.items():
            if_generations[name][spec.label] = column
    return results, if_generations


def column_weights(spec: ModelSpec, base_spec) -> Weights:
    """The weights a column generates with: the base model, plus the column's adapter (if any)."""
    return Weights(base_spec.model_name_or_path, getattr(spec, "adapter_dir", None) or None, spec.label)


def default_out_dir(specs: Sequence[ModelSpec]) -> Path:
    """``<first adapter>/eval`` for one adapter; ``<first adapter>/eval_sft_dpo_rloo`` for several, so the
    four-column eval never lands on the SFT-only one."""
    adapters = specs[1:]
    first = Path(adapters[0].adapter_dir)  # type: ignore[attr-defined]
    return first / "eval" if len(adapters) == 1 else first / ("eval_" + "_".join(s.label for s in adapters))


def resolve_out_dir(out_dir: str | None, specs: Sequence[ModelSpec], overwrite: bool) -> Path:
    """Where this evaluation goes; an evaluation of other columns already there is refused unless ``overwrite``."""
    path = Path(out_dir) if out_dir else default_out_dir(specs)
    previous = _columns_in(path)
    ours = [{"label": s.label, "adapter_dir": str(Path(s.adapter_dir).resolve())}  # type: ignore[attr-defined]
            for s in specs[1:]]
    if previous is None or previous == ours:
        if previous is not None:
            print(f"note: replacing the evaluation of the same columns in {path}")
        return path
    if not overwrite:
        held = " | ".join(["base"] + [c["label"] for c in previous])
        raise UserError(f"{path} holds an evaluation of {held} ({path / 'metrics.json'}); this one compares "
                        f"{' | '.join(s.label for s in specs)}: pass --overwrite to replace it, or --out_dir DIR")
    print(f"note: --overwrite: replacing the evaluation of other columns in {path}")
    return path


def _columns_in(out_dir: Path) -> list[dict] | None:
    """The adapter columns of the evaluation saved in ``out_dir`` (None when it holds none)."""
    import json

    try:
        columns = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))["settings"]["columns"]
    except (OSError, ValueError, KeyError, TypeError):
        return None if not (out_dir / "report.md").exists() else [{"label": "unknown", "adapter_dir": ""}]
    return [{"label": c.get("label"), "adapter_dir": str(Path(c.get("adapter_dir", "")).resolve())}
            for c in columns if c.get("kind") != "base"]


def _print_if_tables(runs: Sequence[BenchmarkRun], report: Path) -> None:
    """Each benchmark's four accuracies on the console; the per-type tables (25+ rows each) stay in the report."""
    for run in runs:
        print(f"\n{run.name} ({len(run.samples)} prompts): accuracy in %")
        print(headline_table(run))
    if runs:
        print(f"\naccuracy per instruction type, for each benchmark: {report}")


def _report_dropped(results: Sequence[ColumnResult]) -> None:
    """Say how many validation examples were cut or left out of the loss (nothing lost silently)."""
    seen = set()
    for result in results:
        loss = result.loss
        if loss is None or result.spec.settings in seen:
            continue
        seen.add(result.spec.settings)
        if loss.num_truncated or loss.num_skipped:
            print(f"note ({result.spec.label}): {loss.num_truncated} validation examples cut at max_seq_length="
                  f"{result.spec.settings.max_seq_length} (scored on what is left); {loss.num_skipped} left out: "
                  "the prompt alone fills max_seq_length")


if __name__ == "__main__":
    run_cli(main)
