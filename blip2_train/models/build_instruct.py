"""Assemble an InstructBLIP model: BLIP-2 weights + the Q-Former's text parts + any local LLM.

Sources, each loaded over the previous one (all optional but one of stage 1 / stage 2 / instruct):
    Q-Former text init : a BERT directory (`text.qformer_tokenizer`, paths.bert_dir): the word and position
                         embeddings and text feed-forwards, as the reference's `init_Qformer` (bert-base-uncased)
    stage-1 source     : a stage-1 export, .ckpt or reference `.pth` (all of the Q-Former, its text parts trained)
    stage-2 source     : a stage-2 export, .ckpt or reference stage-2 `.pth` (ViT, queries, Q-Former query path,
                         projection); its LLM is not read
    instruct source    : an InstructBLIP export of this framework or of transformers (a saved
                         Salesforce/instructblip-vicuna-7b), an instruct .ckpt, or the reference's released
                         `instruct_blip_vicuna7b_trimmed.pth` / `instruct_blip_flanxl_trimmed.pth`
    LLM                : a local transformers directory (LLaMA/Vicuna, OPT, T5/FlanT5, ...)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from blip2_train.models import convert, llm as llm_lib, vision
from blip2_train.models.build_stage1 import (checkpoint_stage, parse_dtype, refuse_other_query_count, wrong_stage)
from blip2_train.models.build_stage2 import (check_adapted_llm, check_low_memory, enable_activation_checkpointing,
                                             finish_llm_side, read_stage1_source)
from blip2_train.models.instruct import InstructBlip
from blip2_train.utils.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

INSTRUCT_KEY = "the instruct checkpoint (model.instruct_checkpoint)"


# --- tokenizers --------------------------------------------------------------------------------------------


def load_instruct_tokenizer(path: str | os.PathLike, special_tokens: dict | None = None):
    """The LLM tokenizer with the special tokens of `special_tokens` set, as the reference's `Blip2VicunaInstruct`
    does (pad `[PAD]`, a new token; bos, eos and unk `</s>`), then `<image>`."""
    return llm_lib.load_llm_tokenizer(path, special_tokens=special_tokens)


def load_qformer_text_tokenizer(path: str | os.PathLike):
    """The Q-Former's BERT tokenizer with `[DEC]` (30523 tokens for bert-base-uncased, the reference's vocab)."""
    from blip2_train.models.tokenizer import load_qformer_tokenizer

    return load_qformer_tokenizer(path)


# --- the transformers shell ----------------------------------------------------------------------------------


def build_instruct_hf(vision_cfg: dict, qformer_cfg: dict, llm_model, num_query_tokens: int, image_token_id: int,
                      end_token_id: int, pad_token_id: int, qformer_vocab_size: int, attn_implementation: str | None):
    """An `InstructBlipForConditionalGeneration` around an already-loaded LLM (not re-initialised)."""
    from transformers import (InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipQFormerConfig,
                              InstructBlipVisionConfig)
    from transformers.models.instructblip.modeling_instructblip import InstructBlipQFormerModel, InstructBlipVisionModel

    vcfg = InstructBlipVisionConfig(**dict(vision_cfg))
    q = {k: v for k, v in dict(qformer_cfg).items() if k != "use_qformer_text_input"}
    qcfg = InstructBlipQFormerConfig(**{**q, "encoder_hidden_size": vcfg.hidden_size, "vocab_size": qformer_vocab_size})
    text = llm_model.config.to_dict()
    text.update(eos_token_id=end_token_id, pad_token_id=pad_token_id)
    cfg = InstructBlipConfig(vision_config=vcfg.to_dict(), qformer_config=qcfg.to_dict(), text_config=text,
                             num_query_tokens=num_query_tokens, image_token_index=image_token_id)
    if attn_implementation:
        vision.set_attention(cfg, attn_implementation)
    with torch.device("meta"):  # no throwaway init of the LLM
        hf = InstructBlipForConditionalGeneration(cfg)
    hf.vision_model = InstructBlipVisionModel._from_config(cfg.vision_config)
    hf.qformer = InstructBlipQFormerModel._from_config(cfg.qformer_config)
    hf.query_tokens = torch.nn.Parameter(torch.randn(1, num_query_tokens, qcfg.hidden_size) * qcfg.initializer_range)
    text_cfg = llm_model.config.get_text_config() if hasattr(llm_model.config, "get_text_config") else llm_model.config
    hf.language_projection = torch.nn.Linear(qcfg.hidden_size, text_cfg.hidden_size)
    hf.language_model = llm_model
    still_meta = [n for n, p in hf.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(f"uninitialised parameters after assembly: {still_meta[:5]}")
    hf.language_model.config.eos_token_id = end_token_id
    hf.language_model.generation_config.eos_token_id = end_token_id
    hf.language_model.generation_config.pad_token_id = pad_token_id
    return hf


# --- weights -------------------------------------------------------------------------------------------------


def qformer_text_from_bert(bert_dir, num_layers: int) -> dict[str, torch.Tensor]:
    """bert-base-uncased -> the Q-Former's text parts under InstructBLIP names (word and position embeddings,
    embedding LayerNorm, self-attention and text feed-forward of each layer; no cross-attention)."""
    sd = convert.load_hf_weights(bert_dir)
    sd = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in sd.items()}
    ours = {}
    for k, v in sd.items():
        name = convert.bert_key_to_qformer(k)
        if name is not None and ".crossattention." not in name:
            ours[name[len("hf."):]] = v
    mapped, _ = convert.blip2_to_instruct(ours)
    layers = {k.split(".")[3] for k in mapped if k.startswith("qformer.encoder.layer.")}
    if len(layers) != num_layers:
        raise CheckpointError(f"{bert_dir}: BERT has {len(layers)} layers, the Q-Former config {num_layers}")
    return mapped


def fit_vocab(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """BERT's 30522 word embeddings into the Q-Former's 30523 (`[DEC]` added): the new row keeps its init, as
    the reference's `resize_token_embeddings`."""
    key = "qformer.embeddings.word_embeddings.weight"
    if key in sd and sd[key].shape[0] < own[key].shape[0]:
        fresh = own[key].clone()
        fresh[: sd[key].shape[0]] = sd[key]
        sd[key] = fresh


