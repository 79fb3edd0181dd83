"""--template chat: the tokenizer's own chat template, token-exact, loss on assistant turns only.

Two real chat templates are tested on locally built tokenizers: TinyLlama-Chat's (turns end with
``</s>``, the EOS) and SmolLM2's ChatML (turns end with the added token ``<|im_end|>``).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import tiny_assets
from core.cli import UserError
from core.prompting import CHAT, load_template, prompt_format, template_from_dict
from core.tokenization import IGNORE_INDEX, STATUS_OK, encode_prompt, encode_records

# The chat templates as the models ship them (TinyLlama/TinyLlama-1.1B-Chat-v1.0, HuggingFaceTB/SmolLM2-135M-Instruct).
TINYLLAMA_CHAT = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
SMOLLM2_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")

CONVERSATIONS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, sleep, and move."},
    {"instruction": "Translate to French.", "input": "I like apples.", "output": "J'aime les pommes."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
                  {"role": "user", "content": "Name a red fruit."}, {"role": "assistant", "content": "A strawberry."}]},
]


@pytest.fixture(scope="module")
def tinyllama_chat(tmp_path_factory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.build_sentencepiece_tokenizer(tmp_path_factory.mktemp("sp_chat")))
    tokenizer.chat_template = TINYLLAMA_CHAT
    return tokenizer


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.build_byte_level_tokenizer(tmp_path_factory.mktemp("bl_chat")))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = SMOLLM2_CHATML
    return tokenizer


def _spans(labels: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of labelled positions."""
    spans, start = [], None
    for i, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


@pytest.mark.parametrize("name, end_token", [("tinyllama_chat", "</s>"), ("chatml", "<|im_end|>")])
def test_chat_examples_are_token_exact_with_loss_on_assistant_turns_only(name, end_token, request):
    tokenizer = request.getfixturevalue(name)
    fmt = prompt_format(load_template(CHAT), tokenizer)
    assert fmt.end_text == end_token and tokenizer.convert_tokens_to_ids(end_token) in fmt.stop_ids
    examples = encode_records(CONVERSATIONS, fmt, max_seq_length=512)
    for record, example in zip(CONVERSATIONS, examples):
        assert example.status == STATUS_OK and example.round_trip_exact
        # The prompt alone tokenises to exactly the first tokens of the example (what generation sees).
        prompt_ids = encode_prompt(fmt.prompt(record), tokenizer)
        assert example.input_ids[:len(prompt_ids)] == prompt_ids
        # Every assistant turn, and only those, carries the loss; each ends with the end-of-turn token.
        answers = [m["content"] for m in record.get("messages", []) if m["role"] == "assistant"] or [record["output"]]
        spans = _spans(example.labels)
        assert len(spans) == len(answers)
        first_prompt = encode_prompt(fmt.segments(record)[0].text, tokenizer)
        assert spans[0][0] == len(first_prompt)  # nothing before the first answer carries a loss
        assert spans[-1][0] == len(prompt_ids)  # the last answer starts exactly where its prompt ends
        for (start, end), answer in zip(spans, answers):
            text = tokenizer.decode(example.input_ids[start:end], skip_special_tokens=False)
            assert text.strip().startswith(answer) and text.endswith(end_token)
            assert example.labels[start:end] == example.input_ids[start:end]
        assert example.input_ids[spans[-1][1] - 1] == tokenizer.convert_tokens_to_ids(end_token)
        # And the segments are the chat template's own rendering, cut (round_trip_exact: the tokens decode to them).
        full = tokenizer.apply_chat_template(_messages(record), tokenize=False)
        rendered = "".join(segment.text for segment in fmt.segments(record))
        assert full.startswith(rendered) and full[len(rendered):].strip() == ""


def _messages(record: dict) -> list[dict]:
    from core.prompting import record_messages

    return record_messages(record)


def test_the_generation_prompt_is_the_chat_templates_own(chatml):
    fmt = prompt_format(load_template(CHAT), chatml)
    record = CONVERSATIONS[3]
    assert fmt.prompt(record) == chatml.apply_chat_template(record["messages"][:-1], tokenize=False, add_generation_prompt=True)
    assert fmt.prompt(record).endswith("<|im_start|>assistant\n")


