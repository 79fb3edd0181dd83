"""Session-wide tiny assets (built once per test session, in a temp dir, no network)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Never reach for the network in tests, even if a hub id slips through.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tiny_assets  # noqa: E402
import torch  # noqa: E402

from core.quiet import quiet_third_party  # noqa: E402

# Tiny models run fastest on one thread; two threads on a shared 2-core CI box made a training
# step ~20x slower from contention.
torch.set_num_threads(1)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """The filters every entry point installs (core/quiet.py names each message and why it is
    harmless), so a test's output shows the warnings a user would see, and only those. pytest
    restores the warning filters after each test; this wrapper runs inside its per-test context, so
    the filters cover the test's fixtures (module- and session-scoped ones included) too."""
    quiet_third_party()
    return (yield)


@pytest.fixture(scope="session")
def sp_tokenizer_dir(tmp_path_factory) -> Path:
    return tiny_assets.build_sentencepiece_tokenizer(tmp_path_factory.mktemp("sp_tok"))


@pytest.fixture(scope="session")
def bytelevel_tokenizer_dir(tmp_path_factory) -> Path:
    return tiny_assets.build_byte_level_tokenizer(tmp_path_factory.mktemp("bl_tok"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, sp_tokenizer_dir) -> Path:
    return tiny_assets.build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), sp_tokenizer_dir)


@pytest.fixture()
def sft_data(tmp_path) -> tuple[Path, Path]:
    """(train_file, val_file) with a few real-looking Alpaca rows."""
    rows = tiny_assets.sft_rows(repeat=2)
    train = tiny_assets.write_jsonl(tmp_path / "data" / "sft_train.jsonl", rows)
    val = tiny_assets.write_jsonl(tmp_path / "data" / "sft_val.jsonl", tiny_assets.sft_rows(repeat=1)[:6])
    return train, val
