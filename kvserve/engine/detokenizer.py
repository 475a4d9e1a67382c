"""Incremental detokenization and stop strings.

Text is emitted only once it is stable: a token that ends inside a multi-byte character decodes
to U+FFFD and waits for the next one, and the last `longest stop string - 1` characters are held
back until they can no longer begin a stop string (which is never emitted)."""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str],  # noqa: ANN001 - a transformers tokenizer
                 include_stop: bool = False, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop  # vLLM's include_stop_str_in_output: the stop string stays in the text
        self.skip_special_tokens = skip_special_tokens
        # nothing need be held back when a stop string would be emitted anyway
        self.hold = 0 if include_stop else max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # all stable text decoded so far
        self.emitted = 0  # characters of `text` handed out

    def add(self, token_id: int, find_stop: bool = True) -> str | None:
        """Add a token; return the stop string it completed, if any (none is looked for without
        `find_stop`: a request's min_tokens)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip_special_tokens)
        full = decode(self.ids[self.prefix_offset:], skip_special_tokens=self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            before = len(self.text)
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            for stop in self.stop if find_stop else ():
                # a stop string can only end in the new text, so search from just before it
                at = self.text.find(stop, max(0, before - len(stop) + 1))
                if at != -1:
                    self.text = self.text[:at + len(stop) if self.include_stop else at]
                    return stop
        return None

    def take(self, final: bool) -> str:
        """Text that is safe to emit now (everything, once the sequence is finished)."""
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
