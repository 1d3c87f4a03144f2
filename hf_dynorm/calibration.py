"""Closed-form DyT/DyISRU parameters from what actually flows into each norm (arXiv 2503.21708; README, "The math
in a few lines").

For a norm over C channels whose input has per-token mean square s^2, DyISRU's kappa ~ C s^2 and DyT's
alpha ~ 1 / (sqrt(C) s) = 1 / sqrt(kappa). Massive activations (attention sinks; Sun et al. 2024, arXiv
2402.17762) break the single-kappa picture: their tokens are detected and kept out of the estimate, and anchored
DyISRU keeps the few channels carrying them coupled, with kappa estimated from the remaining channels.

One pass of the original model with forward pre-hooks feeds bounded streaming statistics per site: the exact
per-channel max |x| (it picks the anchors), and uniform reservoirs of per-token mean squares (with positions) and
of whole activation rows (for the estimators and the `fit`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from .architectures import LAYER, NormSite, find_norm_sites, observing_norm_inputs
from .data import check_vocabulary, full_windows, token_stream
from .modeling_dynorm import dyisru, dyt

ESTIMATORS = ("median", "mean", "geomean", "fit")
DEFAULT_ESTIMATOR = "median"
KAPPA_FROM = ("all", "bulk")
# per channel, the largest |x| kept over positions >= 1: the 99.9th percentile is exact up to 64k such tokens
CHANNEL_TOP = 64
RANGE_QUANTILE = 0.999


class Reservoir:
    """A uniform sample of at most `capacity` rows from a stream (Algorithm R, vectorised per batch)."""

    def __init__(self, capacity: int, generator: torch.Generator):
        self.capacity, self.seen, self.rows, self.generator = capacity, 0, None, generator

    def add(self, rows: torch.Tensor) -> None:
        n = rows.shape[0]
        if self.rows is None:
            self.rows = rows.new_empty((0, *rows.shape[1:]))
        room = max(0, self.capacity - self.rows.shape[0])
        if room:
            self.rows = torch.cat([self.rows, rows[:room]])
        if n > room:
            index = torch.arange(self.seen + room, self.seen + n, dtype=torch.float64) + 1
            slots = (torch.rand(n - room, generator=self.generator, dtype=torch.float64) * index).long()
            drawn = (slots < self.capacity).nonzero().squeeze(1)
            # Algorithm R replaces in stream order, so where a slot is drawn twice the later row wins; an indexed
            # assignment with repeated indices leaves the winner unspecified (and seeds would not reproduce)
            last = torch.full((self.capacity,), -1).scatter_reduce_(0, slots[drawn], drawn, "amax")
            winners = last[last >= 0]
            self.rows[slots[winners]] = rows[room:][winners]
        self.seen += n


class SiteStatistics:
    """Streaming statistics of one norm site's input; memory is bounded whatever the token count."""

    def __init__(self, site: NormSite, rows: int, tokens: int, generator: torch.Generator):
        self.site = site
        self.count = 0
        self.channel_absmax = torch.zeros(site.channels)
        self.token_stats = Reservoir(tokens, generator)  # columns: mean square (centred for LayerNorm), position
        self.rows = Reservoir(rows, generator)
        self.channel_top = torch.zeros(0, site.channels)  # the CHANNEL_TOP largest |x| per channel, positions >= 1
        self.tail_count = 0  # tokens at positions >= 1

    def update(self, x: torch.Tensor) -> None:
        """`x`: the norm's input, (batch, sequence, ..., channels)."""
        positions = torch.arange(x.shape[1], dtype=torch.float32).view(1, -1, *([1] * (x.dim() - 3)))
        positions = positions.expand(x.shape[:-1]).reshape(-1)
        rows = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        self.count += rows.shape[0]
        # max and -min: two reductions, no |x| copy; the hooks run on every site of every batch
        self.channel_absmax = torch.maximum(self.channel_absmax, torch.maximum(rows.amax(0), rows.amin(0).neg_()))
        self.token_stats.add(torch.stack([_mean_square(rows, self.site.flavour), positions], dim=1))
        self.rows.add(rows)
        tail = rows[positions >= 1].abs()
        self.tail_count += tail.shape[0]
        top = torch.cat([self.channel_top, tail])
        self.channel_top = top.topk(min(CHANNEL_TOP, top.shape[0]), dim=0).values


def _mean_square(rows: torch.Tensor, flavour: str) -> torch.Tensor:
    if flavour == LAYER:
        rows = rows - rows.mean(-1, keepdim=True)
    return torch.linalg.vector_norm(rows, dim=-1).square_().div_(rows.shape[-1])  # 2.7x faster than pow + mean


