"""The training stream over WebDataset shards.

Design (why each piece is here)
- Shards are assigned to (rank, worker) slots in this process, not through environment variables, so a
  2-rank x 2-worker run is exactly reproducible and testable: slot = rank * workers + worker.
- `resampled=True`: every slot draws shards with replacement from its own RNG seeded by (seed, epoch,
  rank, worker), the open_clip recipe for large runs. `resampled=False`: a deterministic shard shuffle per
  epoch shared by all ranks, shard i going to slot i mod (ranks x workers), so slots are disjoint and cover.
- Batches are formed inside the workers and every worker yields the same number of them, so every rank
  yields the same number of batches per epoch (DDP would otherwise hang on the last step).
- Dataset mixing picks the source of global batch g from an RNG seeded by (seed, epoch, g), which every rank
  computes identically: all ranks train on the same mixture within a step.
- A batch is a fixed window of `batch_size` raw samples of one source, and each sample's augmentation and
  caption draw come from an RNG keyed by (seed, epoch, slot, source, position in the slot's stream): what a
  batch holds never depends on what was decoded before it, so a mid-epoch resume skips batches by reading
  their tar members without decoding them (`skip_batches`). (A window without one usable sample is replaced
  by the next window: a resume past such a window, which a skip cannot see, is off by that window.)
- Corrupt samples are skipped and counted; in a repeating stream each is replaced by another augmentation of
  a usable sample of its window (same image_id: a positive, never a hard negative), so batches keep their
  size. Each batch carries the counts since the previous batch, so the Lightning module can log
  `data/skipped`, and the stream stops with a DataError past `max_skip_rate`.
  An unreadable shard counts as one sample seen and skipped, and a round of shards that yields nothing
  (every shard the slot can draw, in a row) is a DataError naming them: a repeating stream over bad shards
  would otherwise re-read them forever. Identical warnings are rate-limited (`WarningLimiter`).
"""

from __future__ import annotations

import itertools
import logging
import random
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from blip2_train.data.decode import SampleDecoder, SkipCounter, WarningLimiter
from blip2_train.data.replay import PositionReplay, ShuffleBuffer
from blip2_train.utils.hashing import stable_hash
from blip2_train.utils.errors import DataError

log = logging.getLogger(__name__)


class EmptyRoundGuard:
    """Raises DataError once every shard of a source that this slot can draw has yielded nothing, in a row."""

    def __init__(self, source_name: str, reachable: set[str]):
        self.source_name, self.reachable = source_name, reachable
        self.current: str | None = None
        self.got = False
        self.empty: set[str] = set()
        self.any_sample = False

    def next_shard(self, url: str) -> None:
        self._close_current()
        self.current, self.got = url, False

    def sample(self) -> None:
        self.got = self.any_sample = True

    def finished(self) -> None:
        self._close_current()
        if not self.any_sample and self.empty:
            self._raise(self.empty)

    def _close_current(self) -> None:
        if self.current is None:
            return
        if self.got:
            self.empty.clear()
        else:
            self.empty.add(self.current)
            if self.empty >= self.reachable:
                self._raise(self.reachable)

    def _raise(self, urls) -> None:
        names = sorted(urls)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise DataError(f"source {self.source_name!r}: no readable sample in any of its {len(names)} shard(s): {shown}")


@dataclass
class Source:
    """One training source: a list of shard paths and its mixing weight. `shards`: (samples, bytes) of each url,
    from the shard directories' manifest.json (None where unknown): a resume then skips without reading."""

    name: str
    urls: list[str]
    weight: float = 1.0
    shards: dict[str, tuple[int, int]] | None = None


def shards_for_slot(urls: Sequence[str], slot: int, num_slots: int, seed: int, epoch: int) -> list[str]:
    order = list(urls)
    random.Random(stable_hash("shards", seed, epoch)).shuffle(order)
    return order[slot::num_slots]


