"""Build a stage-1 model from configuration and initialise it from local checkpoints.

Every path a user would point at a hub name (`bert-base-uncased`, `Salesforce/blip2-opt-2.7b`, an official
`.pth`) is a local directory or file here: nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from blip2_train.models import convert, vision
from blip2_train.models.stage1 import Blip2Stage1, build_stage1_config
from blip2_train.models.tokenizer import load_qformer_tokenizer
from blip2_train.utils.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
TIED = ("lm_head.predictions.decoder.",)


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def init_qformer_from_bert(model: Blip2Stage1, bert_dir: str | os.PathLike) -> None:
    """bert-base-uncased weights -> Q-Former text path; query FFNs start as copies of the text FFNs.

    Cross-attention, query tokens, projections and heads keep their fresh init, as in the reference. The word
    embeddings gain the `[DEC]` row (BERT has none) with a fresh init.
    """
    sd = convert.load_hf_weights(bert_dir)
    sd = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in sd.items()}
    mapped = {}
    for k, v in sd.items():
        if k.startswith("cls.predictions."):
            if k.startswith("cls.predictions.decoder.weight"):
                continue  # tied to the word embeddings
            if k == "cls.predictions.decoder.bias":
                k = "cls.predictions.bias"
            mapped[convert.cls_key_to_lm_head(k)] = v
            continue
        ours = convert.bert_key_to_qformer(k)
        if ours is not None and ".crossattention." not in ours:
            mapped[ours] = v
    own = model.state_dict()
    n_layers = model.config.qformer_config.num_hidden_layers
    for i in range(n_layers):  # text FFN -> query FFN copy
        for part in ("intermediate", "output"):
            for k in [k for k in mapped if k.startswith(f"hf.qformer.encoder.layer.{i}.{part}.")]:
                mapped[k.replace(f".{part}.", f".{part}_query.", 1)] = mapped[k].clone()
    for vocab_key in ("hf.embeddings.word_embeddings.weight", "lm_head.predictions.bias"):
        if vocab_key in mapped and mapped[vocab_key].shape[0] < own[vocab_key].shape[0]:
            fresh = own[vocab_key].clone()
            fresh[: mapped[vocab_key].shape[0]] = mapped[vocab_key]
            mapped[vocab_key] = fresh
    bert_layers = {k.split(".")[4] for k in mapped if k.startswith("hf.qformer.encoder.layer.")}
    if len(bert_layers) != n_layers:
        raise CheckpointError(f"{bert_dir}: BERT has {len(bert_layers)} layers, the Q-Former config {n_layers}")
    missing = convert.load_into(model, {k: v for k, v in mapped.items() if k in own}, f"BERT init from {bert_dir}",
                                allow_missing=TIED)
    unused = [k for k in mapped if k not in own]
    if unused:
        raise CheckpointError(f"{bert_dir}: {len(unused)} BERT weight(s) have no place in the Q-Former: {unused[:5]}")
    log.info("Q-Former initialised from %s (%d tensors; %d fresh, e.g. cross-attention)", bert_dir, len(mapped),
             len(missing))


def init_vision_from(model: Blip2Stage1, source: str | os.PathLike) -> None:
    """Vision tower from a local BLIP-2 transformers directory or a reference `.pth` (visual_encoder.*)."""
    src = Path(source)
    if src.is_dir():
        sd = {k[len("vision_model."):]: v for k, v in convert.load_hf_weights(src).items()
              if k.startswith("vision_model.")}
        if not sd:
            raise CheckpointError(f"{src}: no vision_model.* weights in this checkpoint")
    else:
        mapped, _ = convert.reference_to_ours(convert.load_reference_pth(src))
        sd = {k[len("hf.vision_model."):]: v for k, v in mapped.items() if k.startswith("hf.vision_model.")}
        if not sd:
            raise CheckpointError(f"{src}: no visual_encoder.* / ln_vision.* weights in this file")
    vision.fit_position_embedding(sd, "embeddings.position_embedding",
                                  model.hf.vision_model.embeddings.position_embedding)
    missing = convert.load_into(model.hf.vision_model, sd, f"vision weights from {src}",
                                allow_missing=("post_layernorm.",))
    if missing:
        raise CheckpointError(f"{src}: vision weights missing for {missing[:5]}")
    log.info("vision tower loaded from %s (%d tensors)", src, len(sd))


# The tower settings that fix the weights' shapes, by the arch key a user sets (every model config reads its
# shapes from `arch`): a checkpoint loads only into a model built with its values.
VISION_SHAPES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                 "qkv_bias")
QFORMER_SHAPES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings", "cross_attention_frequency")


def tower_shapes(vision: dict, qformer: dict, num_query_tokens: int, embed_dim: int | None = None) -> dict:
    """{arch key: value} of the shape-fixing settings, transformers' defaults filled in where a key is not set."""
    from transformers import Blip2QFormerConfig, Blip2VisionConfig

    vision, qformer = dict(vision), dict(qformer)
    v = Blip2VisionConfig(**{k: vision[k] for k in VISION_SHAPES if k in vision})
    q = Blip2QFormerConfig(**{k: qformer[k] for k in QFORMER_SHAPES if k in qformer})
    out = {**{f"arch.vision.{k}": getattr(v, k) for k in VISION_SHAPES},
           **{f"arch.qformer.{k}": getattr(q, k) for k in QFORMER_SHAPES},
           "arch.num_query_tokens": int(num_query_tokens)}
    if embed_dim is not None:
        out["arch.embed_dim"] = int(embed_dim)
    return out


