"""Generated tokens to streamed text: incremental decoding, stop strings, held-back partial characters."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextStream:
    """The text of a growing token list, handed out in pieces that never change once given.

    ``feed(token)`` returns ``(new_text, stopped)``. A trailing U+FFFD (an unfinished multi-byte character) and
    the last ``len(longest stop) - 1`` characters (a stop string may be starting) are held back until they
    settle; a stop string ends the text just before it. :meth:`flush` gives what is held back at the end.

    Example:
        >>> ts = TextStream(lambda t: bytes(t).decode("utf-8", "replace"), stop=("\\n\\n",))
        >>> [ts.feed(b) for b in b"ab\\n"], ts.feed(ord("\\n")), ts.text
        ([('', False), ('a', False), ('b', False)], ('', True), 'ab')
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        self.decode, self.stop = decode, tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self.text = ""  # everything settled so far (after a stop: the final text)
        self.sent = 0  # characters of text handed out
        self.stopped = False
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def feed(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.tokens.append(int(token))
        full = self.decode(self.tokens)
        for s in self.stop:
            at = full.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                full, self.stopped = full[:at], True
        self.text = full
        if self.stopped:
            return self.flush(), True
        settled = len(full.rstrip("\ufffd")) - self._hold
        if settled <= self.sent:
            return "", False
        piece, self.sent = full[self.sent : settled], settled
        return piece, False

    def flush(self) -> str:
        """Everything not handed out yet (call when the request ends)."""
        piece, self.sent = self.text[self.sent :], len(self.text)
        return piece
