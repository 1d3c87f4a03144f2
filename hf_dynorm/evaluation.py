"""Perplexity the standard way (HF's strided sliding windows), with the distribution a mean hides.

A converted model can look fine on average and blow up on a few inputs (README, "Why runs blow up, measured"), so
every result carries per-window and per-token NLL percentiles and the worst windows with their text.
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


def exp_nll(nll: float) -> float:
    """exp of a mean NLL (or of a difference of two: a perplexity ratio), inf where it would overflow a float."""
    return math.exp(nll) if nll < 700 else math.inf


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
        perplexity=exp_nll(mean), mean_nll=mean, tokens=flat.numel(),
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
            "perplexity_ratio": exp_nll(converted.mean_nll - original.mean_nll)}


@torch.no_grad()
def agreement(model, reference, source, *, tokenizer=None, split: str = "test", window: int = 512,
              max_tokens: int | None = None, prompts: int = 8, prompt_tokens: int = 32,
              new_tokens: int = 32) -> dict:
    """How often `model` does what `reference` does on the same held-out tokens (a model against its own copy: 1, 0, 1):

    - `top1`: the share of scored positions whose most likely next token is the same;
    - `kl`: the mean KL(reference || model) of the next-token distributions, in nats per token;
    - `worst_window_kl`: the largest of the windows' own mean KL: a model that misfires on a rare word (README,
      "Pure element-wise models") loses the rest of that window, 20-30 nats per token, where healthy windows stay
      near the mean;
    - `greedy`: the share of greedy continuation tokens equal to the reference's, position by position, over
      `prompts` prompts of `prompt_tokens` tokens spread evenly through the text, `new_tokens` tokens each.
    """
    ids = source if isinstance(source, torch.Tensor) else token_stream(source, tokenizer, split, max_tokens)
    ids = ids[:max_tokens] if max_tokens else ids
    windows = strided_windows(ids.numel(), window)
    _check_window(model, ids, window)
    device = next(model.parameters()).device
    same = positions = 0
    divergence = worst = 0.0
    for w in windows:
        inputs = ids[w.start:w.end][None].to(device)
        scored = slice(w.scored_from - w.start - 1, -1)
        ours = model(input_ids=inputs).logits[0, scored].float().log_softmax(-1)
        theirs = reference(input_ids=inputs.to(next(reference.parameters()).device)).logits[0, scored].float()
        theirs = theirs.log_softmax(-1).to(ours.device)
        same += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        positions += ours.shape[0]
        window_kl = float((theirs.exp() * (theirs - ours)).sum())
        divergence += window_kl
        worst = max(worst, window_kl / ours.shape[0])
    equal = generated = 0
    if prompts:  # one batch: the prompts are the same length, so nothing is padded
        starts = torch.linspace(0, ids.numel() - prompt_tokens, prompts).long().tolist()
        batch = torch.stack([ids[start:start + prompt_tokens] for start in starts])
        ours, theirs = _greedy(model, batch, new_tokens), _greedy(reference, batch, new_tokens)
        equal, generated = int((ours == theirs).sum()), ours.numel()
    return {"top1": same / positions, "kl": divergence / positions, "worst_window_kl": worst,
            "greedy": equal / generated if generated else None, "positions": positions, "greedy_tokens": generated}


def _greedy(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """`new_tokens` greedy tokens after each of the equally long `prompts` (no end-of-sequence stop: both models
    continue the same length)."""
    device = next(model.parameters()).device
    output = model.generate(prompts.to(device), attention_mask=torch.ones_like(prompts, device=device),
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=0)
    return output[:, prompts.shape[1]:].cpu()


def chat_prompts() -> list[str]:
    """The fixed prompts `hf-dynorm eval` asks a chat model (shipped: hf_dynorm/tasks/chat_prompts.json)."""
    import importlib.resources
    import json

    return json.loads(importlib.resources.files("hf_dynorm.tasks").joinpath("chat_prompts.json").read_text())


@torch.no_grad()
def chat_answers(model, tokenizer, prompts: list[str], new_tokens: int = 48) -> list[str]:
    """Each prompt as a user turn through the tokenizer's chat template, answered greedily."""
    device = next(model.parameters()).device
    answers = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"].to(device)
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        answers.append(tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers
