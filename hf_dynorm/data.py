"""Text to token windows: the one tokenization path that calibration, evaluation and distillation share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .assets import load_texts


@dataclass(frozen=True)
class Window:
    """A slice [start, end) of the token stream whose tokens from `scored_from` on are prediction targets."""

    start: int
    end: int
    scored_from: int


def tokenize(texts: Sequence[str], tokenizer) -> torch.Tensor:
    """One stream of token ids: documents joined by blank lines (as HF's strided-perplexity guide does)."""
    texts = [text for text in texts if text and text.strip()]
    if not texts:
        raise ValueError("the text is empty: give a source with at least one non-blank document.")
    return torch.tensor(tokenizer("\n\n".join(texts), return_attention_mask=False)["input_ids"], dtype=torch.long)


def token_stream(source, tokenizer, split: str = "test", max_tokens: int | None = None) -> torch.Tensor:
    """Token ids from a text source (see `assets.load_texts`), a list of strings, or ids already."""
    if isinstance(source, torch.Tensor):
        ids = source.flatten().long()
    elif isinstance(source, (list, tuple)):
        ids = tokenize(source, tokenizer)
    else:
        ids = tokenize(load_texts(source, split), tokenizer)
    return ids[:max_tokens] if max_tokens else ids


def strided_windows(n_tokens: int, length: int, stride: int | None = None) -> list[Window]:
    """Sliding windows that score every token after the first exactly once (HF's strided perplexity)."""
    stride = stride or length
    if not 0 < stride <= length:
        raise ValueError(f"stride must be in (0, window length {length}], got {stride}")
    if n_tokens < length:
        raise ValueError(f"the text has {n_tokens} tokens, fewer than one window of {length}: give more text or a "
                         f"shorter window.")
    windows, scored_until = [], 1
    for start in range(0, n_tokens - 1, stride):
        end = min(start + length, n_tokens)
        windows.append(Window(start, end, max(scored_until, start + 1)))
        scored_until = end
        if end == n_tokens:
            break
    return windows


def check_vocabulary(ids: torch.Tensor, model) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    if ids.numel() and int(ids.max()) >= vocab:
        raise ValueError(f"token id {int(ids.max())} is outside the model's vocabulary of {vocab}: the tokenizer does "
                         "not belong to this model. Pass the model's own tokenizer.")


def full_windows(ids: torch.Tensor, length: int, count: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of exactly `length` tokens, shape (n, length): for calibration and training."""
    n = ids.numel() // length
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {length}: give more text or a "
                         f"shorter window.")
    return ids[: n * length].view(n, length)[:count]
