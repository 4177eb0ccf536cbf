"""Constrained decoding: a row's grammar, as a mask of the tokens it may choose next.

A request with a `response_format` (vision_queue.structured) gets a `RowConstraint`: an
llguidance `LLMatcher` over the checkpoint's tokenizer, built on the request's own thread
(`Grammars.constraint`), never on the device thread, so a new schema never stalls the
running rows. Each grammar is compiled once per worker: the compiled matcher is kept by
the grammar's hash and each request gets a copy of it (`deep_copy`, microseconds).

The device thread asks a row for `allowed()` before each step that chooses its token
(a bool tensor over the model's logits: the tokenizer's ids the grammar allows, never the
ids past the tokenizer's vocabulary, which Phi-3's 32,064 logits pad) and tells it each
token it chose (`advance`). Once the JSON is complete the only allowed token is `<|end|>`,
so a constrained output ends by `stop` unless its budget ends it first (`length`).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
from typing import Any

import numpy as np
import torch
from llguidance import LLMatcher, LLTokenizer
from tokenizers import Tokenizer

from vision_queue.errors import InvalidInput
from vision_queue.structured import FIELD, grammar_for

log = logging.getLogger(__name__)

CACHED_GRAMMARS = 256


class RowConstraint:
    """One request's grammar state; used by the device thread only, once started."""

    def __init__(self, matcher: LLMatcher, vocab_size: int, logits_size: int, end_token: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.logits_size = logits_size
        self.end_token = end_token
        # llguidance's token bitmask (32 ids per int32), filled in place; not through
        # llguidance.torch, whose import pulls in torch's compiler stack (and redis).
        self._bitmask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        self._allowed = torch.zeros(logits_size, dtype=torch.bool)

    def allowed(self) -> torch.Tensor:
        """The tokens the grammar allows next: bool [logits_size] (a buffer reused per step)."""
        allowed = self._allowed
        if self.matcher.is_error():  # only after a token the mask refused: end the row
            allowed.zero_()
            allowed[self.end_token] = True
            return allowed
        bitmask = self._bitmask
        self.matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)
        # Little-endian bits: id i is bit i % 32 of word i // 32, as numpy unpacks them.
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")
        allowed[: self.vocab_size] = torch.from_numpy(bits[: self.vocab_size]).view(torch.bool)
        allowed[self.vocab_size :] = False  # the padded logits: never
        return allowed

    def advance(self, token: int) -> None:
        if not self.matcher.is_error() and not self.matcher.consume_token(token):
            log.warning("grammar refused token %d: %s", token, self.matcher.get_error())


class Grammars:
    """The worker's compiled grammars, by hash; `constraint` runs on request threads."""

    def __init__(self, tokenizer: Tokenizer, end_token: int, logits_size: int) -> None:
        self._tokenizer_json = tokenizer.to_str()
        self.end_token = end_token
        self.logits_size = logits_size
        self._lock = threading.Lock()
        self._llt: LLTokenizer | None = None
        self._compiled: collections.OrderedDict[str, LLMatcher] = collections.OrderedDict()
        self.compiles = 0  # grammars compiled, for tests and metrics

    def _ll_tokenizer(self) -> LLTokenizer:
        with self._lock:
            if self._llt is None:
                self._llt = LLTokenizer(self._tokenizer_json, eos_token=self.end_token)
            return self._llt

    def constraint(self, response_format: dict[str, Any]) -> RowConstraint:
        """A fresh constraint for one request; InvalidInput if the grammar does not compile."""
        grammar = grammar_for(response_format)
        key = hashlib.sha256(grammar.encode()).hexdigest()
        tokenizer = self._ll_tokenizer()
        with self._lock:
            template = self._compiled.get(key)
            if template is not None:
                self._compiled.move_to_end(key)
        if template is None:
            template = LLMatcher(tokenizer, grammar, log_level=0)  # drops the GIL
            if template.is_error():
                raise InvalidInput(
                    f"response_format schema is not supported: {template.get_error()[:300]}",
                    field=FIELD,
                )
            with self._lock:
                self.compiles += 1
                self._compiled[key] = template
                while len(self._compiled) > CACHED_GRAMMARS:
                    self._compiled.popitem(last=False)
        with self._lock:
            matcher = template.deep_copy()
        return RowConstraint(matcher, tokenizer.vocab_size, self.logits_size, self.end_token)
