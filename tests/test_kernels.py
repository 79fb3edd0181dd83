"""``--liger_kernels`` (core/kernels.py): refused with one line where it cannot run; where it can,
the same loss and LoRA gradients as without it.

The equality test needs a CUDA GPU and ``liger-kernel`` (``-m gpu``). It cannot run on a CPU:
under Triton's interpreter (``TRITON_INTERPRET=1``, tried with triton 3.9 and liger-kernel 0.8.5)
Liger's RMSNorm kernel fails on its scalar arguments (``'float' object has no attribute 'to'``).
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from core.cli import UserError
from core.kernels import apply_liger_kernels, check_liger_kernels
from core.losses import response_token_loss_sum
from test_packing import PAD, make_examples, tiny_lora_llama
from core.tokenization import PaddingCollator

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None


def test_liger_is_refused_off_cuda_before_anything_loads(tmp_path, tiny_llama_dir, sft_data):
    from sft.train_sft_mac import main
    from test_training import train_argv

    with pytest.raises(UserError, match="needs a CUDA GPU"):
        main(train_argv(tiny_llama_dir, sft_data, tmp_path / "out", liger_kernels=True))
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(HAS_LIGER, reason="liger-kernel is installed")
def test_liger_without_the_package_names_it():
    with pytest.raises(UserError, match="pip install liger-kernel"):
        check_liger_kernels(torch.device("cuda"))


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss_sum, count = response_token_loss_sum(model, batch)
    (loss_sum / count).backward()
    return float((loss_sum / count).detach()), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def _liger_matches_plain(device: torch.device, monkeypatch) -> None:
    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):  # Liger patches the module: undo it after
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    examples = make_examples(6)
    batch = {k: v.to(device) for k, v in PaddingCollator(pad_token_id=PAD)(examples).items()}
    plain = tiny_lora_llama().to(device)
    expected_loss, expected_grads = _loss_and_grads(plain, batch)

    patched = tiny_lora_llama().to(device)  # same seed: the same weights
    applied = apply_liger_kernels(patched.get_base_model(), device)
    assert applied == {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                       "fused_linear_cross_entropy": False}
    assert any(type(m).__name__.startswith("Liger") or "Liger" in type(m).forward.__qualname__
               for m in patched.modules()) or modeling_llama.apply_rotary_pos_emb.__module__.startswith("liger")
    loss, grads = _loss_and_grads(patched, batch)
    assert loss == pytest.approx(expected_loss, rel=1e-4)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_liger_kernels_give_the_same_loss_and_gradients_on_the_gpu(monkeypatch):
    pytest.importorskip("liger_kernel")
    _liger_matches_plain(torch.device("cuda"), monkeypatch)