@dataclass
class SiteCalibration:
    """What one site's statistics say, finalised: the sample, the sinks, and the original norm's outputs."""

    site: NormSite
    tokens: int
    median_mean_square: float
    token_mean_squares: torch.Tensor  # reservoir, all tokens
    token_positions: torch.Tensor
    rows: torch.Tensor  # reservoir of input rows, ordinary tokens only
    targets: torch.Tensor  # the original norm's output on `rows`
    gamma: torch.Tensor
    bias: torch.Tensor | None
    channel_absmax: torch.Tensor
    sink_ratio: float
    channel_top: torch.Tensor  # (k, C): the k largest |x| of each channel over positions >= 1, descending
    tail_count: int  # the tokens at positions >= 1 they are the largest of

    def anchors(self, k: int) -> list[int]:
        """The k channels with the largest |x| over all calibration tokens (massive activations live there)."""
        return sorted(torch.topk(self.channel_absmax, min(k, self.site.channels)).indices.tolist()) if k else []

    def bulk_squares(self, anchors: list[int]) -> torch.Tensor:
        """Per ordinary row: sum of squares over the channels not in `anchors` (centred for LayerNorm)."""
        rows = self.rows - self.rows.mean(-1, keepdim=True) if self.site.flavour == LAYER else self.rows
        squares = rows.pow(2)
        if anchors:
            squares[:, anchors] = 0.0
        return squares.sum(-1)

    def kappa(self, estimator: str, excluded: list[int]) -> float:
        """kappa = statistic over ordinary tokens of sum_{j not excluded} x_j^2, plus C * eps (the norm's own eps)."""
        bulk = self.bulk_squares(excluded).double()
        floor = self.site.channels * self.site.eps
        if estimator == "median":
            value = float(bulk.median())
        elif estimator == "mean":
            value = float(bulk.mean())
        elif estimator == "geomean":
            value = float(bulk.clamp_min(1e-30).log().mean().exp())
        else:
            raise ValueError(f"unknown estimator {estimator!r}: choose one of {ESTIMATORS}")
        return value + floor

    def error(self, norm: str, value: float, anchors: list[int]) -> float:
        """Mean squared error of the replacement against the original norm's output on the ordinary rows."""
        return float((self.predict(norm, value, anchors) - self.targets).pow(2).mean())

    def predict(self, norm: str, value: float, anchors: list[int]) -> torch.Tensor:
        parameter = torch.tensor([value])
        if norm == "dyisru":
            return dyisru(self.rows, parameter, self.gamma, self.bias, torch.tensor(anchors, dtype=torch.long))
        return dyt(self.rows, parameter, self.gamma, self.bias)

    def fit(self, norm: str, anchors: list[int]) -> float:
        """Least squares over kappa (or alpha) against the norm's own output on ordinary rows: a log-spaced grid
        around the median estimate, refined once. The median value is a candidate, so the fit never does worse."""
        start = self.parameter(norm, "median", anchors)
        best, best_error = start, self.error(norm, start, anchors)
        for span, points in ((math.log(1e3), 61), (math.log(1e3) / 30, 31)):
            for step in torch.linspace(-span, span, points).tolist():
                candidate = best * math.exp(step)
                error = self.error(norm, candidate, anchors)
                if error < best_error:
                    best, best_error = candidate, error
        return best

    def parameter(self, norm: str, estimator: str, anchors: list[int], kappa_from: str = "all") -> float:
        """kappa (DyISRU) or alpha = 1/sqrt(kappa) (DyT). `kappa_from`: "all" channels (C s^2, the paper's value)
        or the "bulk" channels outside the anchors (the exact decoupling, but it compounds badly: see README)."""
        if estimator == "fit":
            return self.fit(norm, anchors)
        if kappa_from not in KAPPA_FROM:
            raise ValueError(f"kappa_from must be one of {KAPPA_FROM}, got {kappa_from!r}")
        kappa = self.kappa(estimator, anchors if kappa_from == "bulk" else [])
        return kappa if norm == "dyisru" else 1.0 / math.sqrt(kappa)

    def channel_ranges(self, c: float, quantile: float = RANGE_QUANTILE) -> torch.Tensor:
        """a_i = min(c q_i, sqrt(C) s) per channel: where a range-bounded function of channel i saturates. q_i is the
        `quantile` of |x_i| over positions >= 1 (the first position is the attention sink's, which a sink prefix or
        the original norm handles), s the median token rms; sqrt(C) s is the paper's bound."""
        rank = max(1, math.ceil((1 - quantile) * self.tail_count))  # the rank-th largest value, from the top
        q = self.channel_top[min(rank, self.channel_top.shape[0]) - 1]
        s = math.sqrt(self.median_mean_square)
        return (c * q).clamp(min=1e-3 * s, max=math.sqrt(self.site.channels) * s)

    def sink_report(self) -> dict:
        ratio = (self.token_mean_squares / self.median_mean_square).sqrt()
        sinks = ratio > self.sink_ratio
        return {
            "rms_median": math.sqrt(self.median_mean_square),
            "rms_p99": math.sqrt(float(torch.quantile(self.token_mean_squares.double(), 0.99))),
            "max_rms_ratio": float(ratio.max()),
            "sink_fraction": float(sinks.float().mean()),
            "sink_share_at_position_0": float((self.token_positions[sinks] == 0).float().mean()) if sinks.any()
            else None,
        }


