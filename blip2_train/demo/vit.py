"""DEMO STAND-IN for a pretrained image encoder: the tiny ViT of `conf/arch/tiny.yaml`, pretrained for seconds on
the synthetic TRAIN scenes to name what lies in each grid cell (colour, shape, or empty) and which cell each
patch lies in (where: the read-out that lets ITM re-ranking help, docs/itm_at_tiny_size.md), then saved where
`paths.vision_checkpoint` reads a BLIP-2 vision tower (a directory with `vision_model.*` weights).

BLIP-2 freezes an image encoder that was pretrained (EVA-CLIP): its patch features already say what is where,
and the Q-Former learns to read them. A randomly initialised frozen ViT says so only faintly, and a tiny
Q-Former then spends its CPU minutes finding the image at all (ITC stays at chance for ~200 steps). This
stand-in plays the pretrained encoder's part; it never sees a caption, a held-out image or a stage-1 objective.
`data_scripts/pretrain_demo_vit.py` runs it (run_scripts/prepare_synthetic.sh: `<data_dir>/vit`, loaded with
`paths.vision_checkpoint=<data_dir>/vit`); the tests' synthetic world runs it for a few steps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from blip2_train.data.eval_sets import load_eval_image
from blip2_train.demo.world_vqa import grid_size, read_scenes
from blip2_train.data.transforms import EvalTransform

def cell_targets(scenes: list[dict], grid: int, colors: list[str], shapes: list[str]) -> tuple[torch.Tensor, ...]:
    """Per image and cell: colour index (0 = empty) and shape index (0 = empty), [N, grid*grid] each."""
    col = torch.zeros(len(scenes), grid * grid, dtype=torch.long)
    shp = torch.zeros_like(col)
    for i, s in enumerate(scenes):
        for o in s["objects"]:
            cell = o["row"] * grid + o["col"]
            col[i, cell] = 1 + colors.index(o["color"])
            shp[i, cell] = 1 + shapes.index(o["shape"])
    return col, shp


def patch_cells(image_size: int, patch: int, grid: int) -> torch.Tensor:
    """[P] the grid cell holding each patch's centre (row-major), P = (image_size / patch)^2."""
    n = image_size // patch
    centres = (torch.arange(n) + 0.5) * patch
    cell_of = (centres * grid / image_size).long().clamp(max=grid - 1)
    return (cell_of[:, None] * grid + cell_of[None, :]).flatten()


class CellProbe(nn.Module):
    """Linear read-outs of every patch token: the colour and shape of the object in the patch's cell, and which
    cell that is. The last keeps *where* in the output features, as a real pretrained ViT's patch tokens keep it:
    trained on what only, the features let the Q-Former's cross-attention (blind to order) find an object but
    not its position, and ITC and ITM then confuse the same scene with the object moved."""

    def __init__(self, hidden: int, n_colors: int, n_shapes: int, n_cells: int):
        super().__init__()
        self.color, self.shape = nn.Linear(hidden, n_colors + 1), nn.Linear(hidden, n_shapes + 1)
        self.cell = nn.Linear(hidden, n_cells)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.color(tokens), self.shape(tokens), self.cell(tokens)


def pretrain_demo_vit(data_dir: str | Path, out: str | Path, vision_config: dict, steps: int = 300,
                      batch_size: int = 128, lr: float = 2e-3, seed: int = 0, log=print) -> dict:
    """Pretrain the tiny ViT (`vision_config`: conf/arch/tiny.yaml's `arch.vision`) on the train scenes of the
    synthetic world at `data_dir`; save it under `out` (`vision_model.*` safetensors + config.json). -> the
    report written to `out/pretrain.json` (per-patch accuracies on the last tenth of the train images)."""
    from safetensors.torch import save_file
    from transformers import Blip2VisionConfig, Blip2VisionModel

    torch.manual_seed(seed)
    data = Path(data_dir)
    scenes = read_scenes(data, "train")  # train images only: the held-out ones are never seen
    grid = grid_size(scenes)
    colors = sorted({o["color"] for s in scenes for o in s["objects"]})
    shapes = sorted({o["shape"] for s in scenes for o in s["objects"]})
    size, patch = int(vision_config["image_size"]), int(vision_config["patch_size"])
    transform = EvalTransform(size)
    images = torch.stack([load_eval_image(str(data / "coco" / "images" / s["image"]), transform) for s in scenes])
    col, shp = cell_targets(scenes, grid, colors, shapes)
    cells = patch_cells(size, patch, grid)  # [P]
    col_p, shp_p = col[:, cells], shp[:, cells]  # [N, P] targets per patch token

    vit = Blip2VisionModel(Blip2VisionConfig(**vision_config))
    probe = CellProbe(vit.config.hidden_size, len(colors), len(shapes), grid * grid)
    opt = torch.optim.AdamW(list(vit.parameters()) + list(probe.parameters()), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    n_val = max(1, len(images) // 10)  # the last tenth of the train images: how well the probe generalises
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(images) - n_val, (batch_size,), generator=g)
        tokens = vit(pixel_values=images[idx]).last_hidden_state[:, 1:]  # after post_layernorm, CLS dropped
        lc, ls, lp = probe(tokens)
        loss = (F.cross_entropy(lc.flatten(0, 1), col_p[idx].flatten())
                + F.cross_entropy(ls.flatten(0, 1), shp_p[idx].flatten())
                + F.cross_entropy(lp.flatten(0, 1), cells.expand(len(idx), -1).flatten()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps:
            log(f"  ViT step {step}/{steps}: loss {loss.item():.3f}")
    with torch.no_grad():
        vit.eval()
        lc, ls, lp = probe(vit(pixel_values=images[-n_val:]).last_hidden_state[:, 1:])
        acc_c = (lc.argmax(-1) == col_p[-n_val:]).float().mean().item()
        acc_s = (ls.argmax(-1) == shp_p[-n_val:]).float().mean().item()
        acc_p = (lp.argmax(-1) == cells).float().mean().item()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({f"vision_model.{k}": v.contiguous() for k, v in vit.state_dict().items()},
              str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"vision_config": vit.config.to_dict(),
                                                 "demo_stand_in": "tiny ViT pretrained on the synthetic cells"},
                                                indent=1))
    report = {"steps": steps, "seconds": round(time.time() - t0, 1), "held_out_train_images": n_val,
              "patch_color_accuracy": acc_c, "patch_shape_accuracy": acc_s,
              "patch_cell_accuracy": acc_p}
    (out / "pretrain.json").write_text(json.dumps(report, indent=1))
    return report
