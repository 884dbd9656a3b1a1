"""The frozen language model of stage 2: any local transformers LLM and its tokenizer with `<image>` added.

Decoder-only models load through `AutoModelForCausalLM` (OPT, LLaMA-family, GPT-2, ...), encoder-decoder
models through `AutoModelForSeq2SeqLM` (T5 / FlanT5). No hub: the path must be a local directory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from blip2_train.utils.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
# T5-family models overflow in fp16 (the reference and the paper run FlanT5 in bf16).
NO_FP16 = ("t5", "mt5", "umt5", "longt5")


def require_model_dir(path, what: str) -> Path:
    """A local transformers directory, or one line saying what it is instead (no model hub here)."""
    p = Path(str(path))
    if p.is_file():
        raise CheckpointError(f"{what} {p} is a file, not a transformers directory (a reference .pth holds no LLM: "
                              "point paths.llm_dir at the local LLM directory it was trained with)")
    if not p.is_dir():
        raise CheckpointError(
            f"{what} not found: {p} (no model hub here: save the model with save_pretrained and point at that "
            "local directory, e.g. paths.llm_dir=/ckpt/opt-2.7b)")
    if not (p / "config.json").exists() and what.startswith("LLM"):
        raise CheckpointError(f"{p} has no config.json: not a transformers model directory")
    if what.startswith("LLM") and _is_stage1_export(p):
        raise CheckpointError(f"{what} {p} is a stage-1 export, which holds no LLM: set paths.llm_dir to a local "
                              "LLM directory (or a stage-2 export, which holds one)")
    return p


def _is_stage1_export(p: Path) -> bool:
    from blip2_train.models.export import export_meta

    return export_meta(p).get("stage") == 1


def special_prefix(tokenizer) -> int:
    """How many special tokens the tokenizer puts before a text (LLaMA / OPT: the BOS; T5: none)."""
    with_specials = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_specials.index(plain[0]) if plain and plain[0] in with_specials else 0


def set_special_tokens(tok, special_tokens: dict, where) -> None:
    """`tok.add_special_tokens(special_tokens)`, and a tokenizer whose template puts a BOS in front puts the new
    one there (a fast tokenizer keeps its template's old BOS otherwise, where the reference's slow tokenizer reads
    its bos id at call time)."""
    vocab = tok.get_vocab()
    unknown = {k: v for k, v in special_tokens.items() if k != "pad_token" and v not in vocab}
    if unknown:  # a new bos / eos would be an untrained row of a frozen head: generation would never stop
        raise ConfigError(f"{where}: model.text.special_tokens {unknown} are not in this tokenizer's vocabulary (they "
                          "are the reference's Vicuna tokens): set model.text.special_tokens=null for this LLM's own, "
                          "or ones it has")
    tok.add_special_tokens(dict(special_tokens))
    if "bos_token" in special_tokens and special_prefix(tok) and tok("a")["input_ids"][0] != tok.bos_token_id:
        from tokenizers import processors

        bos = tok.bos_token
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.bos_token_id)])
        if tok("a")["input_ids"][0] != tok.bos_token_id:
            raise ConfigError(f"{where}: the tokenizer does not start texts with the new bos {bos!r} "
                              "(model.text.special_tokens)")


def load_llm_tokenizer(path: str | os.PathLike, padding_side: str = "right", special_tokens: dict | None = None):
    """The LLM's tokenizer with `<image>` as a special token and a pad token (LLaMA-family tokenizers have none:
    we reuse unk, else eos; label masks come from the attention mask, so pad == eos is harmless).
    `special_tokens` are set first (InstructBLIP's `[PAD]` and `</s>`), so their ids are the reference's."""
    from transformers import AddedToken, AutoTokenizer

    p = require_model_dir(path, "LLM tokenizer directory")
    tok = AutoTokenizer.from_pretrained(str(p))
    if special_tokens:
        set_special_tokens(tok, special_tokens, p)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
        if tok.pad_token is None:
            raise CheckpointError(f"{p}: the tokenizer has no pad, unk or eos token to pad with")
    tok.padding_side = padding_side
    return tok


def image_token_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def end_token_id(tokenizer, end_text: str | None) -> int:
    """The id that ends a caption: the tokenizer's eos, or one token spelled `end_text` (OPT: "\\n")."""
    if end_text is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError("the LLM tokenizer has no eos token: set model.end_text")
        return tokenizer.eos_token_id
    ids = tokenizer(end_text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ConfigError(f"model.end_text {end_text!r} is {len(ids)} tokens for this tokenizer; it must be one")
    return ids[0]


def override_config(cfg, overrides: dict | None, where) -> None:
    """Set `overrides` on an LLM config (model.llm_config); a key the config does not have is an error."""
    for k, v in dict(overrides or {}).items():
        if not hasattr(cfg, k):
            raise ConfigError(f"model.llm_config.{k}: {where} ({cfg.model_type}) has no such config attribute")
        setattr(cfg, k, v)


def load_llm(path: str | os.PathLike, dtype: torch.dtype, attn_implementation: str | None = "sdpa",
             config_overrides: dict | None = None, quant: str | None = None):
    """-> the pretrained LLM (decoder-only or encoder-decoder) in `dtype`, its config updated with
    `config_overrides` first; `quant` (int8 | nf4): its Linear layers quantised while loading, computing in
    `dtype` (models/quant.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    p = require_model_dir(path, "LLM directory")
    cfg = AutoConfig.from_pretrained(str(p))
    if cfg.model_type in ("blip-2", "instructblip"):  # a whole (Instruct)BLIP checkpoint (a saved Salesforce/...)
        override_config(cfg.text_config, config_overrides, p)
        return load_llm_from_blip2(p, cfg, dtype, attn_implementation, quant)
    override_config(cfg, config_overrides, p)
    if dtype == torch.float16 and cfg.model_type in NO_FP16:
        raise ConfigError(f"{p} is a {cfg.model_type} model: it overflows in float16; use model.llm_dtype=bfloat16")
    cls = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    qkw = quant_kwargs(quant, dtype)
    try:
        model = cls.from_pretrained(str(p), config=cfg, dtype=dtype, **kw, **qkw)
    except (ValueError, ImportError) as e:  # e.g. an attention implementation this model lacks
        if not kw:
            raise
        log.warning("%s: %s; falling back to the model's default attention", p, str(e).splitlines()[0])
        model = cls.from_pretrained(str(p), config=cfg, dtype=dtype, **qkw)
    return model


def quant_kwargs(quant: str | None, dtype: torch.dtype) -> dict:
    """from_pretrained's arguments for an LLM quantised while it loads (none without `quant`)."""
    if not quant:
        return {}
    from blip2_train.models import quant as q

    return {"quantization_config": q.bnb_config(quant, dtype), "device_map": q.device_map()}


def load_llm_from_blip2(path: Path, cfg, dtype: torch.dtype, attn_implementation: str | None,
                        quant: str | None = None):
    """The `language_model.*` part of a BLIP-2 directory, so `model.llm` may point at a stage-2 export or an
    official BLIP-2 checkpoint directly (evaluation, fine-tuning) without a separate copy of the LLM."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    text = cfg.text_config
    if dtype == torch.float16 and text.model_type in NO_FP16:
        raise ConfigError(f"{path} holds a {text.model_type} LLM: it overflows in float16; use model.llm_dtype=bfloat16")
    if attn_implementation:
        text._attn_implementation = attn_implementation
    cls = AutoModelForCausalLM if cfg.use_decoder_only_language_model else AutoModelForSeq2SeqLM
    # transformers' own loader (meta init, buffers, tied weights), reading language_model.* as the root
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the vision/Q-Former keys are "unexpected" here, by design
    try:
        model, info = cls.from_pretrained(str(path), config=text, dtype=dtype,
                                          key_mapping={r"^language_model\.": ""}, output_loading_info=True,
                                          **quant_kwargs(quant, dtype))
    finally:
        hf_logging.set_verbosity(level)
    if info["missing_keys"]:
        raise CheckpointError(f"{path}: language_model.* weights missing for {sorted(info['missing_keys'])[:3]} "
                              "(a BLIP-2 directory without its LLM?)")
    return model
