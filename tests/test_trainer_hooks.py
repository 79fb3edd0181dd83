"""The private Trainer hooks this project overrides or calls, pinned to the signatures it relies on.

Where transformers 5 / TRL 1 offer a public way, the project uses it (a callback flushes SFT's token
counters; DPO counts pairs in the public ``compute_loss``). What remains has no public equivalent;
a library update that renames one or changes its parameters fails here, in one line naming the
hook and who relies on it, instead of silently changing a run.
"""
from __future__ import annotations

import importlib
import inspect

import pytest

# (class, hook, its parameters as we call or override it, who relies on it)
PINNED = [
    ("transformers.Trainer", "_get_train_sampler", ("self", "train_dataset"),
     "sft/trainer.py SFTTrainer: the seeded length-grouped sampler (resume-exact data order)"),
    ("transformers.Trainer", "_track_num_input_tokens", ("self", "inputs"),
     "sft/trainer.py SFTTrainer: input tokens counted on the device, no sync per micro-batch"),
    ("transformers.Trainer", "_save_checkpoint", ("self", "model", "trial"),
     "sft/trainer.py SFTTrainer: exact counts in each checkpoint, checkpoint time measured"),
    ("transformers.Trainer", "_load_from_checkpoint", ("self", "resume_from_checkpoint", "model"),
     "core/training.py restore_final_checkpoint: a finished run's last checkpoint restored without training"),
    ("transformers.Trainer", "_prepare_inputs", ("self", "inputs"),
     "sft/trainer.py SFTTrainer.evaluation_loop: batches moved to the device as the Trainer does"),
    ("trl.DPOTrainer", "_prepare_dataset", ("self", "dataset", "processing_class", "args", "dataset_name"),
     "dpo/trainer.py: pairs tokenised by core/pairs.py pass through untouched"),
    ("trl.DPOTrainer", "compute_ref_log_probs", ("self", "model", "inputs"),
     "dpo/reference_cache.py: a pair's reference log-probs from TRL's own forward, computed once"),
    ("transformers.Trainer", "_get_output_dir", ("self", "trial"),
     "dpo/trainer.py: the reference log-probs cache written into the checkpoint being saved"),
    ("trl.RLOOTrainer", "_tokenize_prompts", ("self", "prompts"),
     "rlhf/rloo_training.py: prompts tokenised exactly as at generation time elsewhere"),
    ("trl.RLOOTrainer", "_generate_single_turn", ("self", "prompt_ids", "images", "multimodal_fields"),
     "rlhf/rloo_training.py: rollouts through the vllm engine (rlhf/rollouts.py)"),
    ("trl.RLOOTrainer", "_get_per_token_logps_and_entropies",
     ("self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy", "compute_aux_loss",
      "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles", "image_sizes",
      "token_type_ids", "mm_token_type_ids", "image_position_ids"),
     "rlhf/policy_forward.py: the policy's scoring forward (no entropy, no gradient) serves the loss (entropy)"),
]


def _class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def signature_problem(owner: type, hook: str, expected: tuple[str, ...]) -> str | None:
    """None when ``owner.hook`` exists with exactly the ``expected`` parameters, else why not (one phrase)."""
    function = getattr(owner, hook, None)
    if function is None:
        return "is gone"
    found = tuple(inspect.signature(function).parameters)
    return None if found == expected else f"now takes ({', '.join(found)}), not ({', '.join(expected)})"


@pytest.mark.parametrize("owner, hook, expected, relies", PINNED, ids=[f"{o.split('.')[-1]}.{h}" for o, h, *_ in PINNED])
def test_a_private_hook_we_rely_on_keeps_its_signature(owner, hook, expected, relies):
    problem = signature_problem(_class(owner), hook, expected)
    assert problem is None, f"{owner}.{hook} {problem}: {relies} relies on it; adapt the override to the new library"


def test_the_check_fails_when_a_signature_changes():
    class Base:
        def _hook(self, inputs, extra):
            pass

    assert signature_problem(Base, "_hook", ("self", "inputs")) == "now takes (self, inputs, extra), not (self, inputs)"
    assert signature_problem(Base, "_gone", ("self",)) == "is gone"
    assert signature_problem(Base, "_hook", ("self", "inputs", "extra")) is None


def _our_trainer_classes() -> list[type]:
    from dpo.trainer import dpo_trainer_class
    from rlhf.reward_training import _reward_trainer_class
    from rlhf.rloo_training import _rloo_trainer_class
    from sft.trainer import SFTTrainer

    return [SFTTrainer, dpo_trainer_class(), _reward_trainer_class(), _rloo_trainer_class()]


def test_every_private_hook_our_trainers_override_is_pinned():
    pinned = {hook for _, hook, _, _ in PINNED}
    overridden = set()
    for cls in _our_trainer_classes():
        for name in vars(cls):
            private = name.startswith("_") and not name.startswith("__")
            if private and any(name in vars(base) for base in cls.__mro__[1:]):
                overridden.add(f"{cls.__name__}.{name}")
    assert sorted(o for o in overridden if o.split(".")[1] not in pinned) == []
    assert {"SFTTrainer._get_train_sampler", "PretokenizedDPOTrainer._prepare_dataset",
            "SeededRLOOTrainer._generate_single_turn"} <= overridden  # the check sees our overrides