def recorded_shapes(source) -> dict | None:
    """The tower shapes a checkpoint was made with: a transformers directory's config.json (our exports, an
    official BLIP-2 directory) or a Lightning checkpoint's run config. None where nothing records them (a
    reference .pth: its tensors are checked when loaded)."""
    src = Path(str(source))
    if src.suffix == ".ckpt" and src.exists():
        from omegaconf import OmegaConf

        from blip2_train.utils.checkpoints import run_config_of

        try:
            model = OmegaConf.to_container(run_config_of(src).model, resolve=True)
        except Exception:  # noqa: BLE001 - no readable run config: the weights' shapes are checked at load
            return None
        if not isinstance(model.get("vision"), dict) or not isinstance(model.get("qformer"), dict):
            return None
        return tower_shapes(model["vision"], model["qformer"], model.get("num_query_tokens", 32),
                            model.get("embed_dim"))
    if src.is_dir() and (src / "config.json").is_file():
        import json

        cfg = json.loads((src / "config.json").read_text())
        if "vision_config" not in cfg or "qformer_config" not in cfg:
            return None
        stage1 = "Blip2ForImageTextRetrieval" in (cfg.get("architectures") or [])
        return tower_shapes(cfg["vision_config"], cfg["qformer_config"], cfg.get("num_query_tokens", 32),
                            cfg.get("image_text_hidden_size") if stage1 else None)
    return None


def refuse_other_shapes(source, configured: dict, what: str) -> None:
    """A checkpoint made with other tower shapes than the config's is refused, naming the overrides that build
    its shapes. The model is not silently built with the checkpoint's shapes instead: the run's config (saved
    with it, and read by the data side: stage 2 puts `num_query_tokens` image tokens in every prompt) would then
    say one thing while the model is another."""
    found = recorded_shapes(source)
    if not found:
        return
    differ = [(k, found[k], v) for k, v in configured.items() if k in found and found[k] != v]
    if differ:
        want = " ".join(f"{k}={_override(f)}" for k, f, _ in differ)
        here = ", ".join(f"{k}={_override(v)}" for k, _, v in differ)
        raise ConfigError(f"{what} {source} was made with other shapes than this config ({here}): add {want}")


def refuse_other_query_count(found: torch.Tensor | None, own: torch.Tensor, what: str) -> None:
    """The query-token count of weights whose source records no config (a reference .pth), by the key to set."""
    if found is not None and found.dim() == 3 and found.shape[1] != own.shape[1]:
        raise ConfigError(f"{what} has {found.shape[1]} query tokens and this config {own.shape[1]} "
                          f"(arch.num_query_tokens={own.shape[1]}): add arch.num_query_tokens={found.shape[1]}")


