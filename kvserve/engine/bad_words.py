"""vLLM's `bad_words`: words the output may not contain, banned one token at a time.

A word is tokenized as it would start a text and as it would follow a space (the two differ in
BPE vocabularies). A word of one token is banned at every step; a longer one has its last token
banned whenever the output ends with the rest of it."""

from __future__ import annotations

from typing import Any


def bad_words_token_ids(tokenizer: Any, words: list[str]) -> list[list[int]]:
    """Each word's token ids, bare and after a space; the spaced form is kept only where it is a
    different token sequence of the same length (as vLLM keeps it)."""
    token_ids: list[list[int]] = []
    for word in (w.lstrip() for w in words):
        if not word:  # nothing to ban (the bare space it would become is not a word)
            continue
        bare = tokenizer.encode(word, add_special_tokens=False)
        token_ids.append(bare)
        spaced = tokenizer.encode(" " + word, add_special_tokens=False)
        if len(spaced) == len(bare) and spaced[0] != bare[0]:
            token_ids.append(spaced)
    return token_ids


def bad_word_bans(words_ids: list[list[int]], output: list[int]) -> list[int]:
    """The tokens that would complete a bad word after `output`."""
    bans = []
    for ids in words_ids:
        prefix = len(ids) - 1
        if prefix <= len(output) and (prefix == 0 or output[-prefix:] == ids[:-1]):
            bans.append(ids[-1])
    return bans