class ShardStream(IterableDataset):
    """Batches from one or more sources of shards; see the module docstring for the guarantees."""

    def __init__(
        self,
        sources: Sequence[Source],
        decoder: SampleDecoder,
        collate: Callable[[list[dict], tuple], dict],  # (samples, batch key) -> batch
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        resampled: bool = True,
        shuffle_buffer: int = 1000,
        batches_per_epoch: int | None = None,
        max_skip_rate: float = 0.1,
        min_samples_for_skip_check: int = 200,
        resume_replay: bool = True,
    ):
        if not sources or not all(s.urls for s in sources):
            raise DataError("every training source needs at least one shard")
        self.sources = list(sources)
        self.decoder = decoder
        self.collate = collate
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.batches_per_epoch = batches_per_epoch
        self.max_skip_rate = max_skip_rate
        self.min_samples_for_skip_check = min_samples_for_skip_check
        self.resume_replay = resume_replay
        self.epoch = 0
        # Exact mid-epoch resume: this rank's first `skip_batches` batches of the epoch are read again from the tars
        # (same shard order, same shuffle-buffer draws) but not decoded: a batch is a fixed window of raw samples
        # and each sample's randomness is keyed by its position, so the stream continues where the interrupted
        # run stopped at the cost of reading, not decoding, what it skips.
        self.skip_batches = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("one-pass stream has no fixed length")
        return self.batches_per_epoch

    # -- per-worker pieces -------------------------------------------------------------------------

    def _shard_urls(self, source: Source, slot: int, num_slots: int, repeat: bool) -> Iterator[str]:
        if self.resampled:
            rng = random.Random(stable_hash("resample", source.name, self.seed, self.epoch, slot))
            while True:
                yield rng.choice(source.urls)
        epoch = self.epoch
        while True:
            mine = shards_for_slot(source.urls, slot, num_slots, self.seed, epoch)
            if not mine:
                if repeat:
                    raise DataError(
                        f"source {source.name!r} has {len(source.urls)} shards for {num_slots} rank x worker slots: "
                        "use more shards, fewer workers, or data.resampled=true")
                return
            yield from mine
            if not repeat:
                return
            epoch += 1_000_003  # a fresh shard order for the wrap-around, still identical on every rank

    def _raw_samples(self, source: Source, slot: int, num_slots: int, repeat: bool, counter: SkipCounter,
                     warnings: WarningLimiter, start_shard: int = 0):
        # every shard when they repeat or are resampled; a one-pass stream may draw only its own share
        reachable = set(source.urls) if repeat or self.resampled else set(
            shards_for_slot(source.urls, slot, num_slots, self.seed, self.epoch))
        guard = EmptyRoundGuard(source.name, reachable)

        def on_error(exn: Exception) -> bool:
            counter.seen += 1  # an unreadable shard counts as a sample seen and skipped: the skip rate sees it
            counter.skip("unreadable tar")
            what = exn.args[0] if exn.args else exn
            warnings.warn(f"source {source.name}: unreadable shard {guard.current}: {type(exn).__name__}: {what} "
                          "(rest of that shard skipped)")
            self._check_skip_rate(counter, {"__url__": guard.current})
            return True

        def urls():
            for u in itertools.islice(self._shard_urls(source, slot, num_slots, repeat), start_shard, None):
                guard.next_shard(u)
                yield {"url": u}
            guard.finished()

        for sample in tarfile_samples(urls(), handler=on_error):
            guard.sample()
            yield sample

    def _check_skip_rate(self, counter: SkipCounter, raw: dict) -> None:
        if counter.seen >= self.min_samples_for_skip_check and counter.skipped > self.max_skip_rate * counter.seen:
            raise DataError(
                f"{counter.skipped} of {counter.seen} samples skipped ({dict(counter.reasons)}), above "
                f"data.max_skip_rate={self.max_skip_rate}; last shard {raw.get('__url__')}, sample {raw.get('__key__')}")

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader polls workers round-robin from worker 0. After skipping k batches the next one is
        # global batch k, which worker k % num_workers made in the uninterrupted run: each worker takes over
        # the role (shards, RNG) of the worker k positions further on.
        worker = (worker + self.skip_batches) % num_workers
        slot, num_slots = self.rank * num_workers + worker, self.world_size * num_workers
        rng = random.Random(stable_hash("samples", self.seed, self.epoch, slot))  # shuffle buffers only
        counter, warnings = SkipCounter(), WarningLimiter()
        try:
            yield from self._batches(worker, num_workers, slot, num_slots, rng, counter, warnings)
        finally:
            warnings.summary()

    def _sample_rng(self, slot: int, source: int, index: int) -> random.Random:
        """A sample's augmentation and caption draw, keyed by its position in the slot's stream of that source:
        independent of what was decoded before it, so skipped batches need no decoding to keep later draws."""
        return random.Random(stable_hash("sample", self.seed, self.epoch, slot, source, index))

    def _build(self, window: list[dict], k: int, first: int, slot: int, counter: SkipCounter,
               warnings: WarningLimiter, fill: bool) -> list[dict]:
        """Decode one batch window. In a repeating stream a sample that cannot be used is replaced by another
        augmentation (and caption draw) of a usable one of the same window: the batch keeps its size and its
        window, so a batch's raw samples never depend on what failed to decode (exact cheap resume)."""
        out = []
        for j, raw in enumerate(window):
            out.append(self.decoder(raw, self._sample_rng(slot, k, first + j), counter, warnings.warn))
            self._check_skip_rate(counter, raw)
        good = [j for j, o in enumerate(out) if o is not None]
        if not fill or not good or len(good) == len(out):
            return [o for o in out if o is not None]
        scratch = SkipCounter()  # the stand-ins are not new samples: not counted as seen
        for j, o in enumerate(out):
            if o is None:
                out[j] = self.decoder(window[good[j % len(good)]], self._sample_rng(slot, k, first + j), scratch)
        return out

    def _source_of(self, global_batch: int) -> int:
        if len(self.sources) == 1:
            return 0
        return random.Random(stable_hash("mix", self.seed, self.epoch, global_batch)).choices(
            range(len(self.sources)), [s.weight for s in self.sources])[0]

    def _batches(self, worker, num_workers, slot, num_slots, rng, counter, warnings) -> Iterator[dict]:
        repeat = self.batches_per_epoch is not None
        reported = (0, 0)
        n_local = None
        if repeat:  # ceil: each worker yields the same count, so every rank yields the same total
            n_local = -(-self.batches_per_epoch // num_workers)
        # batches of this rank are dealt round-robin over workers: batch g comes from worker g % num_workers
        skip_local = max(0, -(-(self.skip_batches - worker) // num_workers))
        replayed = self._replayed(slot, num_slots, repeat, rng, skip_local, worker, num_workers, counter,
                                  warnings) if skip_local else None
        if replayed is not None:  # the skipped windows were replayed over sample positions: nothing read for them
            streams, position, ended = replayed
            if ended:
                return
            i = skip_local
        else:  # raw tar samples through each source's shuffle buffer; the buffer's draws never depend on decoding
            streams = [ShuffleBuffer(self._raw_samples(s, slot, num_slots, repeat, counter, warnings),
                                     self.shuffle_buffer, rng) for s in self.sources]
            position = [0] * len(streams)  # raw samples taken from each source so far: the per-sample RNG key
            i = 0
        while n_local is None or i < n_local:
            global_batch = i * num_workers + worker
            k = self._source_of(global_batch)
            window = list(itertools.islice(streams[k], self.batch_size))
            first, position[k] = position[k], position[k] + len(window)
            if not window:
                return
            if len(window) < self.batch_size and repeat:
                raise DataError(f"source {self.sources[k].name!r} ran dry inside a repeating stream")
            if i < skip_local:  # consumed before the resume: tar members read, nothing decoded
                i += 1
                continue
            samples = self._build(window, k, first, slot, counter, warnings, fill=repeat)
            if not samples:  # not one usable sample in the window: the next window takes this batch's place
                continue
            batch = self.collate(samples, (self.epoch, self.rank, global_batch))
            batch["source"] = k
            batch["data_seen"] = counter.seen - reported[0]
            batch["data_skipped"] = counter.skipped - reported[1]
            reported = (counter.seen, counter.skipped)
            yield batch
            i += 1

    # -- mid-epoch resume without reading what is skipped ---------------------------------------------

    def _replayed(self, slot, num_slots, repeat, rng, skip_local, worker, num_workers, counter, warnings):
        """The streams positioned after this worker's first `skip_local` windows, found without reading them.

        A slot's raw stream is its shard sequence (`_shard_urls`, drawn from seeds) cut into samples, so with each
        shard's sample count (manifest.json) the shuffle buffers' draws can be replayed over sample positions
        (shard ordinal, member) instead of samples. What the skipped windows took is never read; the shards
        still holding a sample that comes later (in a buffer, or the next input) are read from the first of them
        on, their already-used members dropped undecoded. At 129M samples a requeue 40k steps in would otherwise
        read ~250 GiB of tar per rank before training. Returns (streams, position, ended), or None (with a
        warning: the caller then reads the skipped samples) when a shard's count is unknown, a skipped shard's
        size on disk is not the manifest's (rewritten or truncated: its count cannot be trusted), or the re-read
        shards do not hold the members the manifest promised. A skipped shard is trusted by its size: one
        damaged in place with its size unchanged yields fewer samples to a run that reads it, and the replay
        then continues otherwise than that run did (`data.resume_replay=false` reads instead).
        """
        if not self.resume_replay or any(not s.shards or any(u not in s.shards for u in s.urls)
                                         or not sum(s.shards[u][0] for u in s.urls) for s in self.sources):
            return None  # no counts (or a source of empty shards): the read path, which also reports the latter
        start_state = rng.getstate()
        plans = [PositionReplay(self, s, slot, num_slots, repeat) for s in self.sources]
        sims = [ShuffleBuffer(p.positions(), self.shuffle_buffer, rng) for p in plans]
        position, ended = [0] * len(sims), False
        for i in range(skip_local):  # the loop of `_batches` over the skipped windows, on positions
            k = self._source_of(i * num_workers + worker)
            got = sum(1 for _ in itertools.islice(sims[k], self.batch_size))
            position[k] += got
            if not got:  # there the stream ends: a one-pass stream that ended inside the skipped part
                ended = True
                break
            if got < self.batch_size and repeat:
                raise DataError(f"source {self.sources[k].name!r} ran dry inside a repeating stream")
        streams = []
        for k, (plan, sim) in enumerate(zip(plans, sims)):
            stream = plan.materialise(sim, counter, warnings)
            if stream is None:
                rng.setstate(start_state)
                return None
            streams.append(stream)
        log.info("resume: skipped %d batches of slot %d without reading them (%d shards passed over, %d read "
                 "again for the samples still to come, from %s)", skip_local, slot, sum(p.passed for p in plans),
                 sum(p.reread for p in plans), ", ".join(str(p.first_read) for p in plans))
        return streams, position, ended
