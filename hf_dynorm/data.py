"""Text to token windows: the one tokenization path that calibration, evaluation and distillation share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .sources import load_texts


@dataclass(frozen=True)
class Window:
    """A slice [start, end) of the token stream whose tokens from `scored_from` on are prediction targets."""

    start: int
    end: int
    scored_from: int


SEPARATOR = "\n\n"  # between documents, as HF's strided-perplexity guide joins them


def tokenize(texts: Sequence[str], tokenizer) -> torch.Tensor:
    """One stream of token ids: the documents, stripped, joined by blank lines.

    Tokenized a document at a time (a fast tokenizer runs a batch of them in parallel, where one joined string runs
    on one thread) and joined with the separator's own tokens: the same ids as tokenizing the joined string, which
    is checked on the first documents; a tokenizer that merges across the separator gets the joined string.
    """
    if tokenizer is None:
        raise ValueError("text needs a tokenizer: pass tokenizer= (the model's own: hf_dynorm.load_tokenizer(MODEL)), "
                         "or give token ids")
    texts = [text.strip() for text in texts if text and text.strip()]
    if not texts:
        raise ValueError("the text is empty: give a source with at least one non-blank document.")
    pieces = _separator_pieces(tokenizer)
    if pieces is not None:
        documents = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        probe = min(len(texts), 3)
        if _assemble(pieces, documents[:probe]) == _joined(texts[:probe], tokenizer):
            return torch.tensor(_assemble(pieces, documents), dtype=torch.long)
    return torch.tensor(_joined(texts, tokenizer), dtype=torch.long)


def _assemble(pieces: tuple[list[int], list[int], list[int]], documents: list[list[int]]) -> list[int]:
    prefix, separator, suffix = pieces
    ids = list(prefix)
    for i, document in enumerate(documents):
        ids.extend(separator if i else ())
        ids.extend(document)
    return ids + suffix


def _joined(texts: Sequence[str], tokenizer) -> list[int]:
    return tokenizer(SEPARATOR.join(texts), return_attention_mask=False)["input_ids"]


def _separator_pieces(tokenizer) -> tuple[list[int], list[int], list[int]] | None:
    """(special tokens before a text, the separator's tokens between two texts, special tokens after), read off
    "a" + SEPARATOR + "b"; None where that string does not split that way."""
    a, b = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("a", "b"))
    alone, both = tokenizer("a")["input_ids"], _joined(["a", "b"], tokenizer)
    starts = [i for i in range(len(alone) - len(a) + 1) if alone[i:i + len(a)] == a]
    if not starts:
        return None
    prefix, suffix = alone[:starts[0]], alone[starts[0] + len(a):]
    middle = both[len(prefix) + len(a):len(both) - len(suffix) - len(b)]
    if both != [*prefix, *a, *middle, *b, *suffix]:
        return None
    return prefix, middle, suffix


def token_stream(source, tokenizer, split: str = "test", max_tokens: int | None = None,
                 cache: bool = False) -> torch.Tensor:
    """Token ids from a text source (see `sources.load_texts`), a list of strings, or ids already. `cache`: keep the
    ids of a named source in hf_dynorm's cache folder and read them from there next time (distillation tokenizes on
    its main process first; the other processes then read the file)."""
    if tokenizer is None and not isinstance(source, torch.Tensor):  # before any text is read
        raise ValueError("text needs a tokenizer: pass tokenizer= (the model's own: hf_dynorm.load_tokenizer(MODEL)), "
                         "or give token ids")
    if isinstance(source, torch.Tensor):
        ids = source.flatten().long()
    elif isinstance(source, (list, tuple)):
        ids = tokenize(source, tokenizer)
    elif cache:
        ids = _cached_stream(str(source), tokenizer, split)
    else:
        ids = tokenize(load_texts(source, split), tokenizer)
    return ids[:max_tokens] if max_tokens else ids


def _cached_stream(source: str, tokenizer, split: str) -> torch.Tensor:
    """`tokenize(load_texts(source, split))`, stored as int32 under a key of everything that decides the ids: the
    source (and a local file's size and time), the split, and the tokenizer's full definition."""
    import hashlib
    import json
    import os
    from pathlib import Path

    from . import __version__
    from .assets import cache_dir

    if tokenizer is None:
        raise ValueError("text needs a tokenizer: pass tokenizer= (the model's own: hf_dynorm.load_tokenizer(MODEL))")
    path = Path(source)
    stat = path.stat() if path.is_file() else None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    key = json.dumps({"source": source, "split": split, "file": stat and [stat.st_size, stat.st_mtime_ns],
                      "tokenizer": backend.to_str() if backend is not None else repr(tokenizer),
                      "special": tokenizer("a")["input_ids"], "separator": SEPARATOR, "version": __version__})
    target = cache_dir() / "tokens" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"
    if target.exists():
        return torch.load(target).long()
    ids = tokenize(load_texts(source, split), tokenizer)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    torch.save(ids.to(torch.int32 if int(ids.max()) < 2 ** 31 else torch.long), tmp)
    os.replace(tmp, target)
    return ids


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
