"""Assemble a stage-2 model: stage-1 weights (vision, ln_vision, queries, Q-Former) + any local LLM.

    stage-1 source  : a stage-1 export directory, a stage-1 Lightning checkpoint (its run's config.yaml is
                      read to rebuild the model), or an official reference `.pth` (blip2_pretrained.pth)
    stage-2 source  : (optional, loaded last) a stage-2 export directory, a stage-2 Lightning checkpoint, or a
                      reference stage-2 `.pth` (blip2_pretrained_opt2.7b.pth: opt_proj / t5_proj, no LLM)
    LLM             : a local transformers directory (OPT, LLaMA-family, GPT-2, T5/FlanT5, ...)

The Q-Former's text-only parts (text FFNs, word/position embeddings, ITM/ITC heads, LM head, temp) are
dropped, as in the reference; `language_projection` starts fresh.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from blip2_train.models import convert, llm as llm_lib, vision
from blip2_train.models.adapters import adapter_kind, apply_adapter
from blip2_train.models.build_stage1 import (checkpoint_stage, parse_dtype, refuse_other_query_count,
                                             refuse_other_shapes, tower_shapes, wrong_stage)
from blip2_train.models.stage2 import Blip2Stage2
from blip2_train.utils.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

STAGE1_PARTS = ("vision_model.", "query_tokens", "qformer.")
STAGE2_KEY = "the stage-2 checkpoint (paths.stage2_checkpoint)"


def read_stage1_source(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """-> transformers-named stage-1 weights (`vision_model.*`, `query_tokens`, `qformer.*`, ...)."""
    src = Path(str(source))
    if src.suffix == ".ckpt" and src.exists():  # a Lightning checkpoint: a file or a DeepSpeed/FSDP directory
        from hydra.utils import instantiate

        from blip2_train.utils.checkpoints import load_lightning_checkpoint, run_config_of

        cfg = run_config_of(src)
        if "Stage2" in str(cfg.module.get("_target_", "")):
            raise wrong_stage(src, 2, "paths.stage1_checkpoint")
        if "Stage1" not in str(cfg.module.get("_target_", "")):
            raise CheckpointError(f"{src} is a checkpoint of {cfg.module.get('_target_')}, not a stage-1 run")
        model = instantiate(cfg.model)
        load_lightning_checkpoint(model, src)
        sd = model.state_dict()
    elif src.is_dir():
        from blip2_train.models.export import read_stage1_export_weights

        if checkpoint_stage(src) == 2:
            raise wrong_stage(src, 2, "paths.stage1_checkpoint")
        sd = read_stage1_export_weights(src)
    elif src.is_file():
        sd, unmatched = convert.reference_to_ours(convert.load_reference_pth(src))
        if unmatched:
            if any(k.startswith(("opt_", "t5_", "llm_")) for k in unmatched):
                raise wrong_stage(src, 2, "paths.stage1_checkpoint")
            raise CheckpointError(f"{src}: {len(unmatched)} key(s) match nothing in BLIP-2 stage 1: {unmatched[:8]}")
    else:
        raise CheckpointError(f"stage-1 checkpoint not found: {src}")
    return {k[len("hf."):]: v for k, v in sd.items() if k.startswith("hf.")}


def stage1_weights_for_stage2(sd: dict[str, torch.Tensor], model,
                              what: str = "the stage-1 checkpoint") -> dict[str, torch.Tensor]:
    """Keep what stage 2 uses; a stage-1 Q-Former's text FFNs have no place in stage 2 (dropped)."""
    own = model.hf.state_dict()
    refuse_other_query_count(sd.get("query_tokens"), own["query_tokens"], what)
    keep = {k: v for k, v in sd.items() if k.startswith(STAGE1_PARTS) and k in own}
    dropped = [k for k in sd if k.startswith(STAGE1_PARTS) and k not in own]
    if dropped and not all(".intermediate." in k or ".output." in k for k in dropped):
        raise CheckpointError(f"stage-1 weights that fit nothing in stage 2: {dropped[:5]}")
    vision.fit_position_embedding(keep, "vision_model.embeddings.position_embedding",
                                  own["vision_model.embeddings.position_embedding"])
    return keep


