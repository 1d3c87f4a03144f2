"""Exact algebra of DyT and DyISRU (arXiv 2503.21708; README, "The math in a few lines"), and their numerics."""

import math

import pytest
import torch

from hf_dynorm import DyISRU, DyT, dyisru, dyt

C, EPS = 48, 1e-5


def rms_norm(x, weight, eps=EPS):
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_dyisru_with_per_token_kappa_is_rmsnorm():
    x = torch.randn(5, 7, C, dtype=torch.float64) * 3
    weight = torch.rand(C, dtype=torch.float64) + 0.5
    squares = x.pow(2)
    kappa = squares.sum(-1, keepdim=True) - squares + C * EPS  # K_i = sum_{j != i} x_j^2 + C eps
    y = dyisru(x, kappa, weight * math.sqrt(C)).double()
    torch.testing.assert_close(y, rms_norm(x, weight).float().double(), rtol=1e-6, atol=1e-6)


def test_anchored_dyisru_with_every_channel_anchored_is_rmsnorm():
    x = torch.randn(4, 9, C) * 5
    weight = torch.rand(C) + 0.5
    module = DyISRU(C, kappa=C * EPS, anchors=list(range(C)))
    with torch.no_grad():
        module.weight.copy_(weight * math.sqrt(C))
    torch.testing.assert_close(module(x), rms_norm(x, weight), rtol=2e-6, atol=2e-6)


def test_anchored_dyisru_layernorm_analogue_on_centred_input():
    x = torch.randn(3, 6, C) * 2 + 1.5
    centred = x - x.mean(-1, keepdim=True)
    layer_norm = torch.nn.LayerNorm(C, eps=EPS)
    with torch.no_grad():
        layer_norm.weight.uniform_(0.5, 1.5)
        layer_norm.bias.normal_()
    module = DyISRU(C, kappa=C * EPS, anchors=list(range(C)), bias=True)
    with torch.no_grad():
        module.weight.copy_(layer_norm.weight * math.sqrt(C))
        module.bias.copy_(layer_norm.bias)
    torch.testing.assert_close(module(centred), layer_norm(x), rtol=1e-5, atol=1e-5)


def test_anchor_weight_zero_is_pure_dyisru_and_partial_anchors_follow_the_formula():
    x = torch.randn(2, 3, C, dtype=torch.float64)
    anchors = torch.tensor([1, 7, 30])
    kappa, weight = torch.tensor([2.5]), torch.rand(C, dtype=torch.float64)
    torch.testing.assert_close(dyisru(x, kappa, weight, anchors=anchors, anchor_weight=0.0),
                               dyisru(x, kappa, weight).to(x.dtype))
    a = 0.3
    coupled = x[..., anchors].pow(2).sum(-1, keepdim=True)
    own = torch.zeros(C, dtype=torch.float64)
    own[anchors] = 1
    expected = weight * x / torch.sqrt(kappa + x.pow(2) + a * (coupled - own * x.pow(2)))
    torch.testing.assert_close(dyisru(x, kappa, weight, anchors=anchors, anchor_weight=a), expected.float().double(),
                               rtol=1e-6, atol=1e-6)


