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

from blip2_train.models.convert import load_hf_weights
from blip2_train.models.vision import CLIP_MEAN, CLIP_STD
from blip2_train.utils.errors import CheckpointError
from blip2_train.utils.io import package_version

EXTRAS = "blip2_train_extras.safetensors"
META = "blip2_train.json"
ADAPTER_DIR = "llm_adapter"
# How an adapter-only export loads in plain transformers + peft (docs/usage.md; a test runs exactly this).
ADAPTER_ONLY_LOADING = """\
import os

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoProcessor, {cls}

config = AutoConfig.from_pretrained(export)
Auto = AutoModelForCausalLM if config.use_decoder_only_language_model else AutoModelForSeq2SeqLM
llm = Auto.from_pretrained(base_llm, dtype=config.text_config.dtype)  # the unchanged base LLM
llm.resize_token_embeddings(config.text_config.vocab_size)             # room for <image> (and added tokens)
rows = f"{{export}}/llm_adapter/new_token_rows.safetensors"            # their trained rows, if the base lacked them
for name, w in (load_file(rows) if os.path.exists(rows) else {{}}).items():
    getattr(llm, f"get_{{name}}")().weight.data[-len(w):] = w
llm = PeftModel.from_pretrained(llm, f"{{export}}/llm_adapter").merge_and_unload()
with torch.device("meta"):                                              # no second copy of the LLM
    model = {cls}(config)
model.language_model = llm
model.load_state_dict(load_file(f"{{export}}/model.safetensors"), strict=False, assign=True)
processor = AutoProcessor.from_pretrained(export)
"""


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
    meta = {"stage": 1, "exporter": f"blip2-train {package_version()}", "bos_token_id": model.bos_token_id,
            "pad_token_id": model.pad_token_id, "ln_vision_eps": model.hf.vision_model.post_layernorm.eps,
            "image_size": image_size}
    (out / META).write_text(json.dumps(meta, indent=1))
    return out


def read_stage1_export_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    d = Path(directory)
    meta = export_meta(d)
    if meta and meta.get("stage") != 1:
        raise CheckpointError(f"{d} is a stage-{meta.get('stage')} export; a stage-1 checkpoint is needed here")
    sd = {"hf." + k: v for k, v in load_hf_weights(d).items()}
    if not any(k.startswith("hf.qformer.") for k in sd):
        raise CheckpointError(f"{d}: no qformer.* weights: not a BLIP-2 checkpoint")
    if any(k.startswith("hf.language_model.") for k in sd):
        raise CheckpointError(f"{d} holds a language model: it is a stage-2 checkpoint, not stage 1")
    if (d / EXTRAS).exists():
        for k, v in load_file(str(d / EXTRAS)).items():
            sd[k] = v.reshape(1) if k == "temp" else v
    return sd


def export_stage2(model, tokenizer, out_dir: str | Path, image_size: int, prompt: str = "",
                  generate_kwargs: dict | None = None, dtype: torch.dtype | None = None,
                  adapter_base: str | None = None) -> Path:
    """A stage-2 model -> a directory `Blip2ForConditionalGeneration` + `Blip2Processor` load and generate from.

    The tokenizer is saved with `<image>` and left padding (batched generation of decoder-only LLMs);
    the processor carries `num_query_tokens`, so `processor(images, text=prompt)` yields exactly the inputs
    the training module generates from. `blip2_train.json` records the prompt and the decoding settings.
    """
    from transformers import Blip2Processor

    out, tok = save_generative(model, tokenizer, out_dir, dtype, adapter_base)
    Blip2Processor(image_processor(image_size), tok, num_query_tokens=model.num_query_tokens).save_pretrained(str(out))
    meta = {"stage": 2, "exporter": f"blip2-train {package_version()}", "image_size": image_size, "prompt": prompt,
            "image_token_id": model.image_token_id, "end_token_id": model.end_token_id,
            "pad_token_id": model.pad_token_id, "encoder_decoder": model.is_encoder_decoder,
            # transformers applies vision_config.layer_norm_eps (the blocks') in post_layernorm as well
            "ln_vision_eps": model.hf.vision_model.post_layernorm.eps,
            "generate_kwargs": dict(generate_kwargs or {}), **adapter_meta(model, adapter_base)}
    (out / META).write_text(json.dumps(meta, indent=1))
    return out


def adapter_meta(model, adapter_base: str | None) -> dict:
    """What blip2_train.json records of the LLM's adapter: merged (its settings, for the record) or apart (also
    the base it goes on)."""
    adapter = getattr(model.llm, "blip2_adapter", None) or getattr(model.llm, "blip2_merged_adapter", None)
    if not adapter:
        return {}
    return {"adapter": {**dict(adapter), "merged": adapter_base is None,
                        **({"base": adapter_base, "dir": ADAPTER_DIR} if adapter_base else {})}}


