"""Token ids in, text deltas out: incremental detokenization plus OpenAI `stop` strings.

Decoding one token at a time is wrong for byte-level tokenizers: a multi-byte character split over
two tokens decodes as U+FFFD halves. So text is released only once the decoded tail is complete
(the prefix/read offset scheme used by TGI and vLLM: re-decode a short window, emit what grew).

The held-back tail is bounded: a character is at most 4 bytes, so a tail still incomplete after
`MAX_HELD_TOKENS` tokens is bytes that will never form one (or tokens that decode to nothing), and it
is released as it decodes (U+FFFD). Unbounded, a model emitting such tokens would make every push
re-decode the whole tail: quadratic work on the event loop, where streams are decoded.

Stop strings can straddle tokens, so the last `len(longest stop) - 1` characters are held back until
more text proves they do not start a stop string; on a match the text is cut before it and the
caller ends the generation with finish_reason "stop".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"
MAX_HELD_TOKENS = 8  # twice the longest UTF-8 character in byte-level tokens


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Text that `token_id` completes ('' while a character is still partial)."""
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        text = self._decode(self.ids[self._prefix_offset :])
        complete = len(text) > len(prefix) and not text.endswith(REPLACEMENT)
        if complete or len(self.ids) - self._read_offset >= MAX_HELD_TOKENS:
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (possibly with U+FFFD: the generation ended mid-character)."""
        if self._read_offset == len(self.ids):
            return ""
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        text = self._decode(self.ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self.ids)
        return text[len(prefix) :]


class TextAssembler:
    """Feeds tokens through the detokenizer and the stop-string matcher.

    `push` and `finish` return the text that is now safe to send; `stopped` turns True when a stop
    string matched, after which further tokens are ignored.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._pending = ""  # decoded but not yet released
        self.text = ""  # everything released so far
        self.stopped = False

    @property
    def token_ids(self) -> list[int]:
        return self._detokenizer.ids

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        return self._release(self._detokenizer.push(token_id), final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        return self._release(self._detokenizer.flush(), final=True)

    def _release(self, new_text: str, *, final: bool) -> str:
        self._pending += new_text
        cut = self._first_stop(self._pending)
        if cut is not None:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
        elif final or not self._stop:
            out, self._pending = self._pending, ""
        else:
            keep = min(self._hold, len(self._pending))
            split = len(self._pending) - keep
            out, self._pending = self._pending[:split], self._pending[split:]
        self.text += out
        return out

    def _first_stop(self, text: str) -> int | None:
        hits = [index for index in (text.find(s) for s in self._stop) if index >= 0]
        return min(hits) if hits else None
