"""Text of a generation as it grows: deltas at character boundaries, stop strings held back.

Clients stream the text while it is generated, and the concatenated deltas must equal the
final text exactly. Decoding every id again at every step would cost O(n) per token (about
0.6 ms for 1,000 ids with this tokenizer, longer than a batched decode step), so each step
decodes only a short window: the ids since the last emitted point, after the ids of the step
before. Three properties of a SentencePiece/Llama decoder make a window differ from the
whole, and each is handled here:

* special ids are dropped by `skip_special_tokens`: they are dropped here before decoding;
* byte-fallback ids (`<0xE2><0x82><0xAC>` = "€") are grouped across neighbours, so no text
  is emitted while the last id is a byte id, and a window never starts inside a group;
* the decoder strips one leading space of its whole output: windows after the first are
  decoded behind a fixed sentinel id, so nothing is stripped where the full decode would not.

Stop strings are matched on the text; a suffix that may still become a stop string is held
back, so a stop string never reaches a client, even in part.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tokenizers import Tokenizer

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class Vocabulary:
    """What incremental decoding needs to know about a tokenizer, computed once per model."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.special_ids = frozenset(
            int(token_id)
            for token_id, token in tokenizer.get_added_tokens_decoder().items()
            if token.special
        )
        size = tokenizer.get_vocab_size()
        self.byte_ids = frozenset(
            token_id
            for token_id in range(size)
            if _BYTE_TOKEN.fullmatch(tokenizer.id_to_token(token_id) or "")
        )
        self.sentinel_id, self.sentinel_text = _sentinel(tokenizer)

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def piece(self, token_id: int) -> tuple[str, bytes]:
        """One token's own text and bytes, as logprobs report it: SentencePiece's "▁" is a
        space, a byte-fallback id is its byte (text: U+FFFD until its neighbours complete
        a character), a special id its name; a padded logit beyond the tokenizer, nothing."""
        token = self.tokenizer.id_to_token(token_id)
        if token is None:
            return "", b""
        if token_id in self.byte_ids:
            data = bytes([int(token[3:5], 16)])
        else:
            data = token.replace("\u2581", " ").encode("utf-8")
        return data.decode("utf-8", errors="replace"), data


class TextStream:
    """Feed generated ids one at a time; get back the text that is now safe to show."""

    def __init__(self, vocabulary: Vocabulary, stop: Sequence[str] = ()) -> None:
        self._vocab = vocabulary
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []  # generated ids without special ids
        self._window_start = 0  # self._ids[:_window_start] are fully reflected in _decoded
        self._read = 0  # ids up to here are decoded into _decoded
        self._decoded = ""  # text of self._ids[:_read]
        self._emitted = 0  # characters of _decoded handed out
        self.stop_string: str | None = None  # the stop string that ended the text

    @property
    def stopped(self) -> bool:
        return self.stop_string is not None

    @property
    def text(self) -> str:
        """Everything handed out so far."""
        return self._decoded[: self._emitted]

    def push(self, token_id: int) -> str:
        """Add one generated id; return the new text to show ("" while held back)."""
        if self.stopped or token_id in self._vocab.special_ids:
            return ""
        self._ids.append(token_id)
        if token_id in self._vocab.byte_ids:
            return ""  # may join the next ids into one character
        self._decode_window()
        return self._release(final=False)

    def finish(self) -> str:
        """The generation ended: return whatever was held back (nothing after a stop string)."""
        if self.stopped:
            return ""
        if self._read < len(self._ids):
            self._decode_window()
        return self._release(final=True)

    def _decode_window(self) -> None:
        vocab = self._vocab
        start, read = self._window_start, self._read
        if start == 0:
            # Decoding from the first id is exactly the whole output, leading strip included.
            self._decoded = vocab.decode(self._ids)
        else:
            # Behind the sentinel the decoder's leading strip cannot touch the window; the
            # ids of the step before give the new ids their context.
            lead = [vocab.sentinel_id]
            skip = len(vocab.sentinel_text)
            before = vocab.decode(lead + self._ids[start:read])[skip:]
            after = vocab.decode(lead + self._ids[start:])[skip:]
            self._decoded += after[len(before) :]
        self._window_start = read
        self._read = len(self._ids)

    def _release(self, *, final: bool) -> str:
        text = self._decoded
        if self._stop:
            # Text handed out never ends in part of a stop string, so a match starts later.
            hits = [(text.find(s, self._emitted), s) for s in self._stop]
            found = [(index, s) for index, s in hits if index >= 0]
            if found:
                index, stop = min(found)
                self.stop_string = stop
                return self._hand_out(index)
            if not final:
                return self._hand_out(len(text) - _held_back(text, self._stop))
        return self._hand_out(len(text))

    def _hand_out(self, end: int) -> str:
        end = max(end, self._emitted)
        delta = self._decoded[self._emitted : end]
        self._emitted = end
        if self.stopped:
            self._decoded = self._decoded[:end]
        return delta


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def _sentinel(tokenizer: Tokenizer) -> tuple[int, str]:
    """An ordinary id whose text has no leading space, and that text."""
    for candidate in ("a", "x", "0", "."):
        token_id = tokenizer.token_to_id(candidate)
        if token_id is not None:
            text = str(tokenizer.decode([token_id], skip_special_tokens=True))
            if text and not text[0].isspace():
                return int(token_id), text
    raise ValueError("the tokenizer has no plain single-character token to decode behind")
