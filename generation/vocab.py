"""The offline CLIP tokenizer: a small byte-pair vocabulary built deterministically in code.

Every prompt word of aerosynth, the words of the known domain names, the letters, digits and
punctuation are in the vocabulary, so any text tokenizes (unknown words fall back to letters).
The learned tokens ([V1] and one background token per domain) are added tokens: the tokenizer
never splits them.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
#: The vehicle concept token, placed before "cars" (the tokenizer lower-cases text, so it is lower case).
VEHICLE_TOKEN = "[v1]"
#: The aerial-v1 domains; models built without a domain list know these.
DEFAULT_DOMAINS = ("madison_drone", "kit_munich_aerial")

PROMPT_WORDS = (
    "a an the aerial view image images photo of with without cars car vehicle vehicles in at on and "
    "background road roads street parking lot city town rural urban top down drone satellite empty no"
).split()


def background_token(domain: str) -> str:
    """The learned background token of a domain, e.g. ``<bg-kit_munich_aerial>``."""
    return f"<bg-{domain.lower()}>"


def domain_words(domain: str) -> list[str]:
    """The words a domain name is written with in a prompt (``kit_munich_aerial`` -> kit munich aerial)."""
    return [w for w in re.split(r"[_\-\s]+", domain.lower()) if w]


def _add_word(word: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    current = symbols[0]
    for sym in symbols[1:]:
        merged = current + sym
        if merged not in vocab:
            merges.append((current, sym))
            vocab[merged] = len(vocab)
        current = merged


def build_tokenizer(domains: Sequence[str] = DEFAULT_DOMAINS, max_length: int = 32) -> CLIPTokenizer:
    """Build the tokenizer in memory; the same domains give the same ids.

    Args:
        domains: domain names whose words enter the vocabulary and which get a background token.
        max_length: padded prompt length (``model_max_length``).
    """
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    merges: list[tuple[str, str]] = []
    for ch in string.ascii_lowercase + string.digits + string.punctuation:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    words = list(PROMPT_WORDS)
    for domain in DEFAULT_DOMAINS + tuple(domains):
        words += domain_words(domain)
    for word in dict.fromkeys(words):
        if len(word) > 1:
            _add_word(word, vocab, merges)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = max_length
    tok.add_tokens(learned_tokens(domains))
    return tok


def learned_tokens(domains: Sequence[str]) -> list[str]:
    """[V1] followed by the background token of each domain (sorted, duplicates dropped)."""
    return [VEHICLE_TOKEN] + [background_token(d) for d in sorted(set(domains))]
