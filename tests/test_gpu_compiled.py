"""The GPU paths as a GPU runs them: Triton kernels compiled (not interpreted), the CUDA
extension, and the trainer and a quantized model with their tensors on the device. Each kernel
is checked against the same float64 oracles as the CPU tests. Skipped without a GPU; the lent
GPU runs this file through scripts/gpu_check.sh."""

from __future__ import annotations

import os

import pytest
import torch
from oracles import rank_loss_float64
from test_gae import assert_matches_oracle, make_mask, random_inputs
from test_lora_linear import SCALING, assert_close, make_inputs, oracle
from test_rank_loss import make_present

from rlhf_fast import ops
from rlhf_fast.ops import backends

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1",
        reason="TRITON_INTERPRET=1 is set: these tests are about compiled kernels",
    ),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def require(op: str, backend: str) -> None:
    report = backends("cuda")[op].get(backend)
    if report is None or not report.available:
        pytest.skip(f"{op} has no usable {backend!r} backend on cuda")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", [(1, 1), (17, 33), (40, 257), (3, 5000)], ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "right_padded", "gaps", "all_false"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gae(backend, shape, mask_kind, dtype):
    require("gae", backend)
    for seed in (0, 1):
        rewards, values, generator = random_inputs(*shape, dtype, seed)
        mask = make_mask(mask_kind, *shape, generator)
        on_gpu = None if mask is None else mask.cuda()
        advantages, returns = ops.gae(
            rewards.cuda(), values.cuda(), on_gpu, gamma=0.99, lam=0.95, backend=backend
        )
        assert advantages.device.type == "cuda" and advantages.dtype == torch.float32
        assert_matches_oracle(advantages.cpu(), returns.cpu(), rewards, values, mask, 0.99, 0.95)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gae_strided_views(backend):
    require("gae", backend)
    rewards, values, generator = random_inputs(9, 80, torch.float32, 4)
    mask = make_mask("gaps", 9, 80, generator)
    r, v, m = (
        rewards.cuda()[:, ::2],
        values.cuda().t().contiguous().t()[:, ::2],
        mask.cuda()[:, ::2],
    )
    advantages, returns = ops.gae(r, v, m, gamma=1.0, lam=0.9, backend=backend)
    assert_matches_oracle(
        advantages.cpu(), returns.cpu(), rewards[:, ::2], values[:, ::2], mask[:, ::2], 1.0, 0.9
    )


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", [(1, 2), (33, 9), (5, 17), (300, 4)], ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "ragged", "gaps", "all_absent"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rank_loss(backend, shape, mask_kind, dtype):
    require("rank_loss", backend)
    generator = torch.Generator().manual_seed(len(mask_kind))
    rewards = (3 * torch.randn(*shape, generator=generator)).to(dtype)
    mask = make_present(mask_kind, *shape, generator)
    on_gpu = rewards.cuda().requires_grad_()
    loss = ops.rank_loss(on_gpu, None if mask is None else mask.cuda(), backend=backend)
    loss.backward()
    expected_loss, expected_grad = rank_loss_float64(rewards, mask)
    torch.testing.assert_close(loss.double().cpu(), expected_loss, atol=2e-5, rtol=2e-4)
    tolerance = (
        {"atol": 2e-5, "rtol": 2e-4} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    )
    torch.testing.assert_close(on_gpu.grad.double().cpu(), expected_grad, **tolerance)


def _lora_on_gpu(backend, dtype, rank, m, k, n, dropout, seed, leading=()):
    x, w, b, a, bb, dy = make_inputs(m, k, n, rank, dtype, dtype, seed, leading=leading)
    tensors = [t.detach().cuda().requires_grad_(t.requires_grad) for t in (x, a, bb, b)]
    xg, ag, bg, biasg = tensors
    torch.manual_seed(seed)
    y = ops.lora_linear(xg, w.cuda(), biasg, ag, bg, SCALING, dropout=dropout, backend=backend)
    y.backward(dy.cuda())
    grads = [t.grad.cpu() for t in (xg, ag, bg)]
    return (x, w, b, a, bb, dy), y.detach().cpu(), grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", [1, 16, 64])
