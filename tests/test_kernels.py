"""The Triton kernels against the reference, on the CPU through Triton's interpreter (on a GPU where there is one),
and compiled for NVIDIA GPUs on the CPU to check their machine code."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: pip install hf_dynorm[kernels] (or .[dev])")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and Triton's interpreter is off (tests/conftest.py turns it on)", allow_module_level=True)

from hf_dynorm.kernels import TritonAnchoredDyISRU, TritonDyISRU, TritonDyT  # noqa: E402
from hf_dynorm.modeling_dynorm import AnchorCoupling, _gpu_function, dyisru, dyt  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
C = 200  # not a multiple of the 128-channel tile; 21 rows are not a multiple of the 16-row tile
# 21 rows: one backward program per column block; 300: three, each summing 8 row tiles, the last 2.75 of them
ROWS = {"21 rows": (3, 7), "300 rows": (4, 75)}
CASES = {"dyisru": (TritonDyISRU, dyisru, 900.0), "dyt": (TritonDyT, dyt, 0.02)}


def _run(function, x, parameter, weight, bias, grad, *rest):
    inputs = [x, parameter, weight] + ([bias] if bias is not None else [])
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    y = function(*inputs, *([None] if bias is None else []), *rest)
    return (y, *torch.autograd.grad(y, inputs, grad))


@pytest.mark.parametrize("kind", ["dyisru", "dyt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("rows", list(ROWS.values()), ids=list(ROWS))
def test_kernel_matches_reference_in_value_and_gradient(kind, dtype, per_channel, with_bias, rows):
    kernel, reference, value = CASES[kind]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*rows, C, generator=generator) * 30
    x[0, 0, :3] = torch.tensor([6e4, -6e4, 3e4])  # fp16's range: x*x must not overflow
    parameter = value * (torch.rand(C if per_channel else 1, generator=generator) + 0.5)
    weight = torch.rand(C, generator=generator) + 0.5
    bias = torch.randn(C, generator=generator) if with_bias else None
    grad = torch.randn(x.shape, generator=generator)
    x, grad = x.to(DEVICE, dtype), grad.to(DEVICE, dtype)
    parameter, weight = parameter.to(DEVICE), weight.to(DEVICE)
    bias = bias.to(DEVICE) if bias is not None else None

    got = _run(kernel.apply, x, parameter, weight, bias, grad)
    assert torch.equal(kernel.values(x, parameter, weight, bias), got[0])  # the no-autograd path (inference)
    # the truth: the reference formula in fp64 on the same (rounded) inputs
    truth = _run(reference, x.double(), parameter.double(), weight.double(),
                 bias.double() if bias is not None else None, grad.double())
    assert got[0].dtype == dtype and all(torch.isfinite(t).all() for t in got)
    low = dtype != torch.float32
    for name, a, b in zip(["y", "x", "parameter", "weight", "bias"], got, truth):
        scale = b.abs().max().item() + 1e-12
        # fp32 compute: rounding relative to the largest entry; fp16/bf16 outputs: one rounding of the I/O dtype
        tolerance = (1e-2 if low and name in ("y", "x") else 1e-5) * scale
        assert (a.double() - b).abs().max().item() <= tolerance, name


@pytest.mark.parametrize("kind", ["dyisru", "dyt"])
def test_kernels_record_their_backward_under_create_graph(kind):
    """A gradient penalty: the gradient with respect to x, itself differentiated, matches the reference's."""
    kernel, reference, value = CASES[kind]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, C, generator=generator) * 30
    parameter, weight = value * (torch.rand(C, generator=generator) + 0.5), torch.rand(C, generator=generator) + 0.5
    bias, grad = torch.randn(C, generator=generator), torch.randn(x.shape, generator=generator)
    results = []
    for function, dtype in ((kernel.apply, torch.float32), (reference, torch.float64)):
        inputs = [t.to(DEVICE, dtype).requires_grad_() for t in (x, parameter, weight, bias)]
        grad_x, = torch.autograd.grad(function(*inputs), inputs[0], grad.to(DEVICE, dtype), create_graph=True)
        results.append([grad_x, *torch.autograd.grad(grad_x.square().sum(), inputs[:3])])
    for name, got, truth in zip(["grad_x", "x", "parameter", "weight"], *results):
        assert (got.double() - truth).abs().max().item() <= 1e-5 * truth.abs().max().item(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("anchor_weight", "anchor_scale"), [(1.0, 1.0), (0.4, 0.3), (0.0, 1.0)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_anchored_kernel_matches_reference_values(dtype, anchor_weight, anchor_scale, per_channel):
    generator = torch.Generator().manual_seed(0)
    anchors = torch.tensor([0, 5, 127, 130, 199])  # first and last channel, both sides of the tile edge; 5: padded
    x = torch.randn(3, 7, C, generator=generator) * 30
    x[0, 0, :3] = torch.tensor([6e4, -6e4, 3e4])  # fp16's range, in an anchor and in ordinary channels
    x[1, 2, 130] = -2e4  # a massive activation in an anchor channel
    kappa = 900.0 * (torch.rand(C if per_channel else 1, generator=generator) + 0.5)
    weight, bias = torch.rand(C, generator=generator) + 0.5, torch.randn(C, generator=generator)
    x, kappa, weight, bias, anchors = (t.to(DEVICE) for t in (x.to(dtype), kappa, weight, bias, anchors))
    coupling = AnchorCoupling.of(anchors, anchor_weight, anchor_scale, C, torch.float32)

    got = TritonAnchoredDyISRU.values(x, kappa, weight, bias, coupling)
    truth = dyisru(x.double(), kappa.double(), weight.double(), bias.double(), anchors, anchor_weight, anchor_scale)
    assert got.dtype == dtype and got.shape == x.shape
    tolerance = (1e-2 if dtype != torch.float32 else 1e-5) * truth.abs().max().item()
    assert (got.double() - truth).abs().max().item() <= tolerance

    # with autograd it is the PyTorch Function: the same values and gradients
    from hf_dynorm.modeling_dynorm import FusedDyISRU

    grad = torch.randn(x.shape, generator=generator).to(x)
    tracked = [_run(function.apply, x, kappa, weight, bias, grad, coupling)
               for function in (TritonAnchoredDyISRU, FusedDyISRU)]
    assert all(torch.equal(a, b) for a, b in zip(*tracked))


def test_modules_pick_the_kernels_for_gpu_tensors_only():
    from hf_dynorm import DyISRU

    assert _gpu_function("dyisru") is TritonDyISRU and _gpu_function("dyt") is TritonDyT
    assert _gpu_function("dyisru_anchored") is TritonAnchoredDyISRU
    module = DyISRU(8, kappa=10.0)
    from hf_dynorm.modeling_dynorm import FusedDyISRU

    assert module._fused_function(torch.ones(2, 8), FusedDyISRU) is FusedDyISRU  # CPU: the PyTorch Function
    module.triton = False
    assert module._fused_function(torch.ones(2, 8, device=DEVICE), FusedDyISRU) is FusedDyISRU


def test_kernels_compile_for_nvidia_gpus_to_vectorized_code_without_spills():
    """What only a GPU run would otherwise show, checked on the CPU: every kernel compiles for sm_80 (A100) and
    sm_90 (H100/H200) through Triton and ptxas, streams its tensors with 128-bit loads and stores (16-bit I/O: no
    scalar 16-bit stores), and spills no registers. Bandwidth itself still needs a GPU (benchmarks/run.py)."""
    triton = pytest.importorskip("triton")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend (the CPU wheel of triton has it; a ROCm build does not)")
    script = Path(__file__).with_name("kernel_ptx.py")
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    result = subprocess.run([sys.executable, str(script), "80:bf16", "90:bf16", "90:fp32"], env=environment,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert len(report) == 3
    for target, kernels in report.items():
        assert len(kernels) == 5, target
        for name, facts in kernels.items():
            instructions, resources = set(facts["memory_instructions"]), facts["resources"]
            assert {"ld.global.v4.b32", "st.global.v4.b32"} <= instructions, (target, name, instructions)
            if target.endswith("bf16"):
                assert "st.global.b16" not in instructions, (target, name, instructions)
            assert resources["STACK"] == 0 and resources["LOCAL"] == 0, (target, name, resources)
