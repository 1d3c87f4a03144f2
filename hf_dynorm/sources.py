"""Where models and text come from: Hub ids, local paths and Hub datasets as usual, plus the embedded assets
(`assets`) by name."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .assets import (
    EMBEDDED_MODEL,
    EMBEDDED_TEXT,
    NEWS_TEXT,
    TEST_FRACTION,
    check_wiki_sample,
    embedded_model_dir,
    news_articles,
    wiki_articles,
)


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """An embedded name becomes its cached folder; Hub ids and existing local paths pass through."""
    name = str(name_or_path)
    if name == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"model folder {name} does not exist; give an existing folder, a Hub id, or "
                                f"{EMBEDDED_MODEL!r}.")
    return str(Path(name).expanduser()) if name.startswith("~") else name


def load_model(name_or_path: str | os.PathLike, *, auto_class=None, dtype=torch.float32, **kwargs):
    """Load a model (converted or not) by Hub id, local folder or embedded name.

    Converted checkpoints of any architecture load here without trust_remote_code: the dynorm classes of their
    base architecture are registered first.
    """
    from transformers import AutoModelForCausalLM, PretrainedConfig

    from .registry import DYNORM_PREFIX, register_architecture

    path = resolve_model(name_or_path)
    config, _ = PretrainedConfig.get_config_dict(path, **{k: v for k, v in kwargs.items() if k in ("revision",
                                                                                                   "token")})
    model_type = config.get("model_type", "")
    if model_type.startswith(DYNORM_PREFIX):
        register_architecture(model_type[len(DYNORM_PREFIX):])
    model = (auto_class or AutoModelForCausalLM).from_pretrained(path, dtype=dtype, **kwargs)
    if str(name_or_path) == EMBEDDED_MODEL:
        model.config._name_or_path = EMBEDDED_MODEL  # so records and cards name it, not its cache folder
    return model


def load_tokenizer(name_or_path: str | os.PathLike, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name_or_path), **kwargs)


def check_text_source(source: str, splits: tuple[str, ...] = ()) -> None:
    """Fail early, before any model loads, on an embedded text whose package is missing or whose `splits` it does
    not have, or a local file that is not there; Hub datasets are left to `datasets`."""
    if source in (EMBEDDED_TEXT, NEWS_TEXT):
        check_wiki_sample() if source == EMBEDDED_TEXT else news_articles()
        for split in splits:
            _embedded_split(source, split)
    elif Path(source).suffix in (".txt", ".jsonl", ".json", ".csv", ".parquet") and not Path(source).exists():
        raise FileNotFoundError(f"data file {source} does not exist")


def _embedded_split(source: str, split: str) -> tuple[str, str | None, str | None]:
    name, start, stop = parse_split(split)
    if name not in ("train", "test", "all"):
        raise ValueError(f"{source} has the splits train, test and all (sliceable: train[:50]), not {name!r}")
    return name, start, stop


_SPLIT = re.compile(r"^(?P<name>[\w.-]+)(?:\[(?P<start>-?\d*%?):(?P<stop>-?\d*%?)\])?$")


def parse_split(split: str) -> tuple[str, str | None, str | None]:
    """(name, start, stop) of a datasets-style split spec such as ``train``, ``train[:5000]`` or ``test[-10%:]``."""
    match = _SPLIT.match(split)
    if not match:
        raise ValueError(f"split {split!r} is not a split spec: give a name, optionally sliced like train[:5000], "
                         "train[-200:] or train[:10%]")
    return match["name"], match["start"] or None, match["stop"] or None


def _sliced(items: list, start: str | None, stop: str | None) -> list:
    """items[start:stop] where each bound is a count or a percentage of len(items), as datasets' split slicing."""
    def bound(spec):
        if spec is None:
            return None
        return round(float(spec[:-1]) / 100 * len(items)) if spec.endswith("%") else int(spec)

    return items[bound(start):bound(stop)]


def load_texts(source: str | os.PathLike, split: str = "test") -> list[str]:
    """Documents from `source`: ``wiki-sample`` or ``news-sample`` (split train/test/all by whole articles, the last
    10% the test split; sliced as datasets slices: ``train[:50]``), a local .txt (one document), .jsonl, .json, .csv
    or .parquet (a ``text`` column), or a Hub dataset ``name`` or ``name:config`` (its `split`)."""
    source = str(source)
    if source in (EMBEDDED_TEXT, NEWS_TEXT):
        name, start, stop = _embedded_split(source, split)
        articles = wiki_articles() if source == EMBEDDED_TEXT else news_articles()
        cut = len(articles) - max(1, round(TEST_FRACTION * len(articles)))
        return _sliced({"train": articles[:cut], "test": articles[cut:], "all": articles}[name], start, stop)
    path = Path(source)
    if path.suffix == ".txt":
        if not path.exists():
            raise FileNotFoundError(f"text file {source} does not exist")
        return [path.read_text(encoding="utf-8")]
    import datasets

    if path.suffix in (".jsonl", ".json", ".csv", ".parquet"):
        if not path.exists():
            raise FileNotFoundError(f"data file {source} does not exist")
        builder = {".jsonl": "json"}.get(path.suffix, path.suffix[1:])
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    else:
        name, _, config = source.partition(":")
        dataset = datasets.load_dataset(name, config or None, split=split)
    if "text" not in dataset.column_names:
        raise ValueError(f"{source} has no 'text' column (columns: {dataset.column_names}); rename the column "
                         "holding the documents to 'text'.")
    return [text for text in dataset["text"] if text and text.strip()]