@pytest.mark.parametrize("shape", [(37, 67, 45), (513, 256, 384), (4, 1024, 1000)], ids=str)
def test_lora_linear_triton_without_dropout(dtype, rank, shape):
    require("lora_linear", "triton")
    inputs, y, (dx, da, db) = _lora_on_gpu("triton", dtype, rank, *shape, 0.0, rank)
    noise = torch.ones(inputs[0].shape, dtype=torch.float64)
    ey, edx, eda, edb, _ = oracle(*inputs, noise)
    for actual, expected, what in ((y, ey, "y"), (dx, edx, "dx"), (da, eda, "dA"), (db, edb, "dB")):
        assert_close(actual, expected, dtype, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lora_linear_triton_with_dropout_matches_the_reference_op(dtype):
    """The dropout mask is drawn on the device; the reference op draws it the same way."""
    require("lora_linear", "triton")
    inputs, y, grads = _lora_on_gpu("triton", dtype, 8, 64, 96, 80, 0.3, 7, leading=(3,))
    _, y_ref, grads_ref = _lora_on_gpu("reference", dtype, 8, 64, 96, 80, 0.3, 7, leading=(3,))
    assert_close(y, y_ref.double(), dtype, "y")
    for actual, expected, what in zip(grads, grads_ref, ("dx", "dA", "dB"), strict=True):
        assert_close(actual, expected.double(), dtype, what)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 32)], ids=str)
@pytest.mark.parametrize("m", [1, 7, 130])
def test_quant_matmul_through_the_op(backend, bits, group, m):
    from rlhf_fast.quant import quantize_weight

    require("quant_matmul", backend)
    generator = torch.Generator().manual_seed(m + bits)
    qweight = quantize_weight(torch.randn(300, 512, generator=generator), bits, group)
    x = torch.randn(m, 512, generator=generator).bfloat16()
    y = ops.quant_matmul(x.cuda(), qweight.to("cuda"), backend=backend)
    expected = x.double() @ qweight.dequantize().double().T
    torch.testing.assert_close(y.double().cpu(), expected, atol=3e-2, rtol=1e-2)


def test_quantized_model_generates_on_the_gpu_like_on_the_cpu(tmp_path):
    """An int4 model moved to the GPU gives the CPU kernels' logits (both use the same
    quantized weights; only the accumulation order differs)."""
    from tiny_families import make_family_dir
    from transformers import AutoModelForCausalLM

    from rlhf_fast.quant import quantize_model

    model_dir = make_family_dir(tmp_path / "llama", "llama")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    quantize_model(model, bits=4, group_size=32)
    ids = torch.randint(
        3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        cpu_logits = model(ids).logits
        gpu_logits = model.to("cuda")(ids.cuda()).logits.cpu()
    torch.testing.assert_close(gpu_logits, cpu_logits, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_stage_all_on_the_gpu(tmp_path, dtype, capsys):
    """SFT -> RM -> PPO with --device cuda: every stage runs and exports a loadable model."""
    from tiny_families import make_family_dir
    from train_helpers import ranked_records, sft_records, write_jsonl

    from rlhf_fast.cli import main

    model = make_family_dir(tmp_path / "model", "llama", chat_template=True)
    data = {
        "sft": write_jsonl(tmp_path / "sft.jsonl", sft_records(6)),
        "ranked": write_jsonl(tmp_path / "ranked.jsonl", ranked_records(8)),
        "prompts": write_jsonl(
            tmp_path / "prompts.jsonl", [{"prompt": f"Say {w}"} for w in "abcd"]
        ),
    }
    output = tmp_path / "run"
    args = ["train", "--stage", "all", "--model", str(model), "--sft-data", str(data["sft"]),
            "--rm-data", str(data["ranked"]), "--data", str(data["prompts"]),
            "--output", str(output), "--device", "cuda", "--dtype", dtype, "--max-steps", "3",
            "--ppo-steps", "2", "--batch-size", "2", "--max-new-tokens", "6", "--save-every",
            "0", "--eval-fraction", "0", "--lr", "1e-3", "--max-length", "48"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    for stage in ("sft", "rm", "ppo"):
        assert (output / stage / "metrics.jsonl").is_file()
    assert (output / "ppo" / "merged").is_dir()
