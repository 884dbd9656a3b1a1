"""Who this process is in a launch, and process groups for commands that run without a Lightning Trainer
(blip2-eval): the environment a launcher sets up (torchrun, srun) names the rank, the world and the rendezvous;
each rank gets its own device."""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", os.environ.get("SLURM_PROCID", 0)))) == 0


def launcher_environment():
    """Lightning's description of the launcher that started this process (torchrun or SLURM), or None."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return TorchElasticEnvironment()
    if SLURMEnvironment.detect() and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return SLURMEnvironment()
    return None


def init_distributed(device: str = "auto") -> tuple[torch.device, bool]:
    """Join the launcher's process group (nccl on GPUs, gloo on CPU) and pick this rank's device.

    Returns (device, created): `created` is True when this call made the process group, which the caller then
    destroys with `shutdown_distributed`. One process without a launcher: no process group at all.
    """
    env = launcher_environment()
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    local_rank = env.local_rank() if env is not None else 0
    if cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu" if device == "auto" else device)
    if env is None or env.world_size() <= 1 or dist.is_initialized():
        return dev, False
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{env.main_address}:{env.main_port}",
                            rank=env.global_rank(), world_size=env.world_size())
    log.info("process group: rank %d of %d (%s, %s)", dist.get_rank(), dist.get_world_size(), backend, dev)
    return dev, True


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