def build_stage2_hf(vision_cfg: dict, qformer_cfg: dict, llm_model, num_query_tokens: int, image_token_id: int,
                    end_token_id: int, pad_token_id: int, attn_implementation: str | None):
    """A `Blip2ForConditionalGeneration` around an already-loaded LLM (the LLM is not re-initialised)."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig)
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2VisionModel

    vcfg = Blip2VisionConfig(**dict(vision_cfg))
    # No text input in stage 2: the unused text FFNs would otherwise break DDP (parameters without gradient).
    qcfg = Blip2QFormerConfig(**{**dict(qformer_cfg), "use_qformer_text_input": False,
                                 "encoder_hidden_size": vcfg.hidden_size})
    text = llm_model.config.to_dict()
    # Generation from the export must stop where training put the end of a caption (OPT: "\n").
    text.update(eos_token_id=end_token_id, pad_token_id=pad_token_id)
    cfg = Blip2Config(vision_config=vcfg.to_dict(), qformer_config=qcfg.to_dict(), text_config=text,
                      num_query_tokens=num_query_tokens, image_token_index=image_token_id)
    if attn_implementation:
        from blip2_train.models.vision import set_attention

        set_attention(cfg, attn_implementation)
    # Build the shell on the meta device (no throwaway init of a multi-billion-parameter LLM), then put real
    # modules in: the small parts freshly initialised, the LLM as loaded.
    with torch.device("meta"):
        hf = Blip2ForConditionalGeneration(cfg)
    hf.vision_model = Blip2VisionModel._from_config(cfg.vision_config)
    hf.qformer = Blip2QFormerModel._from_config(cfg.qformer_config)
    hf.query_tokens = torch.nn.Parameter(
        torch.randn(1, num_query_tokens, qcfg.hidden_size) * qcfg.initializer_range)
    hf.language_projection = torch.nn.Linear(qcfg.hidden_size, llm_model.config.get_text_config().hidden_size
                                             if hasattr(llm_model.config, "get_text_config")
                                             else llm_model.config.hidden_size)
    hf.language_model = llm_model
    still_meta = [n for n, p in hf.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(f"uninitialised parameters after assembly: {still_meta[:5]}")
    hf.language_model.config.eos_token_id = end_token_id
    hf.language_model.generation_config.eos_token_id = end_token_id
    hf.language_model.generation_config.pad_token_id = pad_token_id
    return hf


def check_reference_llm(src, family: str, llm_type: str, llm_key: str = "paths.llm_dir") -> None:
    """A reference stage-2 file was trained into one LLM family (`opt_proj` / `t5_proj`): refuse another.
    `llm_key`: where the user gave the LLM."""
    if (family == "t5") != (llm_type in llm_lib.NO_FP16) or (family == "opt" and llm_type != "opt"):
        raise CheckpointError(f"{src} holds {family}_proj.* (the reference's {family.upper()} stage 2) but model.llm "
                              f"is of model_type {llm_type}: set {llm_key} to the LLM it was trained with")


def reference_stage2_weights(src: Path, ref: dict[str, torch.Tensor], model: Blip2Stage2) -> dict[str, torch.Tensor]:
    """A reference stage-2 state dict (`blip2_pretrained_opt2.7b.pth`, `blip2_caption_flant5xl.pth`, ...) ->
    transformers names, after checking it is stage 2 and was trained into this kind of LLM."""
    family = convert.reference_projection_family(ref)
    if family is None:
        if any(k.startswith(convert.STAGE1_ONLY) for k in ref):
            raise wrong_stage(src, 1, STAGE2_KEY)
        raise CheckpointError(f"{src}: no stage-2 weights (neither the reference's opt_proj.* / t5_proj.* nor a "
                              "blip2-train checkpoint's model.hf.*)")
    check_reference_llm(src, family, model.llm.config.model_type)
    mapped, unmatched = convert.reference_stage2_to_ours(ref)
    stray = unmatched + [k for k in mapped if not k.startswith("hf.")]
    if stray:
        raise CheckpointError(f"{src}: {len(stray)} key(s) match nothing in BLIP-2 stage 2: {stray[:8]}")
    return {k[len("hf."):]: v for k, v in mapped.items()}


def read_stage2_source(source: str | os.PathLike) -> tuple[dict[str, torch.Tensor] | None, dict | None]:
    """-> (vision, Q-Former, queries and projection of a stage-2 result under transformers names, the LLM left
    out, from an export directory (e.g. a saved Salesforce/blip2-opt-2.7b) or a stage-2 .ckpt; None) or
    (None, the state dict of a reference .pth, whose names and checks are `reference_stage2_weights`')."""
    from blip2_train.utils.checkpoints import read_lightning_checkpoint

    src = Path(str(source))
    if src.is_dir() and src.suffix != ".ckpt":  # an export (a .ckpt directory is a sharded checkpoint)
        from blip2_train.models.export import export_meta

        if export_meta(src).get("stage") == 1:
            raise wrong_stage(src, 1, STAGE2_KEY)
        sd = {k: v for k, v in convert.load_hf_weights(src).items() if not k.startswith("language_model.")}
        if "language_projection.weight" not in sd:
            raise CheckpointError(f"{src} has no language_projection: not a stage-2 (Blip2ForConditionalGeneration) "
                                  "checkpoint")
        return sd, None
    ckpt = read_lightning_checkpoint(src)
    if "state_dict" not in ckpt:  # a plain state dict: the reference's layout
        return None, ckpt.get("model", ckpt)
    if ckpt.get("blip2_stage") == 1:
        raise wrong_stage(src, 1, STAGE2_KEY)
    sd = {k[len("model.hf."):]: v for k, v in ckpt.get("state_dict", {}).items()
          if k.startswith("model.hf.") and not k.startswith("model.hf.language_model.")}
    if not sd:
        raise CheckpointError(f"{src}: no stage-2 weights (model.hf.*) in this checkpoint")
    return sd, None


def load_stage2_weights(model: Blip2Stage2, source: str | os.PathLike, vision_loaded: bool = False) -> None:
    """Vision, Q-Former, queries and projection of a stage-2 result (export directory, e.g. a saved
    Salesforce/blip2-opt-2.7b, a stage-2 .ckpt, or a reference stage-2 .pth). The LLM stays the one loaded
    from model.llm. `vision_loaded`: the ViT already came from elsewhere (a reference .pth may lack it)."""
    src = Path(str(source))
    sd, ref = read_stage2_source(src)
    if sd is None:
        return load_reference_stage2(model, src, ref, vision_loaded)
    _load_fitted(model, sd, src)
    log.info("loaded %d stage-2 tensors from %s", len(sd), src)


def load_reference_stage2(model: Blip2Stage2, src: Path, ref: dict, vision_loaded: bool) -> None:
    sd = reference_stage2_weights(src, ref, model)
    tower = ("vision_model.embeddings.", "vision_model.encoder.")
    missing = _load_fitted(model, sd, src)
    if vision_loaded:
        missing = [k for k in missing if not k.startswith(tower)]
    if any(k.startswith(tower) for k in missing):
        raise CheckpointError(f"{src} holds no visual_encoder.* (the reference saves only trained weights): give "
                              "the ViT as model.vision_checkpoint")
    if missing:
        raise CheckpointError(f"{src} lacks stage-2 weights for {missing[:5]}")
    log.info("loaded %d reference stage-2 tensors from %s", len(sd), src)


def _load_fitted(model: Blip2Stage2, sd: dict[str, torch.Tensor], src) -> list[str]:
    """Load into model.hf (position embeddings resized to the configured image size); -> keys not covered."""
    own = model.hf.state_dict()
    refuse_other_query_count(sd.get("query_tokens"), own["query_tokens"], f"the stage-2 checkpoint {src}")
    vision.fit_position_embedding(sd, "vision_model.embeddings.position_embedding",
                                  own["vision_model.embeddings.position_embedding"])
    return convert.load_into(model.hf, sd, f"stage-2 weights from {src}", allow_missing=("language_model.",))


def check_stage1_source(source) -> None:
    """The stage-1 checkpoint of a stage-2 model exists and is not a stage-2 result."""
    src = Path(str(source))
    if not src.exists():
        raise CheckpointError(f"stage-1 checkpoint not found: {src} (paths.stage1_checkpoint)")
    stage = checkpoint_stage(src)
    if stage in (2, 3):
        raise wrong_stage(src, stage, "paths.stage1_checkpoint", want=1)


def check_stage2_source(source) -> None:
    """The stage-2 checkpoint exists and is not a stage-1 or instruction-tuned result, told before anything is
    read from it."""
    src = Path(str(source))
    if not src.exists():
        raise CheckpointError(f"stage-2 checkpoint not found: {src} (paths.stage2_checkpoint)")
    stage = checkpoint_stage(src)
    if stage in (1, 3):
        raise wrong_stage(src, stage, STAGE2_KEY, want=2)


def enable_activation_checkpointing(model: Blip2Stage2, parts: dict | None) -> None:
    """`parts`: {vision, qformer, llm: bool}. Recompute activations in the backward to save memory."""
    parts = dict(parts or {})
    unknown = set(parts) - {"vision", "qformer", "llm"}
    if unknown:
        raise ConfigError(f"model.activation_checkpointing: unknown part(s) {sorted(unknown)}")
    modules = {"vision": model.hf.vision_model, "qformer": model.hf.qformer, "llm": model.llm}
    for name, on in parts.items():
        if on:
            m = modules[name]
            if hasattr(m, "activation_checkpointing_enable"):
                m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_stage2_model(
    llm: str,
    vision: dict,
    qformer: dict,
    num_query_tokens: int = 32,
    llm_dtype: str = "bfloat16",
    freeze_vision: bool = True,
    vision_dtype: str = "float32",
    end_text: str | None = None,
    stage1_checkpoint: str | None = None,
    vision_checkpoint: str | None = None,
    stage2_checkpoint: str | None = None,
    ln_vision_eps: float | None = None,
    llm_config: dict | None = None,
    llm_dropout: bool = False,
    activation_checkpointing: dict | None = None,
    attn_implementation: str | None = "sdpa",
    llm_attn_implementation: str | None = "sdpa",
    seed: int | None = None,
    compile_qformer: bool = False,
    text: dict | None = None,
    tokenizer: str | None = None,
    adapter: dict | None = None,
    freeze_llm: bool = True,
    llm_quant: str | None = None,
    vision_quant: str | None = None,
) -> Blip2Stage2:
    """The `_target_` of `conf/model/stage2_*.yaml`. `text` (prompt, end_text, prefix_lm, label rules) is the data
    side's (data.text); the model takes its `end_text`, where generation stops. `tokenizer` is read by the data side.
    `ln_vision_eps`: eps of the ViT's final LayerNorm (the reference's ln_vision, 1e-5) where it differs from the
    blocks' (1e-6); None = the blocks'. `llm_dropout`: the frozen LLM's dropout on during training (the reference)
    or off. `llm_config`: attributes set on the LLM's config before it is built (FlanT5: dense_act_fn=gelu, as
    the reference). `adapter` (conf/adapter): LoRA on the LLM; `freeze_llm=False` trains the whole LLM;
    `llm_quant` / `vision_quant` (int8 | nf4): the frozen LLM / ViT held quantised (models/quant.py)."""
    llm_quant = check_low_memory(adapter, freeze_llm, llm_quant, vision_quant, freeze_vision, llm_dtype)
    adapter_source = check_adapted_llm(stage2_checkpoint, llm, adapter) if stage2_checkpoint else None
    if text is not None:
        end_text = dict(text).get("end_text", end_text)
    # Before the LLM is read: an evaluation takes its LLM from the stage-2 checkpoint, so a stage-1 result given
    # there would otherwise be reported as an LLM without weights.
    if stage2_checkpoint:
        check_stage2_source(stage2_checkpoint)
    if stage1_checkpoint:
        check_stage1_source(stage1_checkpoint)
    llm_lib.require_model_dir(llm, "LLM directory")
    shapes = tower_shapes(vision, qformer, num_query_tokens)
    for key, source in (("the stage-1 checkpoint", stage1_checkpoint), ("the stage-2 checkpoint", stage2_checkpoint)):
        if source:
            refuse_other_shapes(source, shapes, key)
    if seed is not None:
        torch.manual_seed(seed)
    tok = llm_lib.load_llm_tokenizer(tokenizer or llm)
    lm = llm_lib.load_llm(llm, parse_dtype(llm_dtype), llm_attn_implementation, llm_config, llm_quant)
    if len(tok) > lm.get_input_embeddings().weight.shape[0]:
        lm.resize_token_embeddings(len(tok), mean_resizing=False)  # room for <image>; its row is never read
    image_id = llm_lib.image_token_id(tok)
    end_id = llm_lib.end_token_id(tok, end_text)
    hf = build_stage2_hf(vision, qformer, lm, num_query_tokens, image_id, end_id, tok.pad_token_id,
                         attn_implementation)
    model = Blip2Stage2(hf, image_id, end_id, tok.pad_token_id, freeze_vision=False, llm_dropout=llm_dropout,
                        freeze_llm=freeze_llm)
    if ln_vision_eps is not None:  # transformers' config has one eps for the blocks and post_layernorm
        model.hf.vision_model.post_layernorm.eps = float(ln_vision_eps)
    if stage1_checkpoint:
        sd = stage1_weights_for_stage2(read_stage1_source(stage1_checkpoint), model,
                                       f"the stage-1 checkpoint {stage1_checkpoint}")
        missing = convert.load_into(model.hf, sd, f"stage-1 weights from {stage1_checkpoint}",
                                    allow_missing=("language_projection.", "language_model."))
        if missing:
            raise CheckpointError(f"{stage1_checkpoint} lacks stage-1 weights for {missing[:5]}")
        log.info("stage 1 -> stage 2: %d tensors from %s", len(sd), stage1_checkpoint)
    elif not stage2_checkpoint:
        log.warning("no stage-1 or stage-2 checkpoint (paths.stage1_checkpoint, paths.stage2_checkpoint): the "
                    "Q-Former starts from random init (smoke tests only)")
    if vision_checkpoint:
        from blip2_train.models.build_stage1 import init_vision_from

        init_vision_from(model, vision_checkpoint)
    if stage2_checkpoint:
        load_stage2_weights(model, stage2_checkpoint, vision_loaded=bool(stage1_checkpoint or vision_checkpoint))
    model.freeze_vision, model.vision_dtype = freeze_vision, parse_dtype(vision_dtype)
    finish_llm_side(model, adapter, vision_quant, adapter_source)
    enable_activation_checkpointing(model, activation_checkpointing)
    if compile_qformer:
        model.hf.qformer.compile()  # in place: parameter names (and checkpoints) unchanged
    return model


def check_low_memory(adapter, freeze_llm: bool, llm_quant, vision_quant, freeze_vision: bool,
                     llm_dtype: str = "float32") -> str | None:
    """Refuse, before anything is read, the combinations that cannot train; -> the LLM's quantisation."""
    from blip2_train.models import quant

    llm_quant = quant.check_kind(llm_quant, "model.llm_quant")
    vision_quant = quant.check_kind(vision_quant, "model.vision_quant")
    kind = adapter_kind(adapter)
    if kind not in ("none", "lora"):
        raise ConfigError(f"adapter.kind: {kind!r} is not one of none, lora")
    if kind != "none":
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ConfigError("adapter=lora needs peft: pip install peft") from None
    if not freeze_llm and kind != "none":
        raise ConfigError("adapter=lora with model.freeze_llm=false: the LLM would train twice over; keep "
                          "freeze_llm=true (adapters only) or use adapter=none (the whole LLM)")
    if not freeze_llm and str(llm_dtype) != "float32":
        raise ConfigError(f"model.freeze_llm=false with model.llm_dtype={llm_dtype}: the LLM would train without fp32 "
                          "master weights (small updates rounded away); set model.llm_dtype=float32 (bf16 autocast "
                          "computes), or train adapters (adapter=lora)")
    if llm_quant and not freeze_llm:
        raise ConfigError(f"model.llm_quant={llm_quant} with model.freeze_llm=false: quantised weights cannot "
                          "train; train adapters on them (adapter=lora) or load the LLM unquantised")
    if vision_quant and not freeze_vision:
        raise ConfigError(f"model.vision_quant={vision_quant} with model.freeze_vision=false: quantised weights "
                          "cannot train")
    for key, q in (("model.llm_quant", llm_quant), ("model.vision_quant", vision_quant)):
        if q:
            quant.require_bitsandbytes(key)
    return llm_quant


def check_adapted_llm(source, llm: str, adapter) -> Path | None:
    """A stage-2 result whose LLM trained (a LoRA adapter, or freeze_llm=false) carries that training in its LLM,
    which the stage-2 source does not otherwise give (model.llm does): refuse what would drop it, silently scoring
    or continuing the base LLM. -> an adapter-only export whose adapter the model is to load, else None."""
    from blip2_train.models.export import export_meta
    from blip2_train.utils.checkpoints import read_lightning_checkpoint

    src = Path(str(source))
    if src.is_dir() and src.suffix != ".ckpt":
        meta = export_meta(src).get("adapter")
        if not meta:
            return None
        if meta.get("merged") is False:
            if adapter_kind(adapter) != "lora":
                raise ConfigError(f"{src} is an adapter-only export (the base LLM {meta.get('base')} + the LoRA "
                                  f"adapter in {meta.get('dir')}/): set adapter=lora (r={meta.get('r')}, "
                                  f"alpha={meta.get('alpha')}) to read it, or give a merged export (blip2-export "
                                  "without --adapter-only)")
            return src
        if Path(str(llm)).resolve() != src.resolve():
            raise ConfigError(f"{src} holds its LoRA adapter merged into its LLM, but model.llm reads {llm}: leave "
                              "paths.llm_dir unset, so the LLM comes from the export")
        return None
    if src.suffix == ".ckpt" or src.is_dir():
        keys = read_lightning_checkpoint(src).get("state_dict", {})
        trained = [k for k in keys if k.startswith("model.hf.language_model.")]
        if trained:
            raise ConfigError(f"{src} holds trained LLM weights ({len(trained)}, e.g. {trained[0]}: a LoRA adapter or "
                              "model.freeze_llm=false), which a stage-2 checkpoint does not carry over: export it "
                              "first (blip2-export merges the adapter) and give the export")
    return None


def finish_llm_side(model, adapter, vision_quant: str | None, adapter_source: Path | None = None) -> None:
    """After every weight is loaded: the LLM's adapter injected (its weights from an adapter-only export
    `adapter_source`), the frozen ViT quantised, and what trains set."""
    from blip2_train.models import quant
    from blip2_train.models.adapters import load_adapter_dir
    from blip2_train.models.export import ADAPTER_DIR

    quant.keep_cpu_inference_general(model.llm)
    apply_adapter(model.llm, adapter)
    if adapter_source is not None:
        load_adapter_dir(model.llm, adapter_source / ADAPTER_DIR, str(adapter_source))
    model.freeze()  # the adapter's weights train; the frozen ViT is cast to its dtype
    if vision_quant:
        quant.quantize_linears(model.hf.vision_model.encoder, vision_quant, model.vision_dtype)
