"""FSDP2: per-block `fully_shard` over every rank, as a Lightning strategy.

Why FSDP2 and not Lightning's `FSDPStrategy` (FSDP1): FSDP1 flattens each unit into one tensor of a single dtype,
and BLIP-2's root unit mixes frozen bf16 weights (ViT embeddings, the LLM's embeddings and final norm) with
trainable fp32 ones (`query_tokens`, `language_projection`, the Q-Former's embeddings): it fails with "Must
flatten tensors with uniform dtype". FSDP2 shards each parameter on its own (DTensor), so frozen and trainable,
bf16 and fp32 parameters live in one unit, and `requires_grad` stays per parameter.

Units: one per transformer block of the ViT, the Q-Former and the LLM (classes named in the strategy config),
plus the root (everything else). Checkpoints are torch.distributed.checkpoint directories, written by every rank
in parallel; `blip2-export` consolidates them. Frozen weights are left out of checkpoints (as under DDP and
DeepSpeed), so loading one fills the trainable weights only and checks that all of them are there.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

log = logging.getLogger(__name__)

_MODULES = (
    "transformers.models.blip_2.modeling_blip_2",
    "transformers.models.instructblip.modeling_instructblip",
    "transformers.models.opt.modeling_opt",
    "transformers.models.llama.modeling_llama",
    "transformers.models.t5.modeling_t5",
    "transformers.models.gpt2.modeling_gpt2",
)


def layer_classes(layer_class_names: list[str]) -> tuple[type, ...]:
    """Block class names -> the classes (from the transformers modules BLIP-2 builds on)."""
    found = {}
    for mod_name in _MODULES:
        mod = importlib.import_module(mod_name)
        for name in layer_class_names:
            if hasattr(mod, name):
                found[name] = getattr(mod, name)
    missing = set(layer_class_names) - set(found)
    if missing:
        raise ValueError(f"FSDP block classes not found in transformers: {sorted(missing)}")
    return tuple(found.values())


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name in (None, "null", "none") else getattr(torch, name)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy used as pure data-parallel FSDP2 (data_parallel = world size, no tensor
    parallelism). The LightningModule's `configure_model` calls `parallelize(model)`."""

    def __init__(self, layer_class_names: list[str], param_dtype: str | None = "bfloat16",
                 reduce_dtype: str | None = "float32", reshard_after_forward: bool = True,
                 save_distributed_checkpoint: bool = True, process_group_backend: str | None = None,
                 replicate_degree: int = 1):
        if not save_distributed_checkpoint:  # a full-state file would be written without the frozen weights and
            # then refused by the parent's strict load: one format, consolidated by blip2-export when wanted
            from blip2_train.utils.errors import ConfigError

            raise ConfigError("strategy=fsdp writes sharded checkpoints (save_distributed_checkpoint: true); "
                              "blip2-export consolidates one into a single transformers directory")
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend)
        self.block_classes = layer_classes(list(layer_class_names))
        self.param_dtype, self.reduce_dtype = _dtype(param_dtype), _dtype(reduce_dtype)
        self.reshard_after_forward = reshard_after_forward
        # HSDP: shard within groups of world_size / replicate_degree ranks (a node), replicate across the groups
        # (all-gathers stay on the node's fast links; only the gradient all-reduce crosses nodes)
        self.replicate_degree = int(replicate_degree)

    def _setup_distributed(self) -> None:
        super()._setup_distributed()
        if self._data_parallel_size == "auto":  # the parent's "auto" means one data-parallel group per node
            self._data_parallel_size = self.world_size

    def parallelize(self, model: torch.nn.Module) -> int:
        """fully_shard every block, then the root; -> the number of block units."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = self._sharding_mesh()
        # param_dtype: the dtype parameters are all-gathered and computed in; reduce_dtype: gradients are
        # reduce-scattered in fp32 (the Q-Former's small gradients lose precision in a bf16 reduction)
        mp = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)
        blocks = [m for m in model.modules() if isinstance(m, self.block_classes)]
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=self.reshard_after_forward)
        log.info("FSDP2: %d block units + the root, over %d ranks%s", len(blocks), mesh.size(),
                 f" (HSDP: {mesh.shape[0]} replicas x {mesh.shape[1]} shards)" if mesh.ndim == 2 else "")
        return len(blocks)

    def _sharding_mesh(self):
        """1-D over all ranks (FSDP), or (replicate, shard) for HSDP."""
        from blip2_train.utils.errors import ConfigError

        world = self.world_size
        r = self.replicate_degree
        if r < 1 or world % r:
            raise ConfigError(f"strategy.replicate_degree={r} must be >= 1 and divide the world size {world}")
        if r == 1:
            return self.device_mesh["data_parallel"]
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.root_device.type, (r, world // r), mesh_dim_names=("replicate", "shard"))

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """Sharded saves go to a hidden sibling directory, renamed over `filepath` once every rank's shards and
        the metadata are written: `last.ckpt` is saved over again and again, and a save killed half-way must
        not leave a directory mixing two steps' shards under the old `.metadata` (which looks complete)."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        import os
        import shutil

        path = Path(self.broadcast(str(filepath)))
        tmp = path.parent / self.broadcast(f".{path.name}.tmp-{os.getpid()}")
        if self.global_rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier("fsdp2_save_start")
        super().save_checkpoint(checkpoint, tmp, storage_options=storage_options)
        self.barrier("fsdp2_save_written")
        if self.global_rank == 0:
            old = path.parent / f".{path.name}.tmp-{os.getpid()}-replaced"
            if path.exists():
                path.rename(old)  # two renames: a kill between them leaves no `path`, never a mixed one
            tmp.rename(path)
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        self.barrier("fsdp2_save_done")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Like the parent's, but a checkpoint without the frozen weights loads: the weights it holds are loaded,
        every trainable one must be among them (else one clear error), the frozen ones keep their values."""
        from lightning.fabric.strategies.model_parallel import _is_sharded_checkpoint

        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from blip2_train.utils.errors import CheckpointError

        stored = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
        full = get_model_state_dict(self.model)
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        missing = sorted(n for n in trainable if f"state_dict.{n}" not in stored)
        if missing:
            raise CheckpointError(f"{path}: {len(missing)} trainable weight(s) missing, e.g. {missing[:3]}")
        held = {k: v for k, v in full.items() if f"state_dict.{k}" in stored}
        dcp.load({"state_dict": held}, checkpoint_id=path)
        set_model_state_dict(self.model, held, options=StateDictOptions(strict=False))
        for i, optimizer in enumerate(self.optimizers):
            state = {f"optimizer_{i}": get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state[f"optimizer_{i}"],
                                     options=StateDictOptions(cpu_offload=True))
        from lightning.fabric.strategies.model_parallel import _METADATA_FILENAME

        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