def test_a_system_prompt_key_goes_before_every_conversation(tinyllama_chat):
    fmt = prompt_format(load_template(CHAT, system_prompt="Answer in French."), tinyllama_chat)
    assert fmt.prompt(CONVERSATIONS[0]).startswith("<|system|>\nAnswer in French.</s>")
    assert fmt.prompt(CONVERSATIONS[2]).startswith("<|system|>\nBe brief.</s>")  # the conversation's own wins


def test_a_tokenizer_without_a_chat_template_names_the_alternative(sp_tokenizer_dir):
    from transformers import AutoTokenizer

    with pytest.raises(UserError, match="has no chat template.*--template alpaca"):
        prompt_format(load_template(CHAT), AutoTokenizer.from_pretrained(sp_tokenizer_dir))


def test_text_templates_refuse_multi_turn_conversations(sp_tokenizer_dir):
    from transformers import AutoTokenizer

    fmt = prompt_format(load_template("alpaca"), AutoTokenizer.from_pretrained(sp_tokenizer_dir))
    with pytest.raises(UserError, match="need --template chat"):
        fmt.segments(CONVERSATIONS[3])


def test_saved_chat_template_round_trips():
    template = load_template(CHAT, system_prompt="Be kind.")
    assert template_from_dict(json.loads(json.dumps(template.to_dict()))) == template


# --------------------------------------------------------------------------- a run's template decides eval and DPO


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, sp_tokenizer_dir):
    from transformers import AutoTokenizer

    out = tiny_assets.build_tiny_llama(tmp_path_factory.mktemp("chat_llama"), sp_tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = TINYLLAMA_CHAT
    tokenizer.save_pretrained(out)
    return out


def _sft_chat_run(tmp_path: Path, model_dir: Path, sft_data) -> Path:
    from sft.train_sft_mac import main

    out = tmp_path / "sft_chat"
    main([f"--model_name_or_path={model_dir}", f"--train_file={sft_data[0]}", f"--val_file={sft_data[1]}",
          f"--output_dir={out}", "--template=chat", "--max_steps=2", "--eval_steps=2", "--save_steps=2",
          "--per_device_train_batch_size=2", "--gradient_accumulation_steps=1", "--report_to=none", "--lora_r=4",
          "--precision=fp32"])
    return out


@pytest.mark.slow
def test_eval_and_dpo_use_the_runs_chat_template(tmp_path, chat_model_dir, sft_data):
    from core.runs import read_run
    from dpo.dpo_config import parse_dpo_config
    from dpo.training import resolve_start
    from evaluation.models import read_adapter_run

    run_dir = _sft_chat_run(tmp_path, chat_model_dir, sft_data)
    saved = read_run(run_dir).template
    assert saved.kind == CHAT
    assert read_adapter_run(str(run_dir)).settings.template == saved  # eval prompts with the run's template
    dpo = parse_dpo_config([f"--sft_adapter_dir={run_dir}", f"--output_dir={tmp_path / 'dpo'}"])
    assert resolve_start(dpo).template == saved  # DPO renders pairs with it
    with pytest.raises(UserError, match="differs from the template the SFT run"):
        resolve_start(parse_dpo_config([f"--sft_adapter_dir={run_dir}", "--template=alpaca"]))

    from sft.eval_sft import main as evaluate

    out = tmp_path / "eval"
    evaluate(["--adapter_dir", str(run_dir), "--num_examples", "2", "--builtin_prompts", "false", "--max_new_tokens", "4",
              "--prefs_file", "none", "--out_dir", str(out)])
    report = (out / "report.md").read_text()
    assert "the tokenizer's own chat template" in report and "<|assistant|>" in report  # prompted as trained
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert all(row["prompt"].endswith("<|assistant|>\n") for row in generations)


def test_preview_shows_loss_tokens_and_trains_nothing(tmp_path, chat_model_dir, sft_data, capsys):
    from sft.train_sft_mac import main

    out = tmp_path / "never_written"
    assert main([f"--model_name_or_path={chat_model_dir}", f"--train_file={sft_data[0]}", f"--val_file={sft_data[1]}",
                 f"--output_dir={out}", "--template=chat", "--preview=2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("----- example ") == 2 and "in the loss" in printed
    first = tiny_assets.sft_rows()[0]
    assert f"<|user|>\n{first['instruction']}</s>" in printed and f"{first['output']}</s>]]" in printed
    assert not out.exists()