def _override(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def checkpoint_stage(source) -> int | None:
    """The stage a checkpoint comes from, read without loading its tensors: an export's blip2_train.json or its
    transformers class, a Lightning checkpoint's `blip2_stage`, a reference .pth's projection (opt_proj / t5_proj
    is stage 2). None where that cannot be told cheaply (missing, a sharded directory, an unreadable file)."""
    src = Path(str(source))
    if src.is_dir() and src.suffix != ".ckpt":
        import json

        from blip2_train.models.export import export_meta

        stage = export_meta(src).get("stage")
        if stage in (1, 2, 3):
            return stage
        config = src / "config.json"
        classes = (json.loads(config.read_text()).get("architectures") or []) if config.is_file() else []
        if "Blip2ForImageTextRetrieval" in classes:
            return 1
        if "InstructBlipForConditionalGeneration" in classes:
            return 3
        return 2 if "Blip2ForConditionalGeneration" in classes else None
    if not src.is_file():
        return None
    try:  # memory-mapped: the tensors are not read
        ckpt = torch.load(src, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 - not a zip checkpoint: whoever loads it says what is wrong
        return None
    if not isinstance(ckpt, dict):
        return None
    if "state_dict" in ckpt:
        if ckpt.get("blip2_stage") in (1, 2, 3):
            return ckpt["blip2_stage"]
        return 2 if any(k.startswith("model.hf.language_projection.") for k in ckpt["state_dict"]) else 1
    sd = ckpt.get("model", ckpt)
    if not isinstance(sd, dict):
        return None
    if convert.reference_projection_family(sd) is not None:
        return 3 if convert.is_reference_instruct(sd) else 2
    return 1 if any(k.startswith(convert.STAGE1_ONLY) for k in sd) else None


def _kind(src: Path, stage: int) -> str:
    if src.suffix == ".ckpt":
        return "Lightning checkpoint"
    if src.is_dir():
        return "export"
    if stage == 3:
        return "reference checkpoint (an instruction-aware Q-Former with llm_proj / t5_proj)"
    return f"reference checkpoint ({'it holds' if stage == 2 else 'no'} opt_proj / t5_proj)"


# Where a result of each stage goes (the keys the README teaches).
USES = {1: "pass it as paths.stage1_checkpoint, to start stage 2 (experiment=stage2_pretrain) or to evaluate or "
           "fine-tune retrieval (experiment=retrieval_coco_eval, retrieval_coco_ft)",
        2: "pass it as model.stage2_checkpoint to continue stage 2 (experiment=stage2_pretrain "
           "paths.stage1_checkpoint=null), or as paths.stage2_checkpoint to evaluate it by captioning or VQA or "
           "fine-tune it (experiment=caption_coco_eval, vqa_vqav2_eval, caption_coco_ft), or as "
           "paths.stage2_checkpoint of instruction tuning (experiment=instruct_tune, vqa_vqav2_ft)",
        3: "pass it as model.instruct_checkpoint to continue instruction tuning (experiment=instruct_tune), or "
           "evaluate its export as paths.stage2_checkpoint=<export> of a caption or VQA evaluation "
           "(experiment=vqa_vqav2_eval, caption_coco_eval): it is evaluated as an InstructBLIP model"}


def wrong_stage(source, got: int, key: str, want: int | None = None) -> CheckpointError:
    """`source`, a stage-`got` result, was given as `key`, which takes a stage-`want` one (by default the other of
    stages 1 and 2): say which is which and where each goes. Stage 3 is instruction tuning."""
    src = Path(str(source))
    want = want or (2 if got == 1 else 1)
    hint = f" (the evaluations take an export: blip2-export {src} --out DIR)" if src.suffix == ".ckpt" else ""
    return CheckpointError(f"{src} is a stage-{got} {_kind(src, got)}, and {key} takes a stage-{want} one: "
                           f"{USES[got]}{hint}")


def load_stage1_weights(model: Blip2Stage1, source: str | os.PathLike) -> None:
    """Everything from a stage-1 export directory (ours) or an official reference `.pth`."""
    src = Path(source)
    if src.is_dir():
        from blip2_train.models.export import read_stage1_export_weights

        sd = read_stage1_export_weights(src)
        what = f"stage-1 export {src}"
    else:
        sd, unmatched = convert.reference_to_ours(convert.load_reference_pth(src))
        if unmatched:
            raise CheckpointError(f"{src}: {len(unmatched)} key(s) match nothing in BLIP-2 stage 1: {unmatched[:8]}")
        what = f"reference checkpoint {src}"
    refuse_other_query_count(sd.get("hf.query_tokens"), model.hf.query_tokens, what)
    # A 224 px result evaluated or fine-tuned at 364 px: bicubic on the patch grid, once, at load time.
    vision.fit_position_embedding(sd, "hf.vision_model.embeddings.position_embedding",
                                  model.hf.vision_model.embeddings.position_embedding)
    missing = convert.load_into(model, sd, what, allow_missing=TIED)
    if "temp" in missing:
        # transformers' Blip2ForImageTextRetrieval has no place for it: the retrieval evaluation's "product"
        # score needs it (eval/retrieval.py), and stage-1 training learns it again from model.temp
        model.temp_missing_from = what
        log.warning("%s holds no ITC temperature ('temp'): it starts at %.3g", what, float(model.temp.detach()[0]))
    if missing:
        log.warning("%s did not cover %d tensor(s), kept at init: %s", what, len(missing), missing[:8])
    log.info("loaded %d tensors from %s", len(sd), what)


def check_stage1_checkpoint(source, configured: dict) -> None:
    """A stage-1 model loads a stage-1 export or reference .pth (paths.stage1_checkpoint) of its own shapes."""
    src = Path(str(source))
    if not src.exists():
        raise CheckpointError(f"stage-1 checkpoint not found: {src} (paths.stage1_checkpoint)")
    if checkpoint_stage(src) == 2:
        raise wrong_stage(src, 2, "paths.stage1_checkpoint")
    if src.suffix == ".ckpt":
        raise CheckpointError(f"{src} is a Lightning checkpoint: a stage-1 model here loads a stage-1 export as "
                              f"paths.stage1_checkpoint (blip2-export {src} --out DIR, then "
                              "paths.stage1_checkpoint=DIR)")
    refuse_other_shapes(src, configured, "the stage-1 checkpoint")


def qformer_tokenizer_source(tokenizer: str | None, stage1_checkpoint: str | None) -> str:
    """The Q-Former tokenizer: `model.tokenizer` (paths.bert_dir), else the stage-1 export directory's own."""
    if tokenizer:
        return str(tokenizer)
    if stage1_checkpoint and Path(str(stage1_checkpoint)).is_dir():
        return str(stage1_checkpoint)
    raise ConfigError("no Q-Former tokenizer: set paths.bert_dir (a local bert-base-uncased directory), or give a "
                      "stage-1 export directory as paths.stage1_checkpoint (it holds the tokenizer)")


def stage1_vocab_size(stage1_checkpoint: str | None) -> int | None:
    """The Q-Former vocabulary of a stage-1 export (its weights' size). The tokenizer saved beside it holds
    one token more: Blip2Processor adds `<image>` to it, a token no caption produces."""
    config = Path(str(stage1_checkpoint)) / "config.json" if stage1_checkpoint else None
    if config is None or not config.is_file():
        return None
    import json

    return json.loads(config.read_text()).get("qformer_config", {}).get("vocab_size")


def build_stage1_model(
    tokenizer: str | None,
    vision: dict,
    qformer: dict,
    num_query_tokens: int = 32,
    embed_dim: int = 256,
    temp: float = 0.07,
    freeze_vision: bool = True,
    vision_dtype: str = "float32",
    ln_vision_eps: float | None = None,
    attn_implementation: str | None = "sdpa",
    bert_checkpoint: str | None = None,
    vision_checkpoint: str | None = None,
    stage1_checkpoint: str | None = None,
    seed: int | None = None,
    compile_qformer: bool = False,
    text: dict | None = None,
    false_negatives: str = "caption",
    loss_weights: dict | None = None,
) -> Blip2Stage1:
    """The `_target_` of `conf/model/stage1_vitg.yaml`. `text` is read by the data side (data.text).

    `tokenizer` null: the stage-1 export given as `stage1_checkpoint` holds it. With a `stage1_checkpoint` the
    Q-Former is not first initialised from BERT (every weight is overwritten by the stage-1 result).
    """
    if stage1_checkpoint:  # before anything is built: a checkpoint of the other stage, or of other shapes
        check_stage1_checkpoint(stage1_checkpoint, tower_shapes(vision, qformer, num_query_tokens, embed_dim))
    tok = load_qformer_tokenizer(qformer_tokenizer_source(tokenizer, stage1_checkpoint))
    qformer = dict(qformer)
    qformer["vocab_size"] = stage1_vocab_size(stage1_checkpoint) or len(tok)  # BERT vocab + [DEC]
    cfg = build_stage1_config(dict(vision), qformer, num_query_tokens, embed_dim, attn_implementation)
    if seed is not None:
        torch.manual_seed(seed)
    model = Blip2Stage1(cfg, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, temp=temp,
                        freeze_vision=False, ln_vision_eps=ln_vision_eps,
                        false_negatives=false_negatives, loss_weights=loss_weights)
    if bert_checkpoint and not stage1_checkpoint:
        init_qformer_from_bert(model, bert_checkpoint)
    if vision_checkpoint:
        init_vision_from(model, vision_checkpoint)
    if stage1_checkpoint:
        load_stage1_weights(model, stage1_checkpoint)
    model.freeze_vision = freeze_vision
    model.vision_dtype = parse_dtype(vision_dtype)
    if freeze_vision:
        model.freeze_vision_tower()
    if compile_qformer:
        model.hf.qformer.compile()  # in place: parameter names (and checkpoints) unchanged
    return model