class CalibratedParameters(NamedTuple):
    """What a conversion takes from a calibration: kappa or alpha per site (one value, or one per channel), anchor
    channels per site, the summary for the config record, and per-channel weight scales where a range bound sets
    them. Small and picklable: a distributed run calibrates once and broadcasts this."""

    values: dict[str, float | list[float]]
    anchors: dict[str, list[int]]
    summary: dict
    weight_scales: dict[str, list[float]] | None = None


@dataclass
class Calibration:
    """Calibration of every chosen site of one model on one text; turns into parameters for any norm/estimator."""

    sites: dict[str, SiteCalibration]
    tokens: int
    windows: int
    window: int
    data: str
    autocast: str | None = None  # the pass's matmul dtype when it ran under torch.autocast

    def parameters(self, norm: str, estimator: str = DEFAULT_ESTIMATOR, anchors: int = 0,
                   sites: list[NormSite] | None = None, kappa_from: str = "all",
                   range_bound: float | None = None) -> CalibratedParameters:
        """kappa or alpha and the anchors of every site (`sites`, default all) for `norm`, and their summary.

        `range_bound` c: each channel its own range instead (`SiteCalibration.channel_ranges`, a_i): kappa_i = a_i^2
        (alpha_i = 1 / a_i) and weight gamma_i a_i / (sqrt(C) s), so the slope at 0 is RMSNorm's at the median token
        and channel i saturates at a_i, about c times what ordinary tokens give it."""
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}: choose one of {ESTIMATORS}")
        names = [site.name for site in sites] if sites is not None else list(self.sites)
        missing = [name for name in names if name not in self.sites]
        if missing:
            raise ValueError(f"no calibration for sites {missing[:3]}...: calibrate the same model and sites.")
        if range_bound is not None and anchors:
            raise ValueError("a range bound gives every channel its own saturation: it has no anchors (anchors=0).")
        site_anchors = {name: self.sites[name].anchors(anchors) if norm == "dyisru" else [] for name in names}
        scales = None
        if range_bound is None:
            values = {name: self.sites[name].parameter(norm, estimator, site_anchors[name], kappa_from)
                      for name in names}
        else:
            ranges = {name: self.sites[name].channel_ranges(range_bound) for name in names}
            values = {name: (a.square() if norm == "dyisru" else a.reciprocal()).tolist() for name, a in ranges.items()}
            scales = {name: (a / math.sqrt(self.sites[name].site.channels * self.sites[name].median_mean_square))
                      .tolist() for name, a in ranges.items()}
        key = "kappa" if norm == "dyisru" else "alpha"

        def shown(value):  # a per-channel value is summarised by its median
            return float(torch.tensor(value).median()) if isinstance(value, list) else value

        summary = {
            "estimator": estimator, "data": self.data, "tokens": self.tokens, "windows": self.windows,
            "window": self.window, "autocast": self.autocast, "anchors_per_site": anchors if norm == "dyisru" else 0,
            "kappa_from": kappa_from, "range_bound": range_bound,
            "sites": {name: {key if range_bound is None else f"median {key}": shown(values[name]),
                             "s": math.sqrt(self.sites[name].median_mean_square),
                             "anchors": site_anchors[name], **self.sites[name].sink_report()} for name in names},
        }
        return CalibratedParameters(values, site_anchors, summary, scales)

    def local_sensitivity(self, norm: str, estimator: str = DEFAULT_ESTIMATOR, anchors: int = 0) -> list[str]:
        """Site names, least sensitive first, by the replacement's relative error against the norm on the
        calibration rows: a cheap stand-in for the per-site perplexity sweep of `hf-dynorm calibrate`."""
        parameters = self.parameters(norm, estimator, anchors)

        def relative(name):
            site = self.sites[name]
            error = site.error(norm, parameters.values[name], parameters.anchors[name])
            return error / float(site.targets.pow(2).mean())

        return sorted(self.sites, key=relative)


