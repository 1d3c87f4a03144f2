"""Perplexity the standard way (HF's strided sliding windows), with the distribution a mean hides.

A converted model can look fine on average and blow up on a few inputs (REFERENCE section 4), so every result
carries per-window and per-token NLL percentiles and the worst windows with their text.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import Window, check_vocabulary, strided_windows, token_stream

PERCENTILES = (50, 90, 99, 99.9, 100)


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens: int
    windows: int
    window: int
    stride: int
    seconds: float
    tokens_per_second: float
    window_nll: list[float]
    token_nll_percentiles: dict[str, float]
    window_nll_percentiles: dict[str, float]
    worst_windows: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _percentiles(values: torch.Tensor) -> dict[str, float]:
    quantiles = torch.quantile(values.double(), torch.tensor([p / 100 for p in PERCENTILES], dtype=torch.float64))
    return {f"p{p:g}": float(q) for p, q in zip(PERCENTILES, quantiles)}


def _check_window(model, ids: torch.Tensor, window: int) -> None:
    inner = getattr(model, "module", model)  # a DDP-wrapped model keeps its config on .module
    context = getattr(inner.config, "max_position_embeddings", None)
    if context and window > context:
        raise ValueError(f"window {window} is longer than the model's context of {context} tokens: use --window "
                         f"{context} or less.")
    check_vocabulary(ids, inner)


@torch.no_grad()
def score_windows(model, ids: torch.Tensor, windows: list[Window], batch_size: int = 4,
                  progress: bool = False) -> list[torch.Tensor]:
    """The NLL of each window's scored tokens (from `scored_from` on), one forward per batch of equal lengths."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll = []
    bar = tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress)
    for first in range(0, len(windows), batch_size):
        batch = windows[first:first + batch_size]
        for group in _same_length(batch):
            inputs = torch.stack([ids[w.start:w.end] for w in group]).to(device)
            logits = model(input_ids=inputs).logits.float()
            # targets shifted left, the last position ignored: no copy of the (batch, length, vocab) logits
            targets = F.pad(inputs[:, 1:], (0, 1), value=-100)
            losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
            losses = losses.view(len(group), -1)[:, :-1].cpu()
            nll.extend(loss[w.scored_from - w.start - 1:] for loss, w in zip(losses, group))
        bar.update(len(batch))
    bar.close()
    model.train(was_training)
    return nll


def _same_length(windows: list) -> list[list]:
    groups = []
    for w in windows:
        if groups and groups[-1][0].end - groups[-1][0].start == w.end - w.start:
            groups[-1].append(w)
        else:
            groups.append([w])
    return groups


def summarise(nll: list[torch.Tensor], windows: list[Window], ids: torch.Tensor, *, window: int, stride: int | None,
              seconds: float, tokenizer=None, worst: int = 3) -> PerplexityResult:
    """The perplexity and its distribution from every window's token NLLs."""
    flat = torch.cat(nll).double()
    window_means = torch.stack([w.double().mean() for w in nll])
    mean = float(flat.mean())
    order = torch.argsort(window_means, descending=True)[:worst].tolist()
    worst_windows = [{"index": i, "start_token": windows[i].start, "mean_nll": float(window_means[i]),
                      "text": tokenizer.decode(ids[windows[i].start:windows[i].end]) if tokenizer else None}
                     for i in order]
    return PerplexityResult(
        perplexity=math.exp(mean) if mean < 700 else math.inf, mean_nll=mean, tokens=flat.numel(),
        windows=len(windows), window=window, stride=stride or window, seconds=seconds,
        tokens_per_second=sum(w.end - w.start for w in windows) / max(seconds, 1e-9),
        window_nll=window_means.tolist(), token_nll_percentiles=_percentiles(flat),
        window_nll_percentiles=_percentiles(window_means), worst_windows=worst_windows)


def perplexity(model, source="wiki-sample", *, tokenizer=None, split: str = "test", window: int = 512,
               stride: int | None = None, batch_size: int = 4, max_tokens: int | None = None, worst: int = 3,
               progress: bool = True) -> PerplexityResult:
    """Perplexity of `model` on `source` (a text source name or path, a list of strings, or token ids)."""
    ids = source if isinstance(source, torch.Tensor) else token_stream(source, tokenizer, split, max_tokens)
    windows = strided_windows(ids.numel(), window, stride)
    _check_window(model, ids, window)
    started = time.perf_counter()
    nll = score_windows(model, ids, windows, batch_size, progress)
    return summarise(nll, windows, ids, window=window, stride=stride, seconds=time.perf_counter() - started,
                     tokenizer=tokenizer, worst=worst)


def sharded_perplexity(model, ids: torch.Tensor, *, window: int, rank: int, world_size: int, gather,
                       tokenizer=None) -> PerplexityResult:
    """`perplexity` with the windows shared out among `world_size` processes (this one is `rank`), the same result on
    every process. `gather(obj)` returns every process's `obj` in rank order (a collective).

    Every process runs the same number of forwards, one window each, padding with a repeat of the first window
    whose result is dropped: under FSDP each forward is a collective (its shards are gathered), so a process with one
    forward fewer would leave the others waiting for ever."""
    windows = strided_windows(ids.numel(), window)
    _check_window(model, ids, window)
    mine = list(range(rank, len(windows), world_size))
    turns = math.ceil(len(windows) / world_size)
    started = time.perf_counter()
    scored = [(index, score_windows(model, ids, [windows[index]], 1)[0]) for index in mine]
    for _ in range(turns - len(mine)):
        score_windows(model, ids, windows[:1], 1)
    everyone = dict(pair for part in gather(scored) for pair in part)
    nll = [everyone[index] for index in range(len(windows))]
    return summarise(nll, windows, ids, window=window, stride=None, seconds=time.perf_counter() - started,
                     tokenizer=tokenizer)


def compare(model, reference, source="wiki-sample", *, tokenizer=None, split: str = "test", **options) -> dict:
    """Perplexity of `model` and of `reference` on the very same tokens, and their ratio."""
    ids = source if isinstance(source, torch.Tensor) else token_stream(source, tokenizer, split,
                                                                       options.pop("max_tokens", None))
    converted = perplexity(model, ids, tokenizer=tokenizer, **options)
    original = perplexity(reference, ids, tokenizer=tokenizer, **options)
    return {"model": converted.to_dict(), "reference": original.to_dict(),
            "perplexity_ratio": math.exp(converted.mean_nll - original.mean_nll)
            if converted.mean_nll - original.mean_nll < 700 else math.inf}
