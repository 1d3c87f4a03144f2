"""DyT and DyISRU, the element-wise stand-ins for RMSNorm/LayerNorm, and the model classes that rebuild them.

This file imports only torch and transformers on purpose: hf_dynorm copies it next to every model it saves, so
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works where hf_dynorm is not installed.
The same source is what hf_dynorm itself runs, so the two can never drift apart.

Math (arXiv 2503.21708): RMSNorm y_i = w_i sqrt(C) x_i / sqrt(x_i^2 + K_i) with K_i = sum_{j != i} x_j^2 + C eps.
DyISRU freezes K_i to a constant kappa; DyT solves the derivative-space decoupling, y = gamma tanh(alpha x).
Anchored DyISRU keeps the squares of a few anchor channels A coupled (massive activations live there).
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import NamedTuple

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------------------------
# Functional forms. Computed in fp32 for any lower precision (x*x overflows fp16 above 255), cast back at the end.
# ---------------------------------------------------------------------------------------------------------------


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 inputs (as HF's RMSNorm), fp64 kept for fp64 (exact tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _distributed() -> bool:
    """Whether this process is part of a torch.distributed run."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.to(dtype)` without the call where the dtype already matches: on the fused paths every avoided
    dispatcher call counts (a norm at decode size is ~10 of them)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def dyt(x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dynamic Tanh: ``weight * tanh(alpha * x) + bias``."""
    dtype = compute_dtype(x)
    y = torch.tanh(alpha.to(dtype) * x.to(dtype)) * weight.to(dtype)
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype)


def dyisru(
    x: torch.Tensor,
    kappa: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    anchors: torch.Tensor | None = None,
    anchor_weight: torch.Tensor | float = 1.0,
    anchor_scale: float = 1.0,
) -> torch.Tensor:
    """(Anchored) Dynamic Inverse Square Root Unit.

    ``y_i = weight_i * x_i / sqrt(kappa + x_i^2 + a * (s * sum_{c in anchors} x_c^2 - [i in anchors] x_i^2)) + bias_i``
    where ``a`` is ``anchor_weight`` and ``s`` is ``anchor_scale``. With s = 1: no anchors is the paper's DyISRU;
    every channel anchored with ``kappa = C * eps`` is RMSNorm. A bounded function (weight and kappa scaled by
    b / sqrt(C) and its square) takes s = b^2 / C, so that the anchored channels keep the paper's bound.
    """
    dtype = compute_dtype(x)
    xf = x.to(dtype)
    squares = xf * xf
    denominator = squares + kappa.to(dtype)
    if anchors is not None and anchors.numel() > 0:
        coupled = squares.index_select(-1, anchors).sum(-1, keepdim=True)
        is_anchor = torch.zeros(x.shape[-1], device=x.device, dtype=dtype).index_fill_(0, anchors, 1.0)
        # an anchor's own square is already in x_i^2: the coupled sum takes it over (scaled like the rest)
        denominator = denominator + anchor_weight * (anchor_scale * coupled - squares * is_anchor)
    y = xf * torch.rsqrt(denominator) * weight.to(dtype)
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Fused paths: the same functions as hand-written autograd Functions, in as few passes over memory as the math
# allows (in place wherever a temporary can be reused). Low-precision inputs are converted to fp32 once, up front:
# CPU kernels that mix dtypes fall back to slow scalar loops. Only the inputs are saved; backward recomputes the
# response (less memory, and cheaper than reading it back).
# DyT's tanh(z) is computed as 1 - 2 sigmoid(-2z) (`_dyt_gate`): the same function (within 2e-7), ~6x cheaper than
# tanh on CPUs.
# ---------------------------------------------------------------------------------------------------------------


# On the CPU, large inputs run in blocks of rows (ROW_BLOCK_ELEMENTS at a time) wherever there are full-size fp32
# temporaries (every backward; the forward of fp16/bf16 input): a block's temporaries stay in cache and come from
# malloc's heap. Full-size ones cost a trip through memory each and, above glibc's 32 MiB mmap ceiling, fresh pages
# that fault on first touch: DyISRU forward+backward of (2, 2048, 4096) took 102 ms (fp32) and 263 ms (bf16) whole,
# 38 and 53 ms in blocks (one A/B). Each row goes through the same ops either way.
ROW_BLOCK_ELEMENTS = 1 << 19


def _row_blocks(x: torch.Tensor) -> list[slice] | None:
    """The slices of x's rows (x as (rows, C)) to compute a large CPU input in; None: compute it whole (small
    inputs, checked first because at a decode step any bookkeeping shows; other devices; and under torch.compile,
    whose generated loop already keeps its temporaries in registers)."""
    if x.numel() <= ROW_BLOCK_ELEMENTS or x.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    step = max(1, ROW_BLOCK_ELEMENTS // x.shape[-1])
    return [slice(start, start + step) for start in range(0, x.numel() // x.shape[-1], step)]


def _blockwise_values(x: torch.Tensor, dtype: torch.dtype, compute) -> torch.Tensor:
    """``compute(xf)`` (xf: x in the compute dtype `dtype`) as x's dtype. A large low-precision x goes in blocks of
    rows, so that its fp32 copy and temporaries stay block-sized; an x already in the compute dtype goes whole
    (compute's result, the output, is then its only full-size tensor: blocks measured slower there)."""
    blocks = None if x.dtype == dtype else _row_blocks(x)
    if blocks is None:
        return _as(compute(_as(x, dtype)), x.dtype)
    rows = x.reshape(-1, x.shape[-1])
    y = torch.empty_like(rows)
    for block in blocks:
        y[block] = compute(rows[block].to(dtype))
    return y.view(x.shape)


def _blockwise_backward(x: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype, compute) -> tuple[torch.Tensor, list]:
    """``compute(xf, g)`` -> (grad_x, per-channel sums) over x and grad in blocks of rows (in the compute dtype
    `dtype`): grad_x as x's dtype and each sum (None stays None) added up over the blocks."""
    blocks = _row_blocks(x)
    if blocks is None:
        grad_x, sums = compute(_as(x, dtype), _as(grad, dtype))
        return _as(grad_x, x.dtype), sums
    rows = x.reshape(-1, x.shape[-1])
    grads, grad_x, totals = grad.reshape(rows.shape), torch.empty_like(rows), None
    for block in blocks:
        block_grad_x, sums = compute(_as(rows[block], dtype), _as(grads[block], dtype))
        grad_x[block] = block_grad_x
        totals = sums if totals is None else [t if s is None else t.add_(s) for t, s in zip(totals, sums)]
    return grad_x.view(x.shape), totals


LOG2_E = math.log2(math.e)


def _dyt_gate(xf: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """s = sigmoid(-2 a x) as a new tensor: tanh(a x) = 1 - 2 s. Under torch.compile as 1 / (1 + 2^(2 a x log2 e)):
    inductor lowers sigmoid to 1 / (1 + exp(-z)), and its CPU exp2 is cheaper than its exp. Compiled DyT at
    (8, 512, 576), one in-process A/B of 100 rounds: forward 1.12 -> 0.95 ms fp32 and 1.11 -> 1.00 ms bf16,
    forward+backward 4.32 -> 3.50 and 3.19 -> 2.76 ms. Eager, one sigmoid_ pass is cheaper than exp2_, add_ and
    reciprocal_ (three passes)."""
    if torch.compiler.is_compiling():
        return torch.exp2(xf * (2 * LOG2_E * a)).add_(1).reciprocal_()
    return torch.mul(xf, -2 * a).sigmoid_()


def _sum_rows(values: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the channels."""
    return values.reshape(-1, values.shape[-1]).sum(0)


def _parameter_grad(per_channel: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-channel gradient as the gradient of a (1,) scalar or (C,) per-channel parameter."""
    return (per_channel.sum().reshape(1) if like.numel() == 1 else per_channel).to(like.dtype)


def _save_inputs(ctx, x, parameter, weight, bias) -> None:
    """Save what backward recomputes from."""
    ctx.save_for_backward(x, parameter, weight)
    ctx.has_bias = bias is not None


def _saved_inputs(ctx):
    """x, the parameter and weight, the compute dtype, and the parameter and weight cast to it."""
    x, parameter, weight = ctx.saved_tensors
    dtype = compute_dtype(x)
    return x, parameter, weight, dtype, _as(parameter, dtype), _as(weight, dtype)


class AnchorCoupling(NamedTuple):
    """Anchored DyISRU's anchors as the fast paths compute with them: the anchor `channels` (indices: the Triton
    kernel gathers them), the weight of each channel's own x_i^2 in its denominator (`own_square`: 1 - anchor_weight
    at an anchor, 1 elsewhere), the weight of the row's sum of anchor squares in every denominator (`coupled`:
    anchor_weight * anchor_scale, shape (1,)), and that weight per channel (`coupled_weights`: `coupled` at an
    anchor, 0 elsewhere), so that the PyTorch paths need no gather or scatter: the row's coupled term is one
    matrix-vector product of x^2, and the backward's pull on the anchors one addcmul (`_dyisru_denominator` and
    `FusedDyISRU.backward` have the measurements)."""

    channels: torch.Tensor
    own_square: torch.Tensor
    coupled: torch.Tensor
    coupled_weights: torch.Tensor

    @classmethod
    def of(cls, channels: torch.Tensor, weight: torch.Tensor | float, scale: float, width: int,
           dtype: torch.dtype) -> AnchorCoupling:
        """The coupling of distinct anchor `channels` among `width` channels, in the compute dtype `dtype`."""
        weight = torch.as_tensor(weight, dtype=dtype, device=channels.device).reshape(1)
        weighted = torch.zeros(width, dtype=dtype, device=channels.device).index_fill_(0, channels, 1.0).mul_(weight)
        return cls(channels, 1 - weighted, weight * scale, weighted * scale)


# Above this many elements x / sqrt(d) is cheaper as sqrt and a division than as rsqrt and a product; below, the other
# way round. On this CPU (AVX-512), x / sqrt(d) times the weight at width 576, one in-process run: 512 rows 95
# against 117 us, 256 rows 57 against 66 us, 64 rows 20.4 against 19.7 us, 16 rows 11.9 against 7.3 us.
DIVIDE_ABOVE_ELEMENTS = 1 << 16


def _divided_by_root(xf: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """x / sqrt(denominator), written over denominator."""
    if denominator.numel() > DIVIDE_ABOVE_ELEMENTS:
        return torch.div(xf, denominator.sqrt_(), out=denominator)
    return denominator.rsqrt_().mul_(xf)


def _dyisru_denominator(xf, k, anchors: AnchorCoupling | None, *, in_place: bool = True):
    """kappa + x^2 (+ the anchors' coupled term: see `dyisru`) as one new tensor, and its part that does not depend
    on x_i (kappa, plus the row's coupled term where anchored: d denominator_i / d x_i^2 is then own_square).

    Anchored: x^2, then the row's coupled term as x^2 times `coupled_weights` (one matrix-vector product), then one
    addcmul with own_square. The former form gathered the anchor columns and summed their squares (four ops, one of
    them a strided gather). SmolLM2's 61 anchored layers, this form with `_divided_by_root` against the former,
    in-process A/B (medians of paired ratios, quartiles): inside the real 2 x 256 forward 1.29x (1.24-1.36), per
    generated token 1.08x (1.06-1.10), on captured inputs 1.41x (1.37-1.45), forward+backward 1.02x (1.00-1.04); a
    decode step on captured inputs 0.98x (0.91-1.04), where each op's dispatch is all there is and both forms have
    about as many ops. A non-finite square anywhere in a row (|x| above 1.8e19 in fp32) makes the whole row NaN
    (0 * inf), where the reference form's NaN stays in that channel: RMSNorm's mean is as far gone on such a row.
    `in_place=False` leaves x^2 unwritten, so that autograd can record the whole (`_recordable_dyisru`).
    """
    if anchors is None:
        return torch.addcmul(k, xf, xf), k
    squares = torch.mul(xf, xf)
    if k.numel() == 1 and squares.numel():  # (with no rows, addmv would still return kappa's one value)
        # kappa and the coupled term in one addmv over the rows. SmolLM2's 61 anchored layers, in-process A/B against
        # matmul, unsqueeze and add (two runs): 1.075x per captured decode step, 1.035x on the forward's captured
        # inputs, 1.04-1.06x inside generate
        rows = squares.reshape(-1, squares.shape[-1])
        offset = torch.addmv(k, rows, anchors.coupled_weights).view(*squares.shape[:-1], 1)
    else:  # a per-channel kappa does not fit addmv's one value per row
        # matmul folds the leading dimensions itself: 1.17-1.19x a reshape, mv and view at one token (three A/Bs)
        offset = torch.matmul(squares, anchors.coupled_weights).unsqueeze(-1).add(k)
    return torch.addcmul(offset, squares, anchors.own_square, out=squares if in_place else None), offset


def _recordable_dyisru(x: torch.Tensor, kappa: torch.Tensor, weight: torch.Tensor, anchors: AnchorCoupling | None):
    """FusedDyISRU's values (no bias) in ops that autograd can record: the same denominator, not written in place."""
    dtype = compute_dtype(x)
    xf = _as(x, dtype)
    denominator, _ = _dyisru_denominator(xf, _as(kappa, dtype), anchors, in_place=False)
    return _as(xf * torch.rsqrt(denominator) * _as(weight, dtype), x.dtype)


def recorded_backward(ctx, grad: torch.Tensor, function) -> tuple:
    """A fused Function's backward under create_graph (a double backward: gradient penalties, Hessian-vector
    products), where autograd records the backward itself and its in-place formulas cannot be: the gradients of
    ``function(x, parameter, weight)`` (the same math, out of place) on the saved inputs, which autograd can
    differentiate again. The bias's gradient, the sum of grad, needs no function."""
    x, parameter, weight = ctx.saved_tensors
    needed = ctx.needs_input_grad
    inputs = [tensor for tensor, wanted in zip((x, parameter, weight), needed) if wanted]
    grads = iter(torch.autograd.grad(function(x, parameter, weight), inputs, grad, create_graph=True) if inputs else ())
    grad_bias = _sum_rows(grad).to(weight.dtype) if needed[3] else None
    return (*(next(grads) if wanted else None for wanted in needed[:3]), grad_bias, *[None] * (len(needed) - 4))


class FusedDyISRU(torch.autograd.Function):
    """Pure or anchored DyISRU (`anchors`: an AnchorCoupling)."""

    @staticmethod
    def values(x, kappa, weight, bias, anchors=None):
        """The forward values without autograd's bookkeeping (what `forward` returns)."""
        dtype = compute_dtype(x)
        k, w, b = _as(kappa, dtype), _as(weight, dtype), None if bias is None else _as(bias, dtype)

        def compute(xf):
            denominator, _ = _dyisru_denominator(xf, k, anchors)
            response = _divided_by_root(xf, denominator)
            return response.mul_(w) if b is None else torch.addcmul(b, response, w, out=response)

        return _blockwise_values(x, dtype, compute)

    @staticmethod
    def forward(ctx, x, kappa, weight, bias, anchors=None):
        _save_inputs(ctx, x, kappa, weight, bias)
        ctx.anchors = anchors
        return FusedDyISRU.values(x, kappa, weight, bias, anchors)

    @staticmethod
    def backward(ctx, grad):
        anchors = ctx.anchors
        if torch.is_grad_enabled():
            return recorded_backward(ctx, grad, functools.partial(_recordable_dyisru, anchors=anchors))
        x, kappa, weight, dtype, k, w = _saved_inputs(ctx)

        def compute(xf, g):
            denominator, offset = _dyisru_denominator(xf, k, anchors)
            r = denominator.rsqrt_()
            g_r = g * r
            grad_weight = _sum_rows(g_r * xf)  # sum of g x r
            g_r3 = g_r.mul_(r.square_())  # g r^3
            g_r3_x = torch.mul(g_r3, xf, out=r)
            grad_kappa = _sum_rows(g_r3_x)  # times -w / 2: d/dkappa x r = -x r^3 / 2
            # d y_i / d x_i = w r^3 (denominator - x_i^2 d(denominator)/d(x_i^2)) = w r^3 offset
            if anchors is None:
                grad_x = g_r3.mul_(w * k)
            else:  # each anchor's square also sits in every channel's denominator of its row
                grad_x = g_r3.mul_(w).mul_(offset)
                pull = (g_r3_x @ w).unsqueeze(-1)  # sum over the row's channels of g w x r^3
                # x_a * coupled at the anchors, 0 elsewhere, times the pull: a gather and index_add_ of the anchor
                # columns measured 1.04x and 1.05x slower (forward+backward of SmolLM2's 61 layers, two A/Bs)
                grad_x.addcmul_(torch.mul(xf, anchors.coupled_weights, out=g_r3_x), pull, value=-1)
            return grad_x, [grad_kappa, grad_weight, _sum_rows(g) if ctx.has_bias else None]

        grad_x, (grad_kappa, grad_weight, grad_bias) = _blockwise_backward(x, grad, dtype, compute)
        return (grad_x, _parameter_grad(-0.5 * w * grad_kappa, kappa), grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(weight.dtype), None)


class FusedDyT(torch.autograd.Function):
    @staticmethod
    def values(x, alpha, weight, bias):
        """The forward values without autograd's bookkeeping (what `forward` returns)."""
        dtype = compute_dtype(x)
        a, w = _as(alpha, dtype), _as(weight, dtype)
        shift = w if bias is None else _as(bias, dtype) + w

        def compute(xf):
            s = _dyt_gate(xf, a)  # tanh(alpha x) = 1 - 2 s
            return torch.addcmul(shift, s, w, value=-2, out=s)  # w tanh(alpha x) + bias

        return _blockwise_values(x, dtype, compute)

    @staticmethod
    def forward(ctx, x, alpha, weight, bias):
        _save_inputs(ctx, x, alpha, weight, bias)
        return FusedDyT.values(x, alpha, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            return recorded_backward(ctx, grad, dyt)
        x, alpha, weight, dtype, a, w = _saved_inputs(ctx)

        def compute(xf, g):
            s = _dyt_gate(xf, a)  # tanh(alpha x) = 1 - 2 s, its slope 1 - tanh^2 = 4 s (1 - s)
            g_s, grad_sum = g * s, _sum_rows(g)
            grad_weight = grad_sum - 2 * _sum_rows(g_s)  # sum of g tanh
            g_slope = g_s.addcmul_(g_s, s, value=-1)  # g s (1 - s)
            grad_x = g_slope * (4 * a * w)
            grad_alpha = _sum_rows(torch.mul(g_slope, xf, out=s))  # times 4 w
            return grad_x, [grad_alpha, grad_weight, grad_sum if ctx.has_bias else None]

        grad_x, (grad_alpha, grad_weight, grad_bias) = _blockwise_backward(x, grad, dtype, compute)
        return (grad_x, _parameter_grad(4 * w * grad_alpha, alpha), grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(weight.dtype))


# ---------------------------------------------------------------------------------------------------------------
# Modules. State-dict names follow the norms they replace (weight, bias) plus the element-wise parameter.
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def _gpu_functions() -> dict[str, type]:
    """hf_dynorm's Triton kernels by norm kind when hf_dynorm and Triton are installed (looked up once), else {}."""
    try:
        from hf_dynorm.kernels import FUNCTIONS
    except (ImportError, RuntimeError):
        return {}
    return FUNCTIONS


def _gpu_function(kind: str) -> type | None:
    return _gpu_functions().get(kind)


class _ElementwiseNorm(nn.Module):
    """Shared parts of DyT and DyISRU: per-channel weight (gamma) and optional bias.

    ``fused`` (class or instance attribute, default True) selects the fused paths: hf_dynorm's Triton kernels for
    CUDA tensors when Triton is installed (``triton = False`` opts out), the fused PyTorch autograd Functions
    everywhere else. False runs the reference functional form (same values to fp32 rounding).
    """

    fused = True
    triton = True

    def _fused_function(self, x: torch.Tensor, fallback: type, kind: str | None = None) -> type:
        """The Triton Function of `kind` (default: the module's) for CUDA tensors where there is one, else
        `fallback`."""
        if self.triton and x.is_cuda and x.dtype != torch.float64:
            return _gpu_function(kind or self.kind) or fallback
        return fallback

    def _run_fused(self, function: type, x: torch.Tensor, parameter: torch.Tensor, *rest) -> torch.Tensor:
        """A fused Function on x; its bare forward values where autograd has nothing to record (inference, frozen
        weights): a custom Function's bookkeeping costs about as much as the math on decode-size inputs."""
        if torch.is_grad_enabled() and (x.requires_grad or parameter.requires_grad or self.weight.requires_grad
                                        or (self.bias is not None and self.bias.requires_grad)):
            return function.apply(x, parameter, self.weight, self.bias, *rest)
        return function.values(x, parameter, self.weight, self.bias, *rest)

    def __init__(self, channels: int, *, bias: bool = False):
        super().__init__()
        self.channels = channels
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The norm's values, computed in fp32 (fp64 for fp64 input) and returned in x's dtype. Under autocast too:
        autocast would run the anchored form's matrix-vector products in bf16 (its relative error ~4e-3)."""
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._forward(x)
        return self._forward(x)

    def _scalar_or_channel(self, per_channel: bool, value: float) -> nn.Parameter:
        return nn.Parameter(torch.full((self.channels if per_channel else 1,), float(value)))

    @property
    def per_channel(self) -> bool:
        raise NotImplementedError

    def spec(self) -> dict:
        """What it takes to rebuild an empty module of the same shape (stored in the config's `dynorm` record)."""
        return {"kind": self.kind, "channels": self.channels, "per_channel": self.per_channel,
                "bias": self.bias is not None}


class DyT(_ElementwiseNorm):
    """Dynamic Tanh (arXiv 2503.10622): ``weight * tanh(alpha * x) + bias``; alpha scalar or per channel."""

    kind = "dyt"

    def __init__(self, channels: int, *, alpha: float = 0.5, per_channel: bool = False, bias: bool = False):
        super().__init__(channels, bias=bias)
        self.alpha = self._scalar_or_channel(per_channel, alpha)

    @property
    def per_channel(self) -> bool:
        return self.alpha.numel() > 1

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self._run_fused(self._fused_function(x, FusedDyT), x, self.alpha)
        return dyt(x, self.alpha, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.channels}, per_channel={self.per_channel}, bias={self.bias is not None}"


class DyISRU(_ElementwiseNorm):
    """(Anchored) Dynamic Inverse Square Root Unit: ``weight * x / sqrt(kappa + x^2 [+ anchors]) + bias``.

    kappa is stored as ``log_kappa`` so that it stays positive and trains on a log scale (it spans ~1 to ~1e9).
    ``anchors`` (a buffer of channel indices) and ``anchor_weight`` (a buffer in [0, 1] that distillation can fade
    to 0) give the anchored variant; ``anchor_scale`` (a constant, kept in the config record) multiplies the coupled
    term so that a bounded anchored DyISRU (weight and kappa scaled by b / sqrt(C) and its square) still equals
    the norm on tokens whose energy sits in the anchors.
    """

    kind = "dyisru"

    def __init__(
        self,
        channels: int,
        *,
        kappa: float = 1.0,
        per_channel: bool = False,
        bias: bool = False,
        anchors: int | list[int] | torch.Tensor = 0,
        anchor_scale: float = 1.0,
    ):
        super().__init__(channels, bias=bias)
        self.anchor_scale = float(anchor_scale)
        self.log_kappa = self._scalar_or_channel(per_channel, math.log(kappa))
        # a count gives placeholder indices, overwritten by load_state_dict or set_anchors
        self.register_buffer("anchors", torch.arange(anchors if isinstance(anchors, int) else 0))
        self.register_buffer("anchor_weight", torch.ones(()))
        self._coupling: tuple | None = None  # anchors, anchor_weight, their state, and the coupling built from them
        self._kappa: tuple | None = None  # log_kappa, its state, and the kappa computed from it
        if not isinstance(anchors, int):
            self.set_anchors(anchors)

    @property
    def per_channel(self) -> bool:
        return self.log_kappa.numel() > 1

    @property
    def kappa(self) -> torch.Tensor:
        """exp(log_kappa), fp32 at least (fp64 kept). Where autograd does not track log_kappa (inference, frozen
        norms), it is computed again only when log_kappa changed, seen as `_anchor_coupling` sees a change: the exp
        took ~3 us of an anchored DyISRU decode step's ~38 (a (1, 1, 576) input on this CPU). Not in a distributed
        run: FSDP shards parameters and gathers them into reused storage, which no check here could vouch for."""
        log_kappa = self._parameters["log_kappa"]
        if (torch.is_grad_enabled() and log_kappa.requires_grad) or torch.compiler.is_compiling() \
                or log_kappa.is_inference() or _distributed():
            return _as(log_kappa, compute_dtype(log_kappa)).exp()
        state = (log_kappa._version, log_kappa.data_ptr(), log_kappa.dtype)
        cached = self._kappa
        if cached is None or cached[0] is not log_kappa or cached[1] != state:
            # a constant, and a normal tensor even in inference mode: autograd may save it later
            with torch.inference_mode(False), torch.no_grad():
                cached = self._kappa = (log_kappa, state, _as(log_kappa, compute_dtype(log_kappa)).exp())
        return cached[2]

    def set_anchors(self, channels) -> None:
        """Couple these channels' squares (indices into the last dimension); an empty list gives pure DyISRU."""
        channels = torch.as_tensor(channels, dtype=torch.long, device=self.weight.device).flatten()
        if channels.numel() and (channels.min() < 0 or channels.max() >= self.channels):
            raise ValueError(f"anchor channels must lie in [0, {self.channels}), got {channels.tolist()}")
        if channels.unique().numel() != channels.numel():
            raise ValueError(f"anchor channels must be distinct (each couples once), got {channels.tolist()}")
        self.anchors = channels

    def _anchor_coupling(self, dtype: torch.dtype) -> AnchorCoupling:
        """The anchors as an AnchorCoupling in the compute dtype `dtype`, built again only when `anchors`,
        `anchor_weight` or `anchor_scale` changed: building takes six small ops, which a decode step would pay at
        every layer. "Changed" is what autograd's saved-tensor check sees (another tensor, or an in-place write
        such as load_state_dict's copy or distillation's fill_), plus a swapped `.data`; like that check, it does
        not see a write through `.data`."""
        anchors, weight = self._buffers["anchors"], self._buffers["anchor_weight"]  # no Module.__getattr__: 0.6 us
        if torch.compiler.is_compiling() or anchors.is_inference() or weight.is_inference():
            return AnchorCoupling.of(anchors, weight, self.anchor_scale, self.channels, dtype)  # no version counter
        state = (dtype, self.anchor_scale, anchors._version, anchors.data_ptr(), weight._version, weight.data_ptr())
        cached = self._coupling
        if cached is None or cached[0] is not anchors or cached[1] is not weight or cached[2] != state:
            # normal tensors even in inference mode, as for `kappa`: a later tracked call (a create_graph backward)
            # saves them for backward
            with torch.inference_mode(False):
                coupling = AnchorCoupling.of(anchors, weight, self.anchor_scale, self.channels, dtype)
            cached = self._coupling = (anchors, weight, state, coupling)
        return cached[3]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a pure DyISRU's anchors are an empty tensor, which safetensors files (accelerate's checkpoints) may leave out
        # (empty tensors share the null data pointer and are dropped as duplicates): empty it stays
        if prefix + "anchors" not in state_dict and self._buffers["anchors"].numel() == 0:
            state_dict[prefix + "anchors"] = self._buffers["anchors"]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def spec(self) -> dict:
        spec = {**super().spec(), "anchors": int(self.anchors.numel())}
        return {**spec, "anchor_scale": self.anchor_scale} if self.anchor_scale != 1.0 else spec

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return dyisru(x, self.kappa, self.weight, self.bias, self.anchors, self.anchor_weight, self.anchor_scale)
        if self._buffers["anchors"].numel() == 0:
            return self._run_fused(self._fused_function(x, FusedDyISRU), x, self.kappa)
        # the anchored form: one Triton kernel for its forward values on CUDA (inference), else the PyTorch Function
        function = self._fused_function(x, FusedDyISRU, "dyisru_anchored")
        return self._run_fused(function, x, self.kappa, self._anchor_coupling(compute_dtype(x)))

    def extra_repr(self) -> str:
        return (f"{self.channels}, per_channel={self.per_channel}, bias={self.bias is not None}, "
                f"anchors={self.anchors.numel()}")


NORM_KINDS = {"dyt": DyT, "dyisru": DyISRU}


def norm_from_spec(spec: dict) -> nn.Module:
    """An empty module of the shape a `dynorm` site record describes; its values come from the checkpoint."""
    options = {"per_channel": spec["per_channel"], "bias": spec["bias"]}
    if spec["kind"] == "dyisru":
        options.update(anchors=spec.get("anchors", 0), anchor_scale=spec.get("anchor_scale", 1.0))
    return NORM_KINDS[spec["kind"]](spec["channels"], **options)


def resolve_site(name: str, prefix: str, names: set[str]) -> str | None:
    """The name under which a recorded site lives among a model's module `names`: the record may come from a model
    with or without a task head (``model.layers.0...`` in a ForCausalLM, ``layers.0...`` in the bare model, whose
    `base_model_prefix` is ``model``). None if absent."""
    for candidate in (name, name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None,
                      f"{prefix}.{name}" if prefix else None):
        if candidate and candidate in names:
            return candidate
    return None


def install_norms(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Put each module at its (dotted) name in `model`, replacing what was there."""
    for name, module in modules.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def install_recorded_norms(model: nn.Module) -> None:
    """Rebuild the element-wise norms that the config's `dynorm` record lists (sites missing from a headless model,
    such as an MLM head's norm, are skipped), and its sink prefix if it has one."""
    sites = model.config.dynorm["sites"]
    prefix, names = getattr(model, "base_model_prefix", ""), {name for name, _ in model.named_modules()}
    resolved = {resolve_site(name, prefix, names): norm_from_spec(spec) for name, spec in sites.items()}
    resolved.pop(None, None)
    install_norms(model, resolved)
    sink = model.config.dynorm.get("sink")
    if sink:
        SinkPrefix(sink["layers"], sink["heads"], sink["head_dim"], sink["token_id"]).install(model)


# ---------------------------------------------------------------------------------------------------------------
# Sink prefix: a constant first token in front of every sequence.
# ---------------------------------------------------------------------------------------------------------------


class SinkPrefix(nn.Module):
    """The keys and values each attention layer had for one fixed token at the first position (an attention sink),
    stored as buffers and put in front of every sequence as a one-token cache. The text then runs at positions 1..,
    attending to the sink as it would to a real first token, and no real token needs the first position's own
    normalisation: the massive activations of the first position (Sun et al. 2024, arXiv 2402.17762) are computed
    once, with the model's norms in place, and kept.

    Installed on the base model as a forward pre-hook, it holds for every forward and for `generate` with its
    cache: an empty cache (or none) is filled with the sink, position ids move one on, and a 2-D attention mask
    gets a leading 1. Outputs (logits, hidden states) cover the text alone."""

    def __init__(self, layers: int, heads: int, head_dim: int, token_id: int):
        super().__init__()
        self.token_id = int(token_id)
        self.register_buffer("keys", torch.zeros(layers, heads, 1, head_dim))
        self.register_buffer("values", torch.zeros(layers, heads, 1, head_dim))
        self.enabled = True

    @classmethod
    @torch.no_grad()
    def of(cls, model: nn.Module, token_id: int) -> SinkPrefix:
        """The sink of `model` as it is now (its norms in place): its cache after a forward of `token_id` alone."""
        reference = next(model.parameters())
        output = model(input_ids=torch.tensor([[token_id]], device=reference.device), use_cache=True)
        cache = output.cache if "cache" in output else output.past_key_values  # transformers 5.2x names it cache
        layers = getattr(cache, "layers", None)
        keys = [layer.keys for layer in layers] if layers is not None else [cache[i][0] for i in range(len(cache))]
        values = [layer.values for layer in layers] if layers is not None else [cache[i][1] for i in range(len(cache))]
        sink = cls(len(keys), keys[0].shape[1], keys[0].shape[-1], token_id)
        sink.keys.copy_(torch.stack([k[0] for k in keys]))
        sink.values.copy_(torch.stack([v[0] for v in values]))
        return sink.to(device=reference.device, dtype=reference.dtype)

    def spec(self) -> dict:
        return {"token_id": self.token_id, "layers": self.keys.shape[0], "heads": self.keys.shape[1],
                "head_dim": self.keys.shape[-1]}

    def install(self, model: nn.Module) -> None:
        """Put the sink on `model`'s base model (every task head's forward runs through it)."""
        import inspect

        base = getattr(model, getattr(model, "base_model_prefix", ""), model)
        # the cache argument's name: `cache` in transformers 5.2x, `past_key_values` before
        self.cache_argument = "cache" if "cache" in inspect.signature(type(base).forward).parameters else \
            "past_key_values"
        base.dynorm_sink = self
        base.register_forward_pre_hook(self.before_forward, with_kwargs=True)

    def before_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        if not self.enabled:
            return None
        if args:  # input_ids given positionally
            kwargs = {"input_ids": args[0], **kwargs}
            if len(args) > 1:
                raise TypeError("a model with a sink prefix takes its inputs after input_ids by keyword")
        inputs = kwargs.get("input_ids")
        batch = (inputs if inputs is not None else kwargs["inputs_embeds"]).shape[0]
        cache = kwargs.get(self.cache_argument)
        if cache is None:
            from transformers import DynamicCache

            cache = kwargs[self.cache_argument] = DynamicCache(config=module.config)
        if cache.get_seq_length() == 0:
            for layer, (key, value) in enumerate(zip(self.keys, self.values)):
                cache.update(key.expand(batch, -1, -1, -1), value.expand(batch, -1, -1, -1), layer)
        for shifted in ("position_ids", "cache_position"):  # the caller counts without the sink
            if kwargs.get(shifted) is not None:
                kwargs[shifted] = kwargs[shifted] + 1
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError("a model with a sink prefix takes a 2-D attention mask (batch, length)")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, 1), mask], dim=1)
        return (), kwargs


# ---------------------------------------------------------------------------------------------------------------
# Model classes: one subclass per transformers class, made on demand. Saving writes this file and an auto_map.
# ---------------------------------------------------------------------------------------------------------------

CODE_FILE = "modeling_dynorm.py"
# written in two pieces: this file's own source must not contain the marker it is cut at
_BINDINGS_MARKER = "# ---- bindings written " + "by hf_dynorm for one architecture ----"
_CLASSES: dict[type, type] = {}


def dynorm_config_class(base: type) -> type:
    """The config class of a converted model: the base config with model_type ``dynorm_<base>``, so that loading it
    without hf_dynorm (and without trust_remote_code) fails loudly instead of silently using the original norms."""
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Dynorm{base.__name__}", (base,), {"model_type": f"dynorm_{base.model_type}",
                                                                   "__module__": __name__})
    return _CLASSES[base]