def test_dyt_formula_and_shared_bound():
    x = torch.linspace(-50, 50, 101).repeat(C, 1).T
    alpha, weight, bias = torch.tensor([0.3]), torch.rand(C) + 0.1, torch.randn(C)
    torch.testing.assert_close(dyt(x, alpha, weight, bias), torch.tanh(0.3 * x) * weight + bias)
    # both bounded by |gamma|, with slope gamma * alpha = gamma / sqrt(kappa) at 0
    kappa = torch.tensor([1 / 0.3 ** 2])
    assert (dyisru(x, kappa, weight).abs() <= weight + 1e-6).all()
    h = torch.full((1, C), 1e-3)
    torch.testing.assert_close(dyisru(h, kappa, weight) / h, dyt(h, alpha, weight) / h, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("module", [DyISRU(C, kappa=300.0, anchors=[0, 5]), DyT(C, alpha=0.01)])
def test_fp16_inputs_up_to_6e4_are_finite_and_match_fp64(module):
    x = torch.randn(4, C) * 50
    x[:, 0] = 6e4
    x[0, 3] = -6e4
    x16 = x.half()
    y = module(x16)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    reference = module.double()(x16.double())
    module.float()
    torch.testing.assert_close(y.double(), reference, rtol=1e-3, atol=1e-3)


def test_kappa_is_positive_by_parametrisation_and_per_channel_option():
    module = DyISRU(C, kappa=50.0, per_channel=True)
    assert module.log_kappa.shape == (C,) and module.per_channel
    with torch.no_grad():
        module.log_kappa.fill_(-30.0)
    assert (module.kappa > 0).all()
    assert DyT(C, per_channel=True).alpha.shape == (C,)
    assert DyT(C).alpha.shape == (1,)


def test_set_anchors_rejects_out_of_range():
    with pytest.raises(ValueError, match="anchor channels must lie in"):
        DyISRU(C).set_anchors([C])


@pytest.mark.parametrize("kind", ["dyisru", "anchored", "dyt"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_fused_path_gradients_are_exact(kind, per_channel):
    from hf_dynorm.modeling_dynorm import AnchorCoupling, FusedDyISRU, FusedDyT

    torch.manual_seed(0)
    x = (torch.randn(3, 5, 8, dtype=torch.float64) * 4).requires_grad_()
    parameter = (torch.rand(8 if per_channel else 1, dtype=torch.float64) + 0.5).requires_grad_()
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    if kind == "dyt":
        function, inputs = FusedDyT.apply, (x, parameter, weight, bias)
    else:
        kappa = (parameter * 20).detach().requires_grad_()
        anchored = (AnchorCoupling.of(torch.tensor([6, 1]), 0.7, 1.3, 8, torch.float64),) if kind == "anchored" else ()
        function, inputs = (lambda *tensors: FusedDyISRU.apply(*tensors, *anchored)), (x, kappa, weight, bias)
    assert torch.autograd.gradcheck(function, inputs)
    # create_graph (gradient penalties, Hessian-vector products) records the backward: second derivatives too
    assert torch.autograd.gradgradcheck(function, inputs)
    only_bias = bias.detach().requires_grad_()  # nothing but the bias to differentiate
    grad_bias, = torch.autograd.grad(function(*(t.detach() for t in inputs[:3]), only_bias).sum(), only_bias,
                                     create_graph=True)
    torch.testing.assert_close(grad_bias, torch.full_like(bias, 15.0))


@pytest.mark.parametrize("anchor_weight", [1.0, 0.4, 0.0])
def test_fused_anchored_dyisru_is_the_reference_form(anchor_weight):
    torch.manual_seed(2)
    module = DyISRU(C, kappa=50.0, anchors=[5, 2, 11], anchor_scale=0.25)
    module.anchor_weight.fill_(anchor_weight)
    x = torch.randn(3, 7, C, dtype=torch.float64) * 3
    x[..., 5] = 400.0  # a massive activation in an anchor channel
    outputs = []
    for fused in (True, False):
        module.fused = fused
        module.zero_grad()
        inputs = x.clone().requires_grad_()
        y = module.double()(inputs)
        (y * torch.linspace(-1, 1, C, dtype=torch.float64)).sum().backward()
        outputs.append([y, inputs.grad, *(p.grad for p in module.parameters())])
    for fused_value, reference_value in zip(*outputs):
        torch.testing.assert_close(fused_value, reference_value, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["transposed", "one token", "1-D", "no rows"])
@pytest.mark.parametrize("per_channel", [False, True])  # a scalar kappa takes the addmv form, per channel matmul
def test_fused_anchored_dyisru_takes_any_layout(layout, per_channel):
    torch.manual_seed(5)
    module = DyISRU(C, kappa=50.0, per_channel=per_channel, anchors=[5, 2, 11]).double()
    shapes = {"transposed": (5, 7, C), "one token": (1, 1, C), "1-D": (C,), "no rows": (0, C)}
    x = torch.randn(shapes[layout], dtype=torch.float64) * 3
    x = x.transpose(0, 1) if layout == "transposed" else x
    expected = dyisru(x, module.kappa, module.weight, None, module.anchors, module.anchor_weight)
    inputs = x.clone().requires_grad_()
    torch.testing.assert_close(module(inputs), expected, rtol=1e-12, atol=1e-12)  # the autograd Function
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected, rtol=1e-12, atol=1e-12)  # its bare forward values


def test_anchor_coupling_is_cached_until_the_anchors_or_their_weight_change():
    """The fused path builds its anchor vectors once; every way the anchors, anchor_weight or anchor_scale change
    rebuilds them: distillation's fill_, load_state_dict, set_anchors, a swapped .data, a new scale, a dtype
    change."""
    torch.manual_seed(3)
    module = DyISRU(C, kappa=50.0, anchors=[5, 2, 11], anchor_scale=0.25)
    x = torch.randn(3, 7, C) * 3
    x[..., 2] = 300.0

    def check():
        with torch.no_grad():
            expected = dyisru(x.to(module.weight.dtype), module.kappa, module.weight, None, module.anchors,
                              module.anchor_weight, module.anchor_scale)
            torch.testing.assert_close(module(x.to(module.weight.dtype)), expected, rtol=1e-6, atol=1e-6)

    check()
    assert module._anchor_coupling(torch.float32) is module._anchor_coupling(torch.float32)  # built once
    module.anchor_weight.fill_(0.3)
    check()
    state = {**module.state_dict(), "anchors": torch.tensor([0, 7, 13]), "anchor_weight": torch.tensor(0.6)}
    module.load_state_dict(state)
    check()
    module.set_anchors([1, 4, 9, 15])
    check()
    module.anchor_weight.data = torch.tensor(0.1)
    check()
    module.anchor_scale = 0.5
    check()
    module.double()
    check()
    with torch.inference_mode():  # inference tensors have no version counter: built on every call
        fresh = DyISRU(C, kappa=50.0, anchors=[5, 2])
        assert fresh._anchor_coupling(torch.float32) is not fresh._anchor_coupling(torch.float32)
    module.float().anchor_weight.fill_(0.7)
    with torch.inference_mode():  # built in inference mode, yet tensors that a later graph can save
        module(x)
    assert not any(tensor.is_inference() for tensor in module._anchor_coupling(torch.float32))
    inputs = x.clone().requires_grad_()
    grad, = torch.autograd.grad(module(inputs).square().sum(), inputs, create_graph=True)
    grad.sum().backward()  # a gradient penalty's double backward
    assert module.weight.grad is not None and module.log_kappa.grad is not None


def test_kappa_is_cached_where_autograd_does_not_track_it_until_log_kappa_changes(monkeypatch):
    """Without autograd on log_kappa, kappa = exp(log_kappa) is computed once; an optimizer step, load_state_dict,
    a swapped .data or a dtype change computes it again. With autograd on, every call builds it in the graph; in a
    distributed run (FSDP refills parameter storage) every call computes it."""
    module = DyISRU(C, kappa=50.0, per_channel=True)

    def check():
        with torch.no_grad():
            assert module.kappa is module.kappa  # cached
            torch.testing.assert_close(module.kappa, module.log_kappa.detach().exp(), rtol=0, atol=0)

    check()
    kappa = module.kappa
    assert kappa.grad_fn is not None and module.kappa is not kappa  # tracked: a new node each call
    kappa.sum().backward()
    torch.optim.SGD([module.log_kappa], lr=0.1).step()  # an in-place update
    check()
    module.load_state_dict({**module.state_dict(), "log_kappa": torch.full((C,), 2.0)})
    check()
    module.log_kappa.data = torch.full((C,), 3.0)
    check()
    module.double()
    check()
    module.log_kappa.requires_grad_(False)  # frozen: cached even with autograd on
    assert module.kappa is module.kappa
    module.log_kappa.data = torch.full((C,), 4.0, dtype=torch.float64)
    with torch.inference_mode():  # computed in inference mode, yet a tensor that autograd can save
        assert not module.kappa.is_inference() and not module.kappa.requires_grad
    x = torch.randn(2, C, dtype=torch.float64, requires_grad=True)
    module(x).sum().backward()
    assert x.grad is not None
    with torch.inference_mode():  # inference tensors have no version counter: computed on every call
        fresh = DyISRU(C, kappa=50.0)
        assert fresh.kappa is not fresh.kappa
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    assert module.kappa is not module.kappa


def test_fused_anchored_dyisru_keeps_a_non_finite_square_in_its_row():
    """The fused path forms a row's coupled term as x^2 times a per-channel vector, so a square that overflows fp32
    (|x| above 1.8e19) in any channel makes that row NaN (0 * inf), where the reference's NaN stays in that channel
    (documented in `_dyisru_denominator`). Every other row keeps its values."""
    module = DyISRU(C, kappa=4.0, anchors=[1, 3])
    x = torch.randn(3, C)
    x[1, 6] = 3e19
    with torch.no_grad():
        fused = module(x)
        reference = dyisru(x, module.kappa, module.weight, None, module.anchors, module.anchor_weight)
    assert fused[1].isnan().all() and reference[1].isnan().nonzero().flatten().tolist() == [6]
    torch.testing.assert_close(fused[[0, 2]], reference[[0, 2]])


def test_set_anchors_rejects_repeated_channels():
    with pytest.raises(ValueError, match="anchor channels must be distinct"):
        DyISRU(C, anchors=[3, 4, 3])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fused_dyt_is_tanh_within_fp32_rounding(compiled):
    """The fused path computes tanh(z) as 1 - 2 sigmoid(-2z) (cheaper on CPUs; under torch.compile the sigmoid as
    1 / (1 + 2^(2z log2 e))): within 2e-7 of tanh everywhere, saturating at the extremes of fp32."""
    x = torch.cat([torch.linspace(-60, 60, 200_001), torch.tensor([-3e38, 3e38, -torch.inf, torch.inf])])
    module = DyT(1, alpha=0.5)
    run = torch.compile(module, dynamic=False) if compiled else module
    with torch.no_grad():
        error = (run(x[:, None]).squeeze(1).double() - torch.tanh(0.5 * x.double())).abs().max().item()
    assert error < 2e-7


def _module_with_random_affine(kind: str, *, kappa: float, alpha: float, anchors: list[int]) -> torch.nn.Module:
    """DyISRU, anchored DyISRU (anchor_scale 0.5) or DyT, with weight in [0.5, 2) and a random bias."""
    module = {"dyisru": lambda: DyISRU(C, kappa=kappa, bias=True),
              "anchored": lambda: DyISRU(C, kappa=kappa, bias=True, anchors=anchors, anchor_scale=0.5),
              "dyt": lambda: DyT(C, alpha=alpha, bias=True)}[kind]()
    with torch.no_grad():
        module.weight.uniform_(0.5, 2.0)
        module.bias.normal_()
    return module


@pytest.mark.parametrize(("kind", "divide_above"), [("dyisru", -1), ("dyisru", 10**9), ("anchored", -1),
                                                     ("anchored", 10**9), ("dyt", None)],
                         ids=["dyisru-divide", "dyisru-rsqrt", "anchored-divide", "anchored-rsqrt", "dyt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_and_reference_agree_in_value_and_gradient(kind, divide_above, dtype, monkeypatch):
    """DyISRU both ways of forming x / sqrt(denominator) (chosen by size: DIVIDE_ABOVE_ELEMENTS)."""
    from hf_dynorm import modeling_dynorm

    if divide_above is not None:
        monkeypatch.setattr(modeling_dynorm, "DIVIDE_ABOVE_ELEMENTS", divide_above)
    torch.manual_seed(1)
    module = _module_with_random_affine(kind, kappa=900.0, alpha=0.02, anchors=[0, 7])
    x = torch.randn(4, 6, C) * 30
    x[0, 0, :3] = torch.tensor([6e4, -6e4, 3e4])
    results = []
    for fused in (True, False):
        module.fused = fused
        module.zero_grad()
        inputs = x.to(dtype).requires_grad_()
        y = module(inputs)
        (y.float() * torch.linspace(-1, 1, C)).sum().backward()
        results.append((y, inputs.grad, [p.grad.clone() for p in module.parameters()]))
    (y1, gx1, gp1), (y2, gx2, gp2) = results
    assert y1.dtype == dtype and torch.isfinite(y1).all() and torch.isfinite(gx1).all()
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(y1, y2, **tolerance)
    torch.testing.assert_close(gx1, gx2, **tolerance)
    for a, b in zip(gp1, gp2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kind", ["dyisru", "anchored", "dyt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fused_paths_in_row_blocks_match_the_whole_tensor(kind, dtype, monkeypatch):
    """Large CPU inputs run in blocks of rows where they have fp32 temporaries (every backward, a bf16 forward): the
    same values and gradients to rounding (the per-channel sums add up block by block), exact in fp64 (gradcheck)."""
    from hf_dynorm import modeling_dynorm

    torch.manual_seed(4)
    module = _module_with_random_affine(kind, kappa=30.0, alpha=0.2, anchors=[4, 9]).to(dtype)
    module.requires_grad_(False)
    per_channel = "alpha" if kind == "dyt" else "log_kappa"  # summed over the blocks per channel
    getattr(module, per_channel).data = getattr(module, per_channel).data.expand(C).clone() + torch.rand(C, dtype=dtype)
    module.requires_grad_(True)
    x = (torch.randn(5, 5, C, dtype=torch.float64) * 5).to(dtype).transpose(0, 1)  # 25 rows, not contiguous
    results = []
    for block_elements in (3 * C, 10**9):  # 9 blocks (the last one row) or the whole tensor
        monkeypatch.setattr(modeling_dynorm, "ROW_BLOCK_ELEMENTS", block_elements)
        module.zero_grad()
        inputs = x.detach().requires_grad_()
        y = module(inputs)
        (y * torch.linspace(-1, 1, C, dtype=dtype)).sum().backward()
        with torch.no_grad():
            untracked = module(x)
        results.append((y, untracked, inputs.grad, [p.grad.clone() for p in module.parameters()]))
    assert modeling_dynorm._row_blocks(x) is None
    monkeypatch.setattr(modeling_dynorm, "ROW_BLOCK_ELEMENTS", 3 * C)
    assert len(modeling_dynorm._row_blocks(x)) == 9
    (y1, untracked1, gx1, gp1), (y2, untracked2, gx2, gp2) = results
    assert torch.equal(y1, untracked1) and torch.equal(y2, untracked2)
    torch.testing.assert_close(y1, y2)  # the same ops per row (ATen's loops may differ in the last bit)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype != torch.bfloat16 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(gx1, gx2, **tolerance)
    for blocked, whole in zip(gp1, gp2):
        torch.testing.assert_close(blocked, whole, **tolerance)
    if dtype == torch.float64:
        parameters = [module.get_parameter(per_channel), module.weight, module.bias]
        assert torch.autograd.gradcheck(lambda inputs, *_: module(inputs), (x.detach().requires_grad_(), *parameters))


@pytest.mark.parametrize("kind", ["dyisru", "anchored", "dyt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_runs_the_fused_math_without_autograd_and_gives_the_same_values(kind, dtype):
    """Where nothing needs a gradient the modules skip the autograd Function (its bookkeeping costs as much as the
    math at decode sizes): same values bit for bit, no graph; any input or parameter that needs a gradient gets one."""
    torch.manual_seed(3)
    module = _module_with_random_affine(kind, kappa=30.0, alpha=0.2, anchors=[4, 9])
    x = (torch.randn(2, 3, C) * 5).to(dtype)
    tracked = module(x)
    assert tracked.grad_fn is not None and "Fused" in type(tracked.grad_fn).__name__
    with torch.inference_mode():
        untracked = module(x)
    assert untracked.grad_fn is None
    assert torch.equal(untracked, tracked.detach())
    module.requires_grad_(False)
    assert module(x).grad_fn is None  # frozen and no input gradient: nothing to record
    assert module(x.clone().requires_grad_()).grad_fn is not None


@pytest.mark.parametrize("kind, per_channel", [("dyt", True), ("dyisru", False), ("dyisru", True),
                                               ("anchored", False), ("anchored", True)])
@pytest.mark.parametrize("grad", [False, True])
def test_autocast_leaves_the_arithmetic_in_fp32(kind, per_channel, grad):
    # CPU autocast runs matmul in bf16: before, the anchored form with a per-channel kappa (a matmul over the anchor
    # squares) was 3e-3 off the fp64 reference under it; fp32 arithmetic is within 1e-6
    torch.manual_seed(0)
    module = DyT(64, alpha=0.2, per_channel=per_channel) if kind == "dyt" else \
        DyISRU(64, kappa=50.0, per_channel=per_channel, anchors=[3, 7, 11, 20] if kind == "anchored" else [])
    x = 3 * torch.randn(4, 16, 64)
    x[..., 3] *= 40
    with torch.no_grad():
        if kind == "dyt":
            expected = dyt(x.double(), module.alpha.double(), module.weight.double())
        else:
            expected = dyisru(x.double(), module.kappa.double(), module.weight.double(), None, module.anchors,
                              module.anchor_weight.double())
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
    assert y.dtype == torch.float32
    assert float((y.detach().double() - expected).abs().max() / expected.abs().max()) < 1e-6
