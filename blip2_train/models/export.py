"""Export a stage-1 model as a transformers `Blip2ForImageTextRetrieval` directory, and read it back.

Layout of an export directory
- `config.json`, `model.safetensors`: `Blip2ForImageTextRetrieval.from_pretrained(dir)` loads them.
- tokenizer files, `preprocessor_config.json`, `processor_config.json`: `Blip2Processor.from_pretrained(dir)`.
- `blip2_train_extras.safetensors`: what transformers has no place for (the Q-Former LM head `lm_head.*`, the
  ITC temperature `temp`), so training can resume from an export.
- `blip2_train.json`: stage, token ids and the exporter's version.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from blip2_train import __version__
from blip2_train.data.transforms import CLIP_MEAN, CLIP_STD
from blip2_train.models.convert import load_hf_weights
from blip2_train.utils.errors import CheckpointError

EXTRAS = "blip2_train_extras.safetensors"
META = "blip2_train.json"


def image_processor(image_size: int):
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    from PIL import Image

    return BlipImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=list(CLIP_MEAN),
                                 image_std=list(CLIP_STD), resample=Image.BICUBIC, do_convert_rgb=True)


def export_stage1(model, tokenizer, out_dir: str | Path, image_size: int, dtype: torch.dtype = torch.float32) -> Path:
    from transformers import Blip2ForImageTextRetrieval, Blip2Processor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = Blip2ForImageTextRetrieval(model.config)
    hf.load_state_dict({k: v.to(dtype) for k, v in model.hf.state_dict().items()})
    hf.to(dtype).save_pretrained(str(out))
    # Blip2Processor adds an <image> token to the tokenizer IN PLACE: give it a copy.
    Blip2Processor(image_processor(image_size), copy.deepcopy(tokenizer), num_query_tokens=None).save_pretrained(str(out))
    extras = {k: v.detach().to(dtype).contiguous().clone() for k, v in model.state_dict().items()
              if k.startswith("lm_head.") and ".decoder." not in k}
    extras["temp"] = model.temp.detach().to(torch.float32).reshape(1).clone()
    save_file(extras, str(out / EXTRAS))
    meta = {"stage": 1, "exporter": f"blip2-train {__version__}", "bos_token_id": model.bos_token_id,
            "pad_token_id": model.pad_token_id, "ln_vision_eps": model.hf.vision_model.post_layernorm.eps,
            "image_size": image_size}
    (out / META).write_text(json.dumps(meta, indent=1))
    return out


def read_stage1_export_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    d = Path(directory)
    meta_path = d / META
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("stage") != 1:
            raise CheckpointError(f"{d} is a stage-{meta.get('stage')} export; a stage-1 checkpoint is needed here")
    sd = {"hf." + k: v for k, v in load_hf_weights(d).items()}
    if not any(k.startswith("hf.qformer.") for k in sd):
        raise CheckpointError(f"{d}: no qformer.* weights: not a BLIP-2 checkpoint")
    if any(k.startswith("hf.language_model.") for k in sd):
        raise CheckpointError(f"{d} holds a language model: it is a stage-2 checkpoint, not stage 1")
    if (d / EXTRAS).exists():
        for k, v in load_file(str(d / EXTRAS)).items():
            sd[k] = v.reshape(()) if k == "temp" else v
    return sd
