"""Triton kernels for DyISRU and DyT on GPUs: one pass forward, one pass backward, fp32 compute, any float I/O; and
anchored DyISRU's forward (its inference path; its backward stays the PyTorch Function's).

The modules call these for CUDA tensors when Triton is installed (`modeling_dynorm._gpu_function`); elsewhere they
run the fused PyTorch Functions. On a CPU the same kernels run under Triton's interpreter (`TRITON_INTERPRET=1`
set before Triton is imported), which is how the tests check them against the reference.

The input is seen as a (rows, C) matrix and cut into (BLOCK_ROWS, BLOCK_C) tiles, one program each forward. A
backward program walks up to BACKWARD_TILES tiles down its column block and writes its sums over their rows of the
parameter gradients to a (programs, C) buffer that one `sum(0)` reduces: the per-channel gradients (weight, bias,
per-channel kappa/alpha) and the scalar one alike.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_dynorm.modeling_dynorm import FusedDyISRU, dyisru, dyt, recorded_backward

BLOCK_ROWS = 16
BLOCK_C = 128
BACKWARD_TILES = 8


@triton.jit
def _tile(row_block, rows, channels, stride, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets, rows, columns and mask of the tile of rows `row_block` in this program's column block."""
    row = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (row[:, None] < rows) & (col[None, :] < channels)
    return row[:, None] * stride + col[None, :], row, col, mask


@triton.jit
def _channel_values(P, col, channels, PER_CHANNEL: tl.constexpr):
    """A parameter's value for each column: its own entry, or the scalar broadcast."""
    if PER_CHANNEL:
        return tl.load(P + col, mask=col < channels, other=1.0).to(tl.float32)[None, :]
    return tl.load(P).to(tl.float32)


@triton.jit
def _tanh(z):
    # (1 - e) / (1 + e) with e = exp(-2|z|) <= 1: saturates to +-1 and never overflows
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z >= 0, t, -t)