def read_blip2_source(source, stage: int, model: InstructBlip) -> dict[str, torch.Tensor]:
    """A stage-1 or stage-2 result -> InstructBLIP names (the stage-1 heads dropped). A reference stage-2 .pth
    must have been trained into this LLM family (its opt_proj / t5_proj)."""
    from blip2_train.models.build_stage2 import read_stage2_source, reference_stage2_weights

    if stage == 1:
        sd = read_stage1_source(source)
    else:
        sd, ref = read_stage2_source(source)
        if sd is None:
            sd = reference_stage2_weights(Path(str(source)), ref, model)
    mapped, _ = convert.blip2_to_instruct(sd)
    return mapped


def read_instruct_source(source) -> dict[str, torch.Tensor]:
    """An InstructBLIP result (export directory, .ckpt, or reference .pth) -> InstructBLIP names, no LLM."""
    from blip2_train.utils.checkpoints import read_lightning_checkpoint

    src = Path(str(source))
    if src.is_dir() and src.suffix != ".ckpt":
        sd = convert.load_hf_weights(src)
        if "qformer.embeddings.layernorm.weight" not in sd:
            raise CheckpointError(f"{src}: not an InstructBLIP checkpoint (no qformer.embeddings.*)")
        return {k: v for k, v in sd.items() if not k.startswith("language_model.")}
    ckpt = read_lightning_checkpoint(src)
    if "state_dict" in ckpt:
        sd = {k[len("model.hf."):]: v for k, v in ckpt["state_dict"].items()
              if k.startswith("model.hf.") and not k.startswith("model.hf.language_model.")}
        if not sd:
            raise CheckpointError(f"{src}: no InstructBLIP weights (model.hf.*) in this checkpoint")
        return sd
    ref = ckpt.get("model", ckpt)
    mapped, unmatched = convert.reference_stage2_to_ours(ref)
    if unmatched:
        raise CheckpointError(f"{src}: {len(unmatched)} key(s) fit nowhere in InstructBLIP: {unmatched[:8]}")
    out, dropped = convert.blip2_to_instruct({k[len("hf."):]: v for k, v in mapped.items()})
    if dropped:
        raise CheckpointError(f"{src}: {len(dropped)} key(s) fit nowhere in InstructBLIP: {dropped[:8]}")
    return out


