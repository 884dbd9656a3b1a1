"""Shuffle-buffer draws that depend only on how many samples were taken, and their replay over sample positions:
a mid-epoch resume finds where each stream stood without reading what it skips (`ShardStream._replayed`)."""

from __future__ import annotations

import logging
import os
import random
from typing import TYPE_CHECKING

from blip2_train.data.decode import SkipCounter, WarningLimiter

if TYPE_CHECKING:
    from blip2_train.data.stream import ShardStream, Source

log = logging.getLogger(__name__)


class ShuffleBuffer:
    """WebDataset-style shuffle buffer as an iterator whose state is visible: its draws depend only on how many
    samples it has taken, never on what they hold, so a resume can replay them over sample positions (integers)
    and then put the real samples in the places their positions took (`ShardStream._replayed`)."""

    def __init__(self, samples, size: int, rng: random.Random):
        self.samples, self.size, self.rng = iter(samples), size, rng
        self.buf: list = []
        self.drain: int | None = None  # once the input has ended: the next buffer place to yield

    def __iter__(self):
        return self

    def __next__(self):
        if self.size <= 1:
            return next(self.samples)
        if self.drain is None:
            for s in self.samples:
                if len(self.buf) < self.size:
                    self.buf.append(s)
                    continue
                i = self.rng.randrange(len(self.buf))
                self.buf[i], s = s, self.buf[i]
                return s
            self.rng.shuffle(self.buf)
            self.drain = 0
        if self.drain < len(self.buf):
            s, self.buf[self.drain] = self.buf[self.drain], None
            self.drain += 1
            return s
        raise StopIteration


class PositionReplay:
    """One source's raw stream as sample positions (shard ordinal, member), then as samples again from the first
    shard whose members are still needed (`ShardStream._replayed`)."""

    def __init__(self, stream: ShardStream, source: Source, slot: int, num_slots: int, repeat: bool):
        self.stream, self.source, self.slot, self.num_slots, self.repeat = stream, source, slot, num_slots, repeat
        self.urls: list[str] = []  # the shard of each ordinal so far
        self.last: tuple[int, int] | None = None  # the last position the buffer took
        self.passed = self.reread = 0
        self.first_read: str | None = None  # the shard the resumed stream reads first

    def positions(self):
        for ordinal, url in enumerate(self.stream._shard_urls(self.source, self.slot, self.num_slots, self.repeat)):
            self.urls.append(url)
            for member in range(self.source.shards[url][0]):
                self.last = (ordinal, member)
                yield self.last

    def materialise(self, sim: ShuffleBuffer, counter: SkipCounter, warnings: WarningLimiter):
        """A ShuffleBuffer over real samples in the state `sim` reached over positions, or None."""
        if self.last is None:  # nothing taken yet: the plain stream
            return ShuffleBuffer(self.stream._raw_samples(self.source, self.slot, self.num_slots, self.repeat,
                                                          counter, warnings), sim.size, sim.rng)
        held = {pos: i for i, pos in enumerate(sim.buf) if pos is not None}
        start = min([o for o, _ in held] + [self.last[0]])
        for url in set(self.urls[:start]):
            size = os.path.getsize(url) if os.path.isfile(url) else None
            if size != self.source.shards[url][1]:
                log.warning("resume: %s is %s bytes, its manifest says %d: reading the skipped samples instead",
                            url, size, self.source.shards[url][1])
                return None
        self.passed, real = start, ShuffleBuffer(iter(()), sim.size, sim.rng)
        real.buf, real.drain = list(sim.buf), sim.drain
        raw = self.stream._raw_samples(self.source, self.slot, self.num_slots, self.repeat, counter, warnings,
                                       start_shard=start)
        ordinal, member, reread = start, 0, set()
        for sample in raw:  # the members up to the last taken position: into the buffer, or dropped (used)
            while member >= self.source.shards[self.urls[ordinal]][0]:
                ordinal, member = ordinal + 1, 0
            if sample.get("__url__") != self.urls[ordinal]:
                log.warning("resume: %s does not hold the members its manifest counts: reading the skipped samples "
                            "instead", self.urls[ordinal])
                return None
            reread.add(ordinal)
            if (ordinal, member) in held:
                real.buf[held.pop((ordinal, member))] = sample
            if (ordinal, member) == self.last:
                break
            member += 1
        if held or (ordinal, member) != self.last:
            log.warning("resume: the shards from %s on hold fewer samples than their manifest counts: reading the "
                        "skipped samples instead", self.urls[start])
            return None
        self.reread, self.first_read = len(reread), self.urls[start]
        real.samples = raw  # the rest of the raw stream: what the uninterrupted run read next
        return real