@triton.jit
def _store_output(Y, W, B, response, offsets, col, mask, channels, HAS_BIAS: tl.constexpr):
    """weight * response (+ bias), stored in Y's dtype."""
    y = tl.load(W + col, mask=col < channels, other=0.0).to(tl.float32)[None, :] * response
    if HAS_BIAS:
        y += tl.load(B + col, mask=col < channels, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _forward_kernel(X, Y, P, W, B, rows, channels, stride, IS_DYT: tl.constexpr, PER_CHANNEL: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    offsets, _, col, mask = _tile(tl.program_id(0), rows, channels, stride, BLOCK_ROWS, BLOCK_C)
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    p = _channel_values(P, col, channels, PER_CHANNEL)
    if IS_DYT:
        response = _tanh(p * x)  # p = alpha
    else:
        response = x / tl.sqrt(p + x * x)  # p = kappa
    _store_output(Y, W, B, response, offsets, col, mask, channels, HAS_BIAS)


@triton.jit
def _anchored_forward_kernel(X, Y, P, W, B, rows, channels, stride, A, OWN, CPL, anchor_count,
                             PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_A: tl.constexpr):
    """Anchored DyISRU (modeling_dynorm.dyisru, with the vectors of an AnchorCoupling): each tile loads its rows'
    few anchor entries for the coupled term, so the whole function is still one pass over x."""
    offsets, row, col, mask = _tile(tl.program_id(0), rows, channels, stride, BLOCK_ROWS, BLOCK_C)
    slot = tl.arange(0, BLOCK_A)
    anchors = tl.load(A + slot, mask=slot < anchor_count, other=-1)
    anchor_mask = (row[:, None] < rows) & (anchors[None, :] >= 0)
    x_anchors = tl.load(X + row[:, None] * stride + anchors[None, :], mask=anchor_mask, other=0.0).to(tl.float32)
    coupled = tl.load(CPL).to(tl.float32) * tl.sum(x_anchors * x_anchors, 1)
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    own_square = tl.load(OWN + col, mask=col < channels, other=1.0).to(tl.float32)[None, :]
    denominator = _channel_values(P, col, channels, PER_CHANNEL) + coupled[:, None] + x * x * own_square
    _store_output(Y, W, B, x / tl.sqrt(denominator), offsets, col, mask, channels, HAS_BIAS)


@triton.jit
def _backward_kernel(X, G, DX, P, W, DP, DW, DB, rows, channels, stride, tiles_per_program, IS_DYT: tl.constexpr,
                     PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    """Each program walks `tiles_per_program` tiles down its column block, summing the parameter gradients over
    their rows in registers, and writes one row of partial sums: the partials' traffic is 1/tiles_per_program of
    a one-tile-per-program kernel's (see `_backward_tiles`)."""
    col = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_row = col < channels
    p = _channel_values(P, col, channels, PER_CHANNEL)
    w = tl.load(W + col, mask=in_row, other=0.0).to(tl.float32)[None, :]
    dp_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
    dw_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
    db_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
    for tile in range(tiles_per_program):
        offsets, _, _, mask = _tile(tl.program_id(0) * tiles_per_program + tile, rows, channels, stride,
                                    BLOCK_ROWS, BLOCK_C)
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
        gw = g * w
        if IS_DYT:
            t = _tanh(p * x)
            slope = 1.0 - t * t
            dx = gw * p * slope
            dp = gw * x * slope
            response = t
        else:
            r = 1.0 / tl.sqrt(p + x * x)
            r3 = r * r * r
            dx = gw * p * r3  # d/dx x / sqrt(kappa + x^2) = kappa r^3
            dp = -0.5 * gw * x * r3
            response = x * r
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
        dp_sum += tl.sum(dp, 0)
        dw_sum += tl.sum(g * response, 0)
        if HAS_BIAS:
            db_sum += tl.sum(g, 0)
    partial = tl.program_id(0) * channels + col
    tl.store(DP + partial, dp_sum, mask=in_row)
    tl.store(DW + partial, dw_sum, mask=in_row)
    if HAS_BIAS:
        tl.store(DB + partial, db_sum, mask=in_row)


def _launch_grid(rows: int, channels: int, tiles_per_program: int = 1) -> tuple[int, int]:
    return triton.cdiv(rows, BLOCK_ROWS * tiles_per_program), triton.cdiv(channels, BLOCK_C)


def _backward_tiles(rows: int) -> int:
    """Row tiles per backward program: up to BACKWARD_TILES. With one tile per program, the (rows / 16, C) fp32
    partial sums of the three parameter gradients, written and read back by `sum`, would add 25% to the traffic of
    a bf16 backward (x and the gradient in, dx out: 6 bytes per element against 2 x 3 x 4 / 16); with 8, 3%."""
    return min(BACKWARD_TILES, triton.cdiv(rows, BLOCK_ROWS))


def _launch_forward(kernel, x, parameter, weight, bias, *extra, **meta):
    """A forward kernel over x seen as a (rows, C) matrix: y in x's shape, and the contiguous (rows, C) x and
    parameters that backward reads. `extra` follows the shared arguments; `meta` adds constexprs."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty_like(x2)
    parameter, weight = parameter.contiguous(), weight.contiguous()
    kernel[_launch_grid(*x2.shape)](
        x2, y, parameter, weight, bias if bias is not None else weight, *x2.shape, x2.stride(0), *extra,
        PER_CHANNEL=parameter.numel() > 1, HAS_BIAS=bias is not None, BLOCK_ROWS=BLOCK_ROWS, BLOCK_C=BLOCK_C,
        **meta)
    return y.view(x.shape), parameter, weight


def _forward(ctx, x, parameter, weight, bias, is_dyt: bool):
    y, parameter, weight = _launch_forward(_forward_kernel, x, parameter, weight, bias, IS_DYT=is_dyt)
    ctx.save_for_backward(x, parameter, weight)  # x itself: a double backward differentiates through it
    ctx.has_bias = bias is not None
    return y


def _backward(ctx, grad, is_dyt: bool):
    if torch.is_grad_enabled():
        return recorded_backward(ctx, grad, dyt if is_dyt else dyisru)
    x, parameter, weight = ctx.saved_tensors
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    g2 = grad.reshape(x2.shape).contiguous()
    rows, channels = x2.shape
    tiles = _backward_tiles(rows)
    grid = _launch_grid(rows, channels, tiles)
    dx = torch.empty_like(x2)
    partials = torch.empty(3, grid[0], channels, device=x2.device, dtype=torch.float32)
    _backward_kernel[grid](
        x2, g2, dx, parameter, weight, partials[0], partials[1], partials[2], rows, channels, x2.stride(0), tiles,
        IS_DYT=is_dyt, PER_CHANNEL=parameter.numel() > 1, HAS_BIAS=ctx.has_bias,
        BLOCK_ROWS=BLOCK_ROWS, BLOCK_C=BLOCK_C)
    sums = partials.sum(1)
    grad_parameter = sums[0] if parameter.numel() > 1 else sums[0].sum().reshape(parameter.shape)
    grad_bias = sums[2].to(weight.dtype) if ctx.has_bias else None
    return dx.view(x.shape), grad_parameter.to(parameter.dtype), sums[1].to(weight.dtype), grad_bias


def _autograd_function(name: str, is_dyt: bool, doc: str) -> type:
    """An autograd Function over the kernels, with the signature of the matching modeling_dynorm.Fused* one."""

    def values(x, parameter, weight, bias):
        return _launch_forward(_forward_kernel, x, parameter, weight, bias, IS_DYT=is_dyt)[0]

    def forward(ctx, x, parameter, weight, bias):
        return _forward(ctx, x, parameter, weight, bias, is_dyt)

    def backward(ctx, grad):
        return _backward(ctx, grad, is_dyt)

    members = {"__doc__": doc, "__module__": __name__, "values": staticmethod(values), "forward": staticmethod(forward),
               "backward": staticmethod(backward)}
    return type(name, (torch.autograd.Function,), members)


def _anchored_values(x, kappa, weight, bias, anchors):
    """Anchored DyISRU's forward values (modeling_dynorm.FusedDyISRU.values with an AnchorCoupling) in one
    kernel."""
    channels = anchors.channels.contiguous()
    return _launch_forward(_anchored_forward_kernel, x, kappa, weight, bias, channels, anchors.own_square,
                           anchors.coupled, channels.numel(), BLOCK_A=triton.next_power_of_2(channels.numel()))[0]


TritonDyISRU = _autograd_function("TritonDyISRU", False, "weight * x / sqrt(kappa + x^2) + bias")
TritonDyT = _autograd_function("TritonDyT", True, "weight * tanh(alpha * x) + bias")


class TritonAnchoredDyISRU(FusedDyISRU):
    """Anchored DyISRU whose forward values (inference: nothing needs a gradient) run one kernel where the PyTorch
    path launches seven; with autograd it is FusedDyISRU (the coupled gradient stays in PyTorch)."""

    values = staticmethod(_anchored_values)


FUNCTIONS = {"dyisru": TritonDyISRU, "dyt": TritonDyT, "dyisru_anchored": TritonAnchoredDyISRU}
