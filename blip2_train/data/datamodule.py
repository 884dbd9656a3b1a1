"""LightningDataModule: training stream over shards + map-style evaluation sets."""

from __future__ import annotations

import glob
import logging
import os
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from blip2_train.data.collate import CaptionCollator, Stage2Collator
from blip2_train.data.eval_sets import CaptionedImages, EvalImageDataset, collate_eval_images
from blip2_train.data.shards import read_manifest, shard_sizes
from blip2_train.data.decode import SampleDecoder
from blip2_train.data.stream import ShardStream, Source
from blip2_train.utils.hashing import stable_hash
from blip2_train.data.transforms import TrainTransform
from blip2_train.data.vqa import VQA_FORMATS, VqaQuestions, read_vqa_set
from blip2_train.utils.errors import ConfigError, DataError, ResumeShapeError

log = logging.getLogger(__name__)


def is_local(url: str) -> bool:
    """A path on this machine (not `http://...`, `s3://...`, `pipe:...`): its existence can be checked."""
    return "://" not in url and not url.startswith("pipe:")


def expand_urls(spec: str | list[str]) -> list[str]:
    """A shard spec is a directory (all *.tar), a glob, a brace pattern ('a-{000..009}.tar') or a list. Every
    local path it names must exist: a brace pattern is expanded without looking at the disk, and a shard missing
    from it would otherwise be read as an empty one."""
    if isinstance(spec, (list, tuple)) or type(spec).__name__ == "ListConfig":
        return [u for s in spec for u in expand_urls(s)]
    spec = str(spec)
    if os.path.isdir(spec):
        urls = sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not urls:
            raise DataError(f"no shards found at {spec!r}: the directory holds no .tar file")
    elif "{" in spec:
        import braceexpand

        urls = list(braceexpand.braceexpand(spec))
        missing = [u for u in urls if is_local(u) and not os.path.exists(u)]
        if missing:
            raise DataError(f"no shards found at {missing[0]!r}: {len(missing)} of the {len(urls)} files that "
                            f"{spec!r} names do not exist (a directory or a glob takes the shards that exist)")
    elif not is_local(spec):
        urls = [spec]
    else:
        urls = sorted(glob.glob(spec))
        if not urls:
            what = "matches no file" if glob.has_magic(spec) else "no such file or directory"
            raise DataError(f"no shards found at {spec!r}: {what}")
    return urls


def count_samples(spec) -> int | None:
    """Samples in a source from its manifest (directory specs only); None when unknown."""
    if isinstance(spec, str) and os.path.isdir(spec):
        try:
            return int(read_manifest(spec)["num_samples"])
        except (FileNotFoundError, KeyError, ValueError):
            return None
    return None


def source_size(spec) -> int | None:
    """A source's size for the mixture rule: its question/answer pairs where its manifest counts them
    (instruction and VQA shards hold an image's pairs in one sample), else its samples; None when unknown."""
    if isinstance(spec, str) and os.path.isdir(spec):
        try:
            m = read_manifest(spec)
            return int(m.get("num_pairs") or m["num_samples"])
        except (FileNotFoundError, KeyError, ValueError):
            return None
    return None


def shape_changes(saved: dict, now: dict) -> list[str]:
    """Readable differences between two `loader_shape()`s ('data.batch_size 8 -> 4', 'world size 2 -> 4')."""
    names = {"world_size": "world size (GPUs x nodes)", "num_workers": "data.num_workers",
             "batch_size": "data.batch_size", "seed": "data.seed", "resampled": "data.resampled",
             "shuffle_buffer": "data.shuffle_buffer"}
    out = [f"{names[k]} {saved.get(k)} -> {now[k]}" for k in names if saved.get(k) != now[k]]
    old = {s["name"]: s for s in saved.get("sources", [])}
    new = {s["name"]: s for s in now["sources"]}
    if list(old) != list(new):
        out.append(f"data.train_sources {list(old)} -> {list(new)}")
        return out
    for name, s in new.items():
        o = old[name]
        if o["weight"] != s["weight"]:
            out.append(f"source {name!r} weight {o['weight']} -> {s['weight']}")
        if o["shards"] != s["shards"]:
            out.append(f"source {name!r} {o['shards']} -> {s['shards']} shards")
        elif o["shard_names"] != s["shard_names"]:
            out.append(f"source {name!r} shard file names changed")
    return out