def _auto_map(model_class: type) -> dict[str, str]:
    config_class = model_class.config_class
    classes = {"AutoConfig": config_class.__name__}
    for auto_name, cls in AUTO_CLASSES.get(config_class.model_type, {}).items():
        classes[auto_name] = cls.__name__
    return {auto: f"{CODE_FILE[:-3]}.{name}" for auto, name in classes.items()}


def _bindings(model_class: type) -> str:
    """Python source that recreates this architecture's dynorm classes inside the copied file."""
    config_class = model_class.config_class
    base_config = config_class.__mro__[1]
    models = AUTO_CLASSES[config_class.model_type]
    imports = sorted({base_config.__name__} | {cls.__mro__[1].__name__ for cls in models.values()})
    lines = [_BINDINGS_MARKER, f"from transformers import {', '.join(imports)}  # noqa: E402", "",
             f"{config_class.__name__} = dynorm_config_class({base_config.__name__})"]
    for auto_name, cls in models.items():
        lines.append(f"{cls.__name__} = dynorm_model_class({cls.__mro__[1].__name__})")
        lines.append(f"register_auto_class({json.dumps(auto_name)}, {cls.__name__})")
    return "\n".join(lines) + "\n"


def write_code(save_directory: str, model_class: type) -> None:
    """Write this very file, plus the bindings of `model_class`'s architecture, into `save_directory`."""
    with open(__file__, encoding="utf-8") as handle:
        source = handle.read().split(_BINDINGS_MARKER)[0].rstrip() + "\n\n\n"
    with open(os.path.join(save_directory, CODE_FILE), "w", encoding="utf-8") as handle:
        handle.write(source + _bindings(model_class))


# model_type (dynorm_...) -> {auto class name -> dynorm model class}; filled as classes are made or registered.
AUTO_CLASSES: dict[str, dict[str, type]] = {}


def register_auto_class(auto_name: str, model_class: type) -> None:
    AUTO_CLASSES.setdefault(model_class.config_class.model_type, {})[auto_name] = model_class


def dynorm_model_class(base: type) -> type:
    """The class of a converted model: `base` whose __init__ installs the recorded element-wise norms, and whose
    save_pretrained also writes this code and an `auto_map`."""
    if base in _CLASSES:
        return _CLASSES[base]

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        install_recorded_norms(self)

    def save_pretrained(self, save_directory, *args, **kwargs):
        self.config.auto_map = _auto_map(type(self))
        base.save_pretrained(self, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_code(str(save_directory), type(self))

    cls = type(f"Dynorm{base.__name__}", (base,), {
        "config_class": dynorm_config_class(base.config_class),
        "__init__": __init__,
        "save_pretrained": save_pretrained,
        "__module__": __name__,
    })
    _CLASSES[base] = cls
    return cls