def export_instruct(model, tokenizer, qformer_tokenizer, out_dir: str | Path, image_size: int,
                    generate_kwargs: dict | None = None, dtype: torch.dtype | None = None,
                    template: str | None = None, adapter_base: str | None = None) -> Path:
    """An instruction-tuned model -> a directory `InstructBlipForConditionalGeneration` + `InstructBlipProcessor`
    load and generate from: `processor(images, text=instructions)` yields exactly the inputs the training module
    generates from (the Q-Former tokenizer under qformer_tokenizer/, the LLM's padding on the left for
    decoder-only LLMs). `blip2_train.json` records the decoding settings and the evaluation template."""
    from transformers import InstructBlipProcessor

    out, tok = save_generative(model, tokenizer, out_dir, dtype, adapter_base)
    qtok = copy.deepcopy(qformer_tokenizer)
    qtok.truncation_side = qtok.init_kwargs["truncation_side"] = "left"  # the reference cuts instructions there
    InstructBlipProcessor(image_processor(image_size), tok, qtok,
                          num_query_tokens=model.num_query_tokens).save_pretrained(str(out))
    meta = {"stage": 3, "exporter": f"blip2-train {package_version()}", "image_size": image_size,
            "image_token_id": model.image_token_id, "end_token_id": model.end_token_id,
            "pad_token_id": model.pad_token_id, "encoder_decoder": model.is_encoder_decoder,
            "ln_vision_eps": model.hf.vision_model.post_layernorm.eps, "max_txt_len": model.max_txt_len,
            "template": template, "generate_kwargs": dict(generate_kwargs or {}), **adapter_meta(model, adapter_base)}
    (out / META).write_text(json.dumps(meta, indent=1))
    return out


def save_generative(model, tokenizer, out_dir: str | Path, dtype: torch.dtype | None,
                    adapter_base: str | None = None):
    """The weights of a stage-2 or instruction-tuned model (cast to `dtype` if given) and its config with each
    part's dtype; -> (the directory, a copy of the LLM tokenizer padded as generation needs: on the left for
    decoder-only LLMs, each row continuing from its last real token).

    `adapter_base` (the base LLM's directory or hub id): the LLM's LoRA adapter is saved apart, as a peft adapter
    under `llm_adapter/` naming that base, and model.safetensors holds every weight but the LLM's (see
    ADAPTER_ONLY_LOADING). Without it an adapter must have been merged first (models.adapters.merge_adapter)."""
    from blip2_train.models.adapters import adapter_files, has_adapter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = model.hf
    if adapter_base is None and has_adapter(hf.language_model):
        raise CheckpointError("the LLM still holds a LoRA adapter: merge it (models.adapters.merge_adapter) or "
                              "export it apart (--adapter-only)")
    if dtype is not None:
        hf = copy.deepcopy(hf).to(dtype)
    if adapter_base is None:
        hf.save_pretrained(str(out))
    else:
        from transformers import AutoConfig

        from blip2_train.models.adapters import NEW_ROWS, new_token_rows

        task = "SEQ_2_SEQ_LM" if model.is_encoder_decoder else "CAUSAL_LM"
        base = AutoConfig.from_pretrained(adapter_base)
        if base.model_type in ("blip-2", "instructblip"):
            raise CheckpointError(f"--adapter-only: the LLM was read from a {base.model_type} directory "
                                  f"({adapter_base}), which no causal-LM loader reads as a base: export merged")
        llm = model.hf.language_model  # as trained (the adapter fp32), not the dtype-cast copy
        conf, tensors = adapter_files(llm, adapter_base, task)
        sd = {k: v for k, v in hf.state_dict().items() if not k.startswith("language_model.")}
        hf.save_pretrained(str(out), state_dict=sd)
        (out / ADAPTER_DIR).mkdir(exist_ok=True)
        (out / ADAPTER_DIR / "adapter_config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(out / ADAPTER_DIR / "adapter_model.safetensors"))
        rows = new_token_rows(llm, base.get_text_config().vocab_size)
        if rows:
            save_file({k: v.to(hf.language_model.get_input_embeddings().weight.dtype) for k, v in rows.items()},
                      str(out / ADAPTER_DIR / NEW_ROWS))
    record_dtypes(out / "config.json", hf)
    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "right" if model.is_encoder_decoder else "left"
    tok.init_kwargs["padding_side"] = tok.padding_side  # what save_pretrained writes
    return out, tok


def record_dtypes(config_json: Path, hf) -> None:
    """config.json names the dtype of the bulk of the weights (the LLM's) and each part its own, so
    `from_pretrained` (dtype "auto") loads a bf16 export in bf16 instead of upcasting billions of frozen
    parameters to fp32, while an fp32 ViT is not rounded."""
    def name(module) -> str:
        return str(next(module.parameters()).dtype).removeprefix("torch.")

    cfg = json.loads(config_json.read_text())
    cfg["dtype"] = name(hf.language_model)
    for sub, module in (("text_config", hf.language_model), ("vision_config", hf.vision_model.encoder),
                        ("qformer_config", hf.qformer)):
        if isinstance(cfg.get(sub), dict):
            cfg[sub]["dtype"] = name(module)
    config_json.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def export_meta(directory: str | Path) -> dict:
    p = Path(directory) / META
    return json.loads(p.read_text()) if p.exists() else {}