def ignore_ctrl_c(_worker_id: int) -> None:
    """Loader workers leave Ctrl-C to the training process: a terminal's SIGINT reaches every process of the
    foreground group, and a worker ended by it turned the run's orderly stop (a checkpoint of the step,
    lit/signal_stop.py) into "DataLoader worker exited unexpectedly". SIGTERM is left as it is: the loader shuts
    its workers down with it, and a worker that ignored it would hang the exit."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Blip2DataModule(L.LightningDataModule):
    def __init__(
        self,
        tokenizer: Any,
        train_sources: list[dict] | None = None,
        eval_set: dict | None = None,
        batch_size: int = 100,
        eval_batch_size: int = 64,
        num_workers: int = 4,
        image_size: int = 224,
        eval_image_size: int | None = None,
        min_scale: float = 0.5,
        hflip: bool = True,
        max_words: int = 50,
        max_txt_len: int = 32,
        resampled: bool = True,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        max_skip_rate: float = 0.1,
        jpeg_draft: bool = True,
        seed: int = 0,
        text: dict | None = None,
        allow_reshuffled_resume: bool = False,
        resume_replay: bool = True,
        mixture: str = "weights",
        templates: dict | None = None,
        vqa_answers: str = "frequency",
    ):
        super().__init__()
        self.tokenizer_spec = tokenizer
        self.train_sources_cfg = list(train_sources or [])
        self.eval_set_cfg = dict(eval_set) if eval_set else None
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.eval_image_size = eval_image_size or image_size
        self.min_scale, self.hflip = min_scale, hflip
        self.max_words, self.max_txt_len = max_words, max_txt_len
        self.resampled, self.shuffle_buffer = resampled, shuffle_buffer
        self.samples_per_epoch = samples_per_epoch
        self.max_skip_rate = max_skip_rate
        self.jpeg_draft = jpeg_draft
        self.seed = seed
        self.allow_reshuffled_resume = allow_reshuffled_resume
        self.resume_replay = resume_replay
        # How captions become model inputs: the model config's `text` node (data.text = ${model.text}), so both
        # sides agree. kind=qformer (stage 1): BERT tokens. kind=llm (stage 2): LLM tokens with image tokens and
        # labels (num_query_tokens, prompt, end_text, prefix_lm, encoder_decoder).
        self.text = {"kind": "qformer", **dict(text or {})}
        if self.text["kind"] not in ("qformer", "llm", "instruct"):
            raise ConfigError(f"data.text.kind must be 'qformer', 'llm' or 'instruct', not {self.text.get('kind')!r}")
        if mixture not in ("weights", "sqrt"):
            raise ConfigError(f"data.mixture must be 'weights' or 'sqrt', not {mixture!r}")
        self.mixture = mixture
        # instruction templates drawn for caption and VQA sources (kind=instruct); null = the InstructBLIP paper's
        self.templates = dict(templates or {})
        self.vqa_answers = vqa_answers  # how a VQA question's answer is drawn (data/instruct.py)
        self._tokenizer = None
        self._qformer_tokenizer = None
        self._resume: dict | None = None
        self._eval_data: CaptionedImages | None = None
        self.train_stream: ShardStream | None = None

    # The tokenizer is loaded lazily: Hydra builds the data module before the model, and tests may
    # instantiate it only to check its configuration.
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if not isinstance(self.tokenizer_spec, (str, os.PathLike)):
                self._tokenizer = self.tokenizer_spec
            elif self.text["kind"] in ("llm", "instruct"):
                from blip2_train.models.llm import load_llm_tokenizer

                self._tokenizer = load_llm_tokenizer(self.tokenizer_spec,
                                                     special_tokens=self.text.get("special_tokens") or None)
            else:
                from blip2_train.models.tokenizer import load_qformer_tokenizer

                self._tokenizer = load_qformer_tokenizer(self.tokenizer_spec)
        return self._tokenizer

    @property
    def qformer_tokenizer(self):
        """Instruction tuning: the Q-Former's BERT tokenizer, which reads the instruction too."""
        if self._qformer_tokenizer is None:
            from blip2_train.models.tokenizer import load_qformer_tokenizer

            if not self.text.get("qformer_tokenizer"):
                raise ConfigError("data.text.qformer_tokenizer is required with data.text.kind=instruct")
            self._qformer_tokenizer = load_qformer_tokenizer(self.text["qformer_tokenizer"])
        return self._qformer_tokenizer

    def _llm_is_encoder_decoder(self) -> bool:
        if self.text.get("encoder_decoder") is not None:
            return bool(self.text["encoder_decoder"])
        from transformers import AutoConfig

        return bool(AutoConfig.from_pretrained(str(self.tokenizer_spec)).is_encoder_decoder)

    def make_collator(self):
        if self.text["kind"] == "qformer":
            return CaptionCollator(self.tokenizer, self.max_txt_len)
        from blip2_train.models.llm import end_token_id, image_token_id

        t = self.text
        if "num_query_tokens" not in t:
            raise ConfigError(f"data.text.num_query_tokens is required with data.text.kind={t['kind']}")
        if t["kind"] == "instruct":
            from blip2_train.data.collate import InstructCollator

            return InstructCollator(self.tokenizer, self.qformer_tokenizer, int(t["num_query_tokens"]),
                                    image_token_id(self.tokenizer), int(t.get("max_txt_len") or self.max_txt_len),
                                    int(t.get("max_output_txt_len") or 256), self._llm_is_encoder_decoder(),
                                    end_token_id(self.tokenizer, t.get("end_text")),
                                    str(t.get("answer_separator") or ""))
        return Stage2Collator(self.tokenizer, int(t["num_query_tokens"]), image_token_id(self.tokenizer),
                              end_token_id(self.tokenizer, t.get("end_text")), prompt=t.get("prompt") or "",
                              max_txt_len=self.max_txt_len, encoder_decoder=self._llm_is_encoder_decoder(),
                              prefix_lm=bool(t.get("prefix_lm", False)), seed=self.seed,
                              mask_bos_without_prompt=bool(t.get("mask_bos_without_prompt", False)),
                              keep_end_token=bool(t.get("keep_end_token", False)))

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def sources(self) -> list[Source]:
        """The training sources, each with its shards expanded; a source whose shards are missing is refused,
        naming it (`data.train_sources.0.urls=...` replaces only the first source's shards: the rest stay)."""
        out = []
        for i, s in enumerate(self.train_sources_cfg):
            if not hasattr(s, "get") or "urls" not in s:
                raise ConfigError(f"data.train_sources[{i}] needs 'urls' (a shard directory, glob or brace pattern)")
            name = str(s.get("name", f"source{i}"))
            try:
                urls = expand_urls(s["urls"])
                if not urls:
                    raise DataError("no shards: 'urls' is an empty list")
            except DataError as e:
                raise DataError(f"training source {name!r} (data.train_sources[{i}]): {e}") from None
            weight = 1.0 if s.get("weight") is None else float(s["weight"])
            out.append(Source(name=name, urls=urls, weight=weight, shards=shard_sizes(urls)))
        if self.mixture == "sqrt":  # InstructBLIP's sampling: weight ~ sqrt(size), a source's own weight overrides
            from blip2_train.data.instruct import mixture_weights

            sizes = {src.name: source_size(cfg["urls"]) for src, cfg in zip(out, self.train_sources_cfg)}
            given = {src.name: cfg.get("weight") for src, cfg in zip(out, self.train_sources_cfg)}
            weights = mixture_weights(sizes, given)
            for src in out:
                src.weight = weights[src.name]
        return out

    def log_sources(self, sources: list[Source]) -> None:
        """One line per source the run trains on: what it names, its shards, samples, weight and share."""
        total = sum(s.weight for s in sources) or 1.0
        for i, (src, cfg) in enumerate(zip(sources, self.train_sources_cfg)):
            samples = sum(n for n, _ in src.shards.values()) if src.shards else count_samples(cfg["urls"])
            known = f"{samples} samples" if samples is not None else "samples unknown (no manifest.json)"
            spec = cfg["urls"]
            where = spec if isinstance(spec, str) else f"{len(spec)} specs from {spec[0]}"
            log.info("training source %r (data.train_sources[%d]): %s: %d shards, %s, weight %g (%.0f%% of batches)",
                     src.name, i, where, len(src.urls), known, src.weight, 100 * src.weight / total)

    def batches_per_epoch(self, world_size: int) -> int:
        n = self.samples_per_epoch
        if n is None:
            counts = [count_samples(s["urls"]) for s in self.train_sources_cfg]
            if any(c is None for c in counts):
                raise ConfigError("data.samples_per_epoch is required when a source has no manifest.json")
            n = sum(counts)
        return max(1, n // (self.batch_size * world_size))

    def instruction_templates(self) -> dict:
        """data.templates, checked (a VQA template needs its {} slot), or the InstructBLIP paper's."""
        from blip2_train.data.instruct import CAPTION_TEMPLATES, VQA_TEMPLATES, check_templates

        cap, vqa = self.templates.get("caption"), self.templates.get("vqa")
        return {"caption_templates": check_templates(CAPTION_TEMPLATES if cap is None else cap, False,
                                                     "data.templates.caption"),
                "vqa_templates": check_templates(VQA_TEMPLATES if vqa is None else vqa, True, "data.templates.vqa")}

    def build_train_stream(self, rank: int, world_size: int, one_pass: bool = False) -> ShardStream:
        sources = self.sources()
        if rank == 0:
            self.log_sources(sources)
        transform = TrainTransform(self.image_size, self.min_scale, 1.0, self.hflip)
        if self.text["kind"] == "instruct":
            from blip2_train.data.instruct import InstructionDecoder

            decoder = InstructionDecoder(transform, self.max_words, jpeg_draft=self.jpeg_draft,
                                         vqa_answers=self.vqa_answers, **self.instruction_templates())
        else:
            decoder = SampleDecoder(transform, self.max_words, jpeg_draft=self.jpeg_draft)
        return ShardStream(
            sources, decoder, self.make_collator(), self.batch_size,
            rank=rank, world_size=world_size, seed=self.seed, resampled=self.resampled and not one_pass,
            shuffle_buffer=self.shuffle_buffer,
            batches_per_epoch=None if one_pass else self.batches_per_epoch(world_size),
            max_skip_rate=self.max_skip_rate, resume_replay=self.resume_replay)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_sources_cfg:
            rank, world = self._rank_world()
            self.train_stream = self.build_train_stream(rank, world)

    def train_dataloader(self) -> DataLoader:
        if self.train_stream is None:
            self.setup("fit")
        if self.train_stream is None:
            raise ConfigError("data.train_sources is empty: nothing to train on")
        self.train_stream.skip_batches = 0
        if self.trainer is not None:
            epoch = self.trainer.current_epoch
            self.train_stream.set_epoch(epoch)
            if self._resume and self._resume["epoch"] == epoch:
                self.train_stream.skip_batches = self._resume_skip(self._resume)
            self._resume = None
        return DataLoader(self.train_stream, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=False, pin_memory=False, worker_init_fn=ignore_ctrl_c,
                          prefetch_factor=4 if self.num_workers > 0 else None)

    # -- exact resume: Lightning stores this in every checkpoint and hands it back before train_dataloader() --

    def loader_shape(self) -> dict:
        """What decides which samples each batch of an epoch holds: a resume is exact only with the same shape."""
        stream = self.train_stream
        return {"world_size": stream.world_size, "num_workers": self.num_workers, "batch_size": self.batch_size,
                "seed": self.seed, "resampled": stream.resampled, "shuffle_buffer": self.shuffle_buffer,
                # shard file names, not paths: moving the data to another filesystem is not a change
                "sources": [{"name": s.name, "weight": s.weight, "shards": len(s.urls),
                             "shard_names": stable_hash(*(os.path.basename(u) for u in s.urls))}
                            for s in stream.sources]}

    def _resume_skip(self, state: dict) -> int:
        """Batches of the resumed epoch to skip on this rank, after checking the loader's shape."""
        done, epoch = int(state["batches_done"]), int(state["epoch"])
        saved, now = state.get("shape"), self.loader_shape()
        if not saved:
            log.warning("resuming epoch %d after %d batches from a checkpoint that does not store the data loader's "
                        "shape (written by an older blip2-train): the position is restored by batch count, but the "
                        "rest of the epoch is not the sample order the interrupted run would have seen", epoch, done)
            return done
        changes = shape_changes(saved, now)
        if not changes:
            log.info("resuming epoch %d after %d batches: reading their samples again without decoding them "
                     "(exact data position)", epoch, done)
            return done
        what = "; ".join(changes)
        if not self.allow_reshuffled_resume:
            raise ResumeShapeError(
                f"the checkpoint's data loader differs from this run's: {what}; a resume is exact only with the same "
                "shape: restore it, or set data.allow_reshuffled_resume=true to continue the epoch in the new "
                "shape's sample order")
        seen = done * saved["batch_size"] * saved["world_size"]
        skip = min(seen // (self.batch_size * now["world_size"]), len(self.train_stream))
        log.warning("data loader changed since the checkpoint (%s): data.allow_reshuffled_resume=true, so epoch %d "
                    "goes on in the new shape's order after its first %d samples (%d batches of %d per rank "
                    "skipped): this epoch may repeat some samples and miss others", what, epoch, seen, skip,
                    self.batch_size)
        return skip

    def state_dict(self) -> dict:
        if self.trainer is None:
            return {}
        # `processed`: a checkpoint written in on_train_batch_end counts the batch just trained (completed does not yet)
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        state = {"epoch": self.trainer.current_epoch, "batches_done": int(done)}
        if self.train_stream is not None:
            state["shape"] = self.loader_shape()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state) if state else None

    # -- evaluation ---------------------------------------------------------------------------------

    def eval_data(self) -> CaptionedImages | VqaQuestions:
        if self._eval_data is None:
            cfg = self.eval_set_cfg
            if not cfg:
                raise ConfigError("data.eval_set is not configured")
            limit = cfg.get("limit")
            if cfg.get("format") in VQA_FORMATS:  # one item per question (VQAv2, OK-VQA, GQA)
                self._eval_data = read_vqa_set(cfg, self.max_words)
            elif cfg.get("shards"):
                self._eval_data = CaptionedImages.from_shards(expand_urls(cfg["shards"]), self.max_words, limit)
            elif cfg.get("annotation"):
                if not cfg.get("image_root"):
                    raise ConfigError("data.eval_set.image_root is required with data.eval_set.annotation")
                self._eval_data = CaptionedImages.from_karpathy(cfg["annotation"], cfg["image_root"],
                                                                self.max_words, limit, cfg.get("format", "karpathy"))
            else:
                raise ConfigError("data.eval_set needs 'annotation' + 'image_root' or 'shards'")
        return self._eval_data

    def eval_image_loader(self, rank: int = 0, world_size: int = 1) -> DataLoader:
        """Images of the eval set, this rank's contiguous share (features are gathered afterwards)."""
        from torch.utils.data import Subset

        from blip2_train.distributed.collectives import shard_range

        ds = EvalImageDataset(self.eval_data(), self.eval_image_size)
        lo, hi = shard_range(len(ds), rank, world_size)
        return DataLoader(Subset(ds, range(lo, hi)), batch_size=self.eval_batch_size, num_workers=min(self.num_workers, 2),
                          collate_fn=collate_eval_images)
