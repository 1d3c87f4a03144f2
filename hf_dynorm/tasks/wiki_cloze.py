"""The wiki-cloze task's documents (wiki_cloze.yaml): each is a held-out sentence of the embedded Wikipedia sample's
test split whose last word is the target, with the sentence before it as context (LAMBADA-style)."""

from __future__ import annotations

import re

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
TARGET = re.compile(r"^(?P<context>.*\S)\s+(?P<target>[A-Za-z]{3,})\.$")


def cloze_items(articles: list[str], min_words: int = 8, max_words: int = 60) -> list[dict]:
    """Every sentence of 8 to 60 words that ends in a plain word and a full stop: the word is the target, the
    sentence before it (within the paragraph) and the rest of the sentence the context."""
    items = []
    for article in articles:
        for paragraph in article.split("\n"):
            previous = ""
            for sentence in SENTENCE_END.split(paragraph.strip()):
                match = TARGET.match(sentence)
                if match and min_words <= len(sentence.split()) <= max_words:
                    context = f"{previous} {match['context']}".strip()
                    items.append({"context": context, "target": match["target"]})
                previous = sentence
    return items


def documents(**kwargs):
    """lm-evaluation-harness's custom_dataset: {"test": the items} as a datasets.Dataset."""
    import datasets

    from hf_dynorm.sources import load_texts

    return {"test": datasets.Dataset.from_list(cloze_items(load_texts("wiki-sample", "test")))}
