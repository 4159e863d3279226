"""Stop strings over a stream of text deltas: emit what is safe, hold back what may start a stop string.

Layer: domain (pure). A stop string can arrive split across tokens ("<|im" + "_end|>"), so the tail of
the text that could still grow into one is held back until the next delta decides it.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Adds a delta; returns the text now safe to emit. After a stop string, `stopped` is True."""
        if self.stopped:
            return ""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        keep = self._partial_suffix()
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        """The held-back text once the stream ends without a stop string."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _partial_suffix(self) -> int:
        """Length of the longest tail of `pending` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest
