"""LoRA adapters on the frozen LLM (peft), and the two ways out of training: merged into the LLM's weights, or
kept apart as a peft adapter beside the unchanged base.

The adapters are injected in place (`peft.inject_adapter_in_model`), not by wrapping the LLM in a `PeftModel`:
`Blip2ForConditionalGeneration.language_model` stays the LLM itself, so the loss, generation, checkpoints and
exports see the same module tree with or without adapters. An adapted projection `q_proj` becomes
`q_proj.base_layer` (the frozen weight, possibly quantised) + `q_proj.lora_A.default` / `lora_B.default`.

`adapter` (the `adapter` config group, conf/adapter/*.yaml) = {kind: none | lora, r, alpha, dropout,
target_modules (null = the family's default below), bias}.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from blip2_train.utils.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

ADAPTER_NAME = "default"
# The projections LoRA adapts per LLM family when adapter.target_modules is null: the attention's query and
# value projections, as the LoRA paper and QLoRA's small-budget recipe for these families.
LORA_TARGETS = {
    "opt": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "gpt2": ["c_attn"],
}


def adapter_kind(adapter) -> str:
    return str((dict(adapter or {})).get("kind") or "none")


def lora_config(adapter: dict, model_type: str):
    """The peft LoraConfig for an `adapter` node and an LLM family."""
    from peft import LoraConfig

    a = dict(adapter)
    targets = a.get("target_modules") or LORA_TARGETS.get(model_type)
    if not targets:
        raise ConfigError(f"adapter.target_modules: no default LoRA targets for a {model_type} LLM; name its "
                          f"projections, e.g. adapter.target_modules=[q_proj,v_proj]")
    if str(a.get("bias", "none")) != "none":
        raise ConfigError(f"adapter.bias={a.get('bias')}: only none (biases stay frozen with the LLM)")
    if int(a.get("r", 0)) < 1:
        raise ConfigError(f"adapter.r must be >= 1, not {a.get('r')}")
    return LoraConfig(r=int(a["r"]), lora_alpha=float(a.get("alpha", 2 * int(a["r"]))),
                      lora_dropout=float(a.get("dropout", 0.0)), target_modules=list(targets),
                      bias=str(a.get("bias", "none")))


def apply_adapter(llm: nn.Module, adapter: dict | None) -> nn.Module:
    """Inject the adapter of `adapter` into `llm` in place (kind none: nothing); -> llm."""
    kind = adapter_kind(adapter)
    if kind == "none":
        return llm
    if kind != "lora":
        raise ConfigError(f"adapter.kind: {kind!r} is not one of none, lora")
    from peft import inject_adapter_in_model

    cfg = lora_config(adapter, llm.config.model_type)
    targets = set(cfg.target_modules)
    if not any(name.rsplit(".", 1)[-1] in targets for name, _ in llm.named_modules()):
        raise ConfigError(f"adapter.target_modules {sorted(targets)}: no such module in the "
                          f"{llm.config.model_type} LLM")
    inject_adapter_in_model(cfg, llm, adapter_name=ADAPTER_NAME)
    # peft creates the adapter in the dtype of the layer it wraps: a bf16 LLM's adapter would be trained without an
    # fp32 copy (small updates rounded away). fp32, like every trained weight here; autocast computes in bf16.
    for n, p in llm.named_parameters():
        if is_adapter_param(n):
            p.data = p.data.float()
    llm.blip2_adapter = dict(adapter)  # what exports record
    log.info("LoRA r=%d alpha=%g on %s: %d trainable LLM parameters", cfg.r, cfg.lora_alpha,
             ",".join(sorted(targets)), sum(p.numel() for n, p in llm.named_parameters() if is_adapter_param(n)))
    return llm


def is_adapter_param(name: str) -> bool:
    return ".lora_" in name or name.startswith("lora_")


def has_adapter(llm: nn.Module) -> bool:
    return any(is_adapter_param(n) for n, _ in llm.named_parameters())


def _lora_layers(llm: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in llm.named_modules() if isinstance(m, LoraLayer)]


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


@torch.no_grad()
def merge_adapter(llm: nn.Module) -> nn.Module:
    """W <- W + (alpha / r) B A in every adapted projection, then the adapter layers replaced by their base
    layers: the plain LLM of the base family again (a transformers export). The sum is formed in fp32 and cast to
    the base weight's dtype. A quantised base cannot take the sum exactly: exports rebuild the LLM unquantised
    first (cli/export)."""
    for name, layer in _lora_layers(llm):
        base = layer.get_base_layer()
        if base.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ConfigError(f"{name}: cannot merge LoRA into a {base.weight.dtype} (quantised) weight; export "
                              "from an unquantised LLM")
        delta = layer.get_delta_weight(ADAPTER_NAME).float()  # the adapter is fp32 (apply_adapter)
        base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
        _replace(llm, name, base)
    if hasattr(llm, "blip2_adapter"):
        llm.blip2_merged_adapter = llm.blip2_adapter  # what the export records
        del llm.blip2_adapter
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in vars(llm):  # set on the instance by the injection
            delattr(llm, attr)
    return llm


def adapter_files(llm: nn.Module, base: str, task_type: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, adapter_model.safetensors tensors) of the LLM's adapter as `PeftModel.save_pretrained`
    writes them for the bare LLM, so `PeftModel.from_pretrained(<base LLM>, dir)` loads it."""
    adapter = getattr(llm, "blip2_adapter", None)
    if adapter is None:
        raise ConfigError("the model has no adapter to export (adapter=none): export without --adapter-only")
    cfg = lora_config(adapter, llm.config.model_type)
    cfg.base_model_name_or_path = base
    cfg.task_type = task_type
    conf = cfg.to_dict()
    conf["target_modules"] = sorted(conf["target_modules"])
    conf["peft_type"] = str(getattr(conf["peft_type"], "value", conf["peft_type"]))
    conf["task_type"] = str(getattr(conf["task_type"], "value", conf["task_type"]))
    tensors = {"base_model.model." + n.replace(f".{ADAPTER_NAME}.", "."): p.detach().float().contiguous().clone()
               for n, p in llm.named_parameters() if is_adapter_param(n)}
    return conf, tensors


def load_adapter_weights(llm: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """The tensors of an adapter_model.safetensors into an LLM whose adapter was injected by `apply_adapter`."""
    own = dict(llm.named_parameters())
    seen = set()
    with torch.no_grad():
        for k, v in tensors.items():
            name = k.removeprefix("base_model.model.")
            name = name.replace(".lora_A.", f".lora_A.{ADAPTER_NAME}.").replace(".lora_B.", f".lora_B.{ADAPTER_NAME}.")
            if name not in own:
                raise CheckpointError(f"{where}: adapter weight {k} has no place in the LLM")
            own[name].copy_(v.to(own[name].dtype))
            seen.add(name)
    missing = [n for n in own if is_adapter_param(n) and n not in seen]
    if missing:
        raise CheckpointError(f"{where} lacks {len(missing)} adapter weight(s), e.g. {missing[:2]}")


NEW_ROWS = "new_token_rows.safetensors"


def new_token_rows(llm: nn.Module, base_vocab: int) -> dict[str, torch.Tensor]:
    """The input / output embedding rows of tokens the base LLM lacks (<image>, an added [PAD]): an adapter-only
    export carries them, since training resized the vocabulary with rows the base cannot rebuild."""
    rows = {}
    for name in ("input_embeddings", "output_embeddings"):
        w = getattr(llm, f"get_{name}")().weight
        if w.shape[0] > base_vocab:
            rows[name] = w[base_vocab:].detach().contiguous().clone()
    return rows


def load_adapter_dir(llm: nn.Module, directory, where: str) -> None:
    """An adapter-only export's llm_adapter/ into an LLM whose adapter `apply_adapter` injected: the adapter's
    weights and the rows of the tokens the base lacks."""
    from pathlib import Path

    from safetensors.torch import load_file

    d = Path(directory)
    load_adapter_weights(llm, load_file(str(d / "adapter_model.safetensors")), where)
    if (d / NEW_ROWS).exists():
        with torch.no_grad():
            for name, w in load_file(str(d / NEW_ROWS)).items():
                getattr(llm, f"get_{name}")().weight[-w.shape[0]:] = w.to(getattr(llm, f"get_{name}")().weight.dtype)
