"""Everything about a checkpoint on disk: written atomically, checked for truncation, read back into models
(shared by blip2-train, blip2-eval and blip2-export).

Checkpoint files are written through a temporary file in the SAME directory, fsync, then os.replace. Lightning's
default writes through an fsspec transaction whose temporary file lives in the system temp directory; when that
is another filesystem the final move is a copy, and a job killed during it (preemption, OOM killer, time limit)
leaves a truncated `last.ckpt`. A rename within one directory is atomic: a killed save leaves the previous
checkpoint intact, plus a `.NAME.tmp-PID` file that the next save removes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

from blip2_train.utils.errors import CheckpointError
from blip2_train.utils.io import describe_no_space, no_space_error

log = logging.getLogger(__name__)


def read_lightning_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint as one dict: a `.ckpt` file, or a DeepSpeed / FSDP sharded checkpoint directory."""
    p = Path(path)
    if p.is_dir():
        return consolidate_sharded_checkpoint(p)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    return torch.load(p, map_location="cpu", weights_only=False)


def stage_of_keys(keys) -> int:
    """1, 2 or 3 (instruction tuning) from a model's parameter names: stage 2 projects into an LLM, and
    InstructBLIP's Q-Former has its own embeddings (stage 1 keeps them outside it, stage 2 has none)."""
    keys = list(keys)
    if not any(k.startswith(("hf.language_projection.", "hf.language_model.")) for k in keys):
        return 1
    return 3 if any(k.startswith("hf.qformer.embeddings.") for k in keys) else 2