@torch.no_grad()
def calibrate(model, data="wiki-sample", *, tokenizer=None, sites: list[NormSite] | None = None,
              split: str = "train", window: int = 512, max_windows: int = 128, batch_size: int = 4,
              rows: int = 1024, token_capacity: int = 1 << 18, sink_ratio: float = 8.0, seed: int = 0,
              autocast: torch.dtype | None = None, progress: bool = True, label: str | None = None) -> Calibration:
    """Run the (unconverted) model on calibration text and gather each norm site's input statistics.

    `data`: a text source (name, path, Hub dataset), a list of strings, or token ids. `sink_ratio`: tokens whose
    rms exceeds this multiple of the site's median are sinks, kept out of the estimates and reported. `autocast`:
    torch.bfloat16 or torch.float16 runs the pass's matmuls in that dtype (`torch.autocast`; the residual stream
    and the statistics stay fp32): 2.2x faster on this AMX CPU, and SmolLM2's kappas moved by at most 0.4%
    (benchmarks/README.md). `label` names the data in the record when `data` is not a source name.
    """
    if getattr(model.config, "dynorm", None) is not None:
        raise ValueError("calibrate the original model: this one is already converted.")
    if autocast not in (None, torch.bfloat16, torch.float16):  # torch.autocast would only warn and run as is
        raise ValueError(f"autocast must be torch.bfloat16, torch.float16 or None (the model's dtype), got {autocast}.")
    if tokenizer is None and not isinstance(data, torch.Tensor):
        from .sources import load_tokenizer

        tokenizer = load_tokenizer(model.config._name_or_path)
    ids = token_stream(data, tokenizer, split)
    check_vocabulary(ids, model)
    batches = full_windows(ids, window, max_windows)
    sites = sites if sites is not None else find_norm_sites(model)
    generator = torch.Generator().manual_seed(seed)
    stats = {site.name: SiteStatistics(site, rows, token_capacity, generator) for site in sites}
    device = next(model.parameters()).device
    with (observing_norm_inputs(model, {name: s.update for name, s in stats.items()}) as run,
          torch.autocast(device.type, dtype=autocast, enabled=autocast is not None)):
        for first in tqdm(range(0, len(batches), batch_size), desc="calibration", unit="batch",
                          disable=not progress):
            run(input_ids=batches[first:first + batch_size].to(device))
    label = label or (data if isinstance(data, str) else f"{type(data).__name__} of {ids.numel()} tokens")
    return Calibration({name: _finalise(model, s, sink_ratio) for name, s in stats.items()},
                       tokens=batches.numel(), windows=len(batches), window=window, data=label,
                       autocast=None if autocast is None else str(autocast).removeprefix("torch."))


@torch.no_grad()
def _finalise(model, stats: SiteStatistics, sink_ratio: float) -> SiteCalibration:
    site = stats.site
    module = model.get_submodule(site.name)
    token_ms, positions = stats.token_stats.rows.unbind(1)
    median = float(token_ms.median())
    rows = stats.rows.rows
    ordinary = rows[_mean_square(rows, site.flavour) <= sink_ratio ** 2 * median]
    reference = next(module.parameters(), None)
    targets = module(ordinary.to(reference.device, reference.dtype) if reference is not None else ordinary)
    bias = getattr(module, "bias", None)
    return SiteCalibration(
        site=site, tokens=stats.count, median_mean_square=median, token_mean_squares=token_ms,
        token_positions=positions, rows=ordinary, targets=targets.float().cpu(), gamma=site.gamma(module).cpu(),
        bias=None if bias is None else bias.detach().float().cpu(), channel_absmax=stats.channel_absmax,
        sink_ratio=sink_ratio, channel_top=stats.channel_top, tail_count=stats.tail_count)


def calibrate_parameters(model, sites: list[NormSite], calibration, norm: str, *, anchors=None,
                         estimator: str = DEFAULT_ESTIMATOR, kappa_from: str = "all", range_bound: float | None = None,
                         **options) -> CalibratedParameters:
    """For `convert`: accept finished `CalibratedParameters`, a `Calibration`, or data to calibrate on."""
    if isinstance(calibration, CalibratedParameters):
        missing = sorted({site.name for site in sites} - set(calibration.values))
        if missing:
            raise ValueError(f"the calibrated parameters have no value for sites {missing[:3]}: calibrate the same "
                             "model and sites.")
        names = {site.name for site in sites}

        def chosen(values):
            return None if values is None else {n: v for n, v in values.items() if n in names}

        return CalibratedParameters(chosen(calibration.values), chosen(calibration.anchors), calibration.summary,
                                    chosen(calibration.weight_scales))
    if anchors is not None and not isinstance(anchors, int):
        raise ValueError("with calibration, anchors is a count k (the k largest channels per site).")
    if not isinstance(calibration, Calibration):
        calibration = calibrate(model, calibration, sites=sites, **options)
    return calibration.parameters(norm, estimator, anchors or 0, sites, kappa_from, range_bound)