def load_weights(model: InstructBlip, sd: dict[str, torch.Tensor], what: str) -> list[str]:
    """Copy `sd` into model.hf (position embeddings fitted to the image size) -> keys not covered."""
    own = model.hf.state_dict()
    refuse_other_query_count(sd.get("query_tokens"), own["query_tokens"], what)
    vision.fit_position_embedding(sd, "vision_model.embeddings.position_embedding",
                                  own["vision_model.embeddings.position_embedding"])
    fit_vocab(sd, own)
    missing = convert.load_into(model.hf, sd, what, allow_missing=("language_model.",))
    log.info("loaded %d tensors from %s", len(sd), what)
    return missing


def check_source(source, stage: int, key: str) -> None:
    """The checkpoint exists and is of the stage `key` takes, told before anything is read from it."""
    src = Path(str(source))
    if not src.exists():
        raise CheckpointError(f"checkpoint not found: {src} ({key})")
    got = checkpoint_stage(src)
    if got is not None and got != stage:
        raise wrong_stage(src, got, key, want=stage)


# --- the builder ---------------------------------------------------------------------------------------------


def build_instruct_model(
    llm: str,
    vision: dict,
    qformer: dict,
    text: dict,
    num_query_tokens: int = 32,
    llm_dtype: str = "bfloat16",
    freeze_vision: bool = True,
    vision_dtype: str = "float32",
    stage1_checkpoint: str | None = None,
    stage2_checkpoint: str | None = None,
    instruct_checkpoint: str | None = None,
    vision_checkpoint: str | None = None,
    qformer_text_init: str | None = None,
    ln_vision_eps: float | None = None,
    llm_config: dict | None = None,
    llm_dropout: bool = False,
    activation_checkpointing: dict | None = None,
    attn_implementation: str | None = "sdpa",
    llm_attn_implementation: str | None = "sdpa",
    seed: int | None = None,
    compile_qformer: bool = False,
    tokenizer: str | None = None,
    adapter: dict | None = None,
    freeze_llm: bool = True,
    llm_quant: str | None = None,
    vision_quant: str | None = None,
) -> InstructBlip:
    """The `_target_` of `conf/model/instruct_*.yaml`. `text` is the data side's node (data.text): its
    `qformer_tokenizer` and `special_tokens` decide both vocabularies. `tokenizer` is read by the data side.
    `adapter`, `freeze_llm`, `llm_quant`, `vision_quant`: as stage 2's (build_stage2.build_stage2_model)."""
    llm_quant = check_low_memory(adapter, freeze_llm, llm_quant, vision_quant, freeze_vision, llm_dtype)
    adapter_source = None
    for src in (stage2_checkpoint, instruct_checkpoint):  # the later source's LLM is the one built on
        if src:
            adapter_source = check_adapted_llm(src, llm, adapter) or adapter_source
    text = dict(text)
    sources = {1: stage1_checkpoint, 2: stage2_checkpoint, 3: instruct_checkpoint}
    keys = {1: "paths.stage1_checkpoint", 2: "paths.stage2_checkpoint", 3: "model.instruct_checkpoint"}
    for stage, src in sources.items():
        if src:
            check_source(src, stage, keys[stage])
    llm_lib.require_model_dir(llm, "LLM directory")
    if seed is not None:
        torch.manual_seed(seed)
    tok = load_instruct_tokenizer(tokenizer or llm, text.get("special_tokens"))
    qtok_dir = text.get("qformer_tokenizer")
    if not qtok_dir:
        raise ConfigError("model.text.qformer_tokenizer is required: the Q-Former's BERT tokenizer directory "
                          "(paths.bert_dir)")
    qtok = load_qformer_text_tokenizer(qtok_dir)
    qtok.truncation_side = "left"  # the reference's init_tokenizer(truncation_side="left")
    lm = llm_lib.load_llm(llm, parse_dtype(llm_dtype), llm_attn_implementation, llm_config, llm_quant)
    if len(tok) > lm.get_input_embeddings().weight.shape[0]:
        # room for <image> and [PAD]: the reference's resize (new rows never read as inputs of a target)
        lm.resize_token_embeddings(len(tok), mean_resizing=False)
    image_id = llm_lib.image_token_id(tok)
    end_id = llm_lib.end_token_id(tok, text.get("end_text"))
    hf = build_instruct_hf(vision, qformer, lm, num_query_tokens, image_id, end_id, tok.pad_token_id, len(qtok),
                           attn_implementation)
    model = InstructBlip(hf, image_id, end_id, tok.pad_token_id, freeze_vision=False, llm_dropout=llm_dropout,
                         freeze_llm=freeze_llm)
    # generation builds its own inputs (evaluation, blip2-generate, the API): the Q-Former's tokenizer and limit
    model.qformer_tokenizer, model.max_txt_len = qtok, int(text.get("max_txt_len") or 128)
    if ln_vision_eps is not None:
        model.hf.vision_model.post_layernorm.eps = float(ln_vision_eps)
    text_init = qformer_text_init or qtok_dir
    covered: set[str] = set()
    if vision_checkpoint:  # first: a stage-1/2/instruct source's trained ln_vision then lands over its own
        from blip2_train.models.build_stage1 import init_vision_from

        init_vision_from(model, vision_checkpoint)
        covered |= {k for k in model.hf.state_dict() if k.startswith("vision_model.")}
    if not (instruct_checkpoint or stage1_checkpoint):  # a stage-2 start: its Q-Former has no text parts
        sd = qformer_text_from_bert(text_init, model.hf.config.qformer_config.num_hidden_layers)
        load_weights(model, sd, f"the Q-Former's text parts from {text_init}")
        covered |= set(sd)
    for stage in (1, 2):
        if sources[stage]:
            sd = read_blip2_source(sources[stage], stage, model)
            load_weights(model, sd, f"stage-{stage} weights from {sources[stage]}")
            covered |= set(sd)
    if instruct_checkpoint:
        sd = read_instruct_source(instruct_checkpoint)
        load_weights(model, sd, f"InstructBLIP weights from {instruct_checkpoint}")
        covered |= set(sd)
    if not any(sources.values()):
        log.warning("no stage-1, stage-2 or instruct checkpoint: the Q-Former starts from its BERT init and the "
                    "projection from random init (smoke tests only)")
    elif not any(k.startswith("vision_model.encoder.") for k in covered):
        raise CheckpointError(f"none of {[s for s in sources.values() if s]} holds the ViT (the reference saves only "
                              "trained weights): give it as model.vision_checkpoint or paths.stage1_checkpoint")
    model.freeze_vision, model.vision_dtype = freeze_vision, parse_dtype(vision_dtype)
    finish_llm_side(model, adapter, vision_quant, adapter_source)
    enable_activation_checkpointing(model, activation_checkpointing)
    if compile_qformer:
        model.hf.qformer.compile()
    return model