def load_lightning_checkpoint(model, path: str | Path) -> dict:
    """Copy the `model.*` weights of a Lightning checkpoint into `model`; returns the raw checkpoint."""
    p = Path(path)
    ckpt = read_lightning_checkpoint(p)
    sd = {k[len("model."):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("model.")}
    if not sd:
        raise CheckpointError(f"{p}: no model weights (is this a Lightning checkpoint of blip2-train?)")
    own = model.state_dict()
    want = stage_of_keys(own)
    got = ckpt.get("blip2_stage") or stage_of_keys(sd)
    if got != want:
        raise CheckpointError(f"{p} is a stage-{got} checkpoint but the model configured here is stage {want} "
                              f"(stage 2 starts from stage 1 through paths.stage1_checkpoint, instruction tuning "
                              "(stage 3) from stage 2 through paths.stage2_checkpoint)")
    unexpected = [k for k in sd if k not in own]
    if unexpected:
        raise CheckpointError(f"{p} does not fit this model: {len(unexpected)} key(s) have no place, e.g. {unexpected[:3]}")
    # Every blip2-train run trains the Q-Former and its queries (stage 2 also the projection): a checkpoint
    # without one of them would leave it at its initial values, silently. (Parameter names, not state_dict
    # keys: a tied weight is stored under one name.)
    trained_always = ("hf.query_tokens", "hf.qformer.", "hf.language_projection.")
    missing = sorted(n for n, q in model.named_parameters()
                     if q.requires_grad and n.startswith(trained_always) and n not in sd)
    if missing:
        raise CheckpointError(f"{p} lacks {len(missing)} trained weight(s), e.g. {missing[:3]}: an incomplete or "
                              "foreign checkpoint")
    with torch.no_grad():
        for k, v in sd.items():
            if own[k].shape != v.shape:
                raise CheckpointError(f"{p}: {k} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}")
            own[k].copy_(v)
    if ckpt.get("frozen_weights_omitted"):
        log.info("%s holds trainable weights only; frozen weights come from the model config", p)
    return ckpt


def consolidate_sharded_checkpoint(p: Path) -> dict:
    """A DeepSpeed (ZeRO 1-3) or FSDP sharded checkpoint directory -> one Lightning-style checkpoint dict."""
    import tempfile

    if (p / "latest").exists() or any(p.glob("*/mp_rank_*_model_states.pt")):
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "consolidated.ckpt"
            convert_zero_checkpoint_to_fp32_state_dict(str(p), str(out))
            return torch.load(out, map_location="cpu", weights_only=False)
    if (p / "meta.pt").exists() or any(p.glob("*.distcp")):
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "consolidated.ckpt"
            dcp_to_torch_save(str(p), str(out))
            ckpt = torch.load(out, map_location="cpu", weights_only=False)
        meta = p / "meta.pt"
        if meta.exists():  # Lightning keeps the non-tensor state (step, our stage tag) beside the shards
            ckpt.update({k: v for k, v in torch.load(meta, map_location="cpu", weights_only=False).items()
                         if k not in ckpt})
        if "state_dict" not in ckpt and "model" in ckpt:
            ckpt["state_dict"] = {f"model.{k}" if not k.startswith("model.") else k: v for k, v in ckpt["model"].items()}
        return ckpt
    raise CheckpointError(f"{p} is a directory but neither a DeepSpeed nor an FSDP sharded checkpoint")


def run_config_of(checkpoint: str | Path):
    """The resolved config.yaml of the run a checkpoint belongs to (<run>/checkpoints/x.ckpt)."""
    p = Path(checkpoint).resolve()
    for d in (p.parent, p.parent.parent):
        if (d / "config.yaml").exists():
            return OmegaConf.load(d / "config.yaml")
    raise CheckpointError(f"no config.yaml found beside {p} or in its run directory; pass --config")

def save_atomic(checkpoint, path) -> None:
    """torch.save `checkpoint` to `path` atomically (the module docstring says why)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a killed save
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself reaches the disk
        finally:
            os.close(fd)
    except Exception as e:
        full = no_space_error(e)
        if full is None:
            raise
        tmp.unlink(missing_ok=True)  # give back the room the partial file took before looking at what is free
        intact, _ = newest_intact_checkpoint(path.parent.glob("*.ckpt"))
        kept = (f"{intact} is intact: free space, then resume with ckpt_path=auto" if intact else
                "no earlier checkpoint here: free space and start again")
        raise CheckpointError(f"{describe_no_space(full, path)}: this checkpoint was not written; {kept}") from None
    finally:
        tmp.unlink(missing_ok=True)


def newest_intact_checkpoint(paths) -> tuple[Path | None, list[str]]:
    """The newest of `paths` that `checkpoint_problem` finds whole (what ckpt_path=auto takes), and
    "path: problem" for each newer one it passed over."""
    passed_over = []
    for p in sorted(map(Path, paths), key=lambda p: p.stat().st_mtime, reverse=True):
        problem = checkpoint_problem(p)
        if problem is None:
            return p, passed_over
        passed_over.append(f"{p}: {problem}")
    return None, passed_over


def checkpoint_problem(path) -> str | None:
    """None when `path` looks like a whole checkpoint, else why not, without reading the tensors.

    torch.save writes a zip archive whose directory sits at the END of the file: a truncated copy (a crash
    mid-copy, a full disk) has no directory, or members that reach past the end of the file. DeepSpeed
    checkpoints are directories: DeepSpeed writes its `latest` tag file, torch.distributed.checkpoint (FSDP) its
    `.metadata`, after the shards; a directory without it is a save that was cut short.
    """
    import zipfile

    path = Path(path)
    if path.is_dir():
        if not any(path.iterdir()):
            return "empty checkpoint directory"
        if (path / "latest").exists() or (path / ".metadata").exists():
            return None
        return "incomplete sharded checkpoint (no DeepSpeed `latest` tag or distributed-checkpoint `.metadata`)"
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file"
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"truncated (member {info.filename} runs past the end of the file)"
    except zipfile.BadZipFile:
        return "truncated or not a torch checkpoint (no zip directory at its end)"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    return None


def remove_save_debris(directory) -> list[Path]:
    """Delete the `.NAME.tmp-PID` files that killed saves left in `directory`; only call this while no other
    process can be saving there (the run lock is held)."""
    removed = []
    import shutil

    for tmp in Path(directory).glob(".*.tmp-*"):  # files (torch.save) and directories (sharded saves)
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed
