"""`blip2-bench memory --llm ...`: the predicted peak memory of a stage-2 / instruction-tuning step before any run,
part by part (weights, gradients, optimizer, activations), and with `--measure` the peak of real steps beside it.

    blip2-bench memory --llm /ckpt/vicuna-7b --adapter lora --quant nf4 --batch-size 4
    blip2-bench memory --llm llama-7b --adapter lora --quant nf4 --batch-size 2 --measure   (random weights)
    blip2-bench memory --table            (the docs' table: OPT-2.7B/6.7B, Vicuna-7B, FlanT5-XL x settings)

The prediction counts parameters exactly (every part built on the meta device from its config) and prices them by
how they are held: a frozen tower in its dtype or quantised (models/quant.py BYTES_PER_WEIGHT), a trained weight in
fp32 with its gradient and AdamW's two moments (16 bytes). Activations follow what autograd keeps when the
LLM is frozen but the gradient must still flow through it to the visual prompt (its norms, attention inputs and
outputs, the MLP's nonlinearity, LoRA's inputs), per token and layer; the trained Q-Former keeps all of its own.
Measured: on CUDA `torch.cuda.max_memory_allocated`; on a CPU the process's peak anonymous resident memory
(RssAnon, sampled every 2 ms) during the steps minus its value before the model was built, with the allocator told
to return large blocks at once and every weight copied out of the loader's memory-mapped file (whose pages the
kernel counts as resident but may drop at any time; on a GPU they are copied to the device anyway).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

GIB = 2 ** 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Stage-2 sequence: 32 query positions + the caption (the reference's max_txt_len 32)
DEFAULT_TEXT_LEN = 32


def llm_config(llm: str):
    """A local LLM directory's config, or a shape preset of blip2-bench train (random weights)."""
    from transformers import AutoConfig

    from blip2_train.bench.train import LLM_PRESETS
    from blip2_train.utils.errors import ConfigError

    if Path(llm).is_dir():
        return AutoConfig.from_pretrained(llm)
    if llm in LLM_PRESETS:
        from transformers import LlamaConfig, OPTConfig, T5Config

        preset = dict(LLM_PRESETS[llm])
        family = preset.pop("family")
        return {"opt": OPTConfig, "llama": LlamaConfig, "t5": T5Config}[family](**preset)
    raise ConfigError(f"--llm {llm}: not a directory nor one of {sorted(LLM_PRESETS)}")


def _meta_llm(cfg):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    with torch.device("meta"):
        cls = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
        return cls.from_config(cfg)


def _towers(arch: str, image_size: int) -> tuple[int, int, dict, dict]:
    """(ViT parameters, Q-Former parameters incl. queries, vision config, qformer config) of a conf/arch file."""
    from omegaconf import OmegaConf
    from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

    from blip2_train.config.compose import compose

    cfg = compose("train", [f"arch={arch}", f"data.image_size={image_size}"])
    vision = OmegaConf.to_container(cfg.arch.vision, resolve=True)
    qformer = OmegaConf.to_container(cfg.arch.qformer, resolve=True)
    with torch.device("meta"):
        vit = Blip2VisionModel(Blip2VisionConfig(**vision))
        qf = Blip2QFormerModel(Blip2QFormerConfig(**qformer, encoder_hidden_size=vision["hidden_size"]))
    nq = int(cfg.arch.num_query_tokens)
    return (sum(p.numel() for p in vit.parameters()),
            sum(p.numel() for p in qf.parameters()) + nq * qformer["hidden_size"], vision, {**qformer, "nq": nq})


def predict(llm: str, arch: str = "vitg", adapter: str = "none", quant: str | None = None,
            vision_quant: str | None = None, batch_size: int = 4, text_len: int = DEFAULT_TEXT_LEN,
            llm_dtype: str = "bfloat16", vision_dtype: str = "bfloat16", image_size: int = 224, lora_r: int = 16,
            lora_targets: list[str] | None = None, llm_checkpointing: bool = False, freeze_llm: bool = True) -> dict:
    """Predicted bytes of one training step's peak, by part."""
    from blip2_train.models.adapters import LORA_TARGETS
    from blip2_train.models.quant import BYTES_PER_WEIGHT

    cfg = llm_config(llm)
    lm = _meta_llm(cfg)
    d_llm, d_vit = DTYPE_BYTES[llm_dtype], DTYPE_BYTES[vision_dtype]
    head = lm.get_output_embeddings()
    linears = [(n, m) for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    lin_w = sum(m.weight.numel() for _, m in linears)
    total_llm = sum(p.numel() for p in lm.parameters())
    rest = total_llm - lin_w  # embeddings, norms, head (tied or not), biases: kept in llm_dtype
    q_bytes = BYTES_PER_WEIGHT[quant] if quant else d_llm
    parts = {"LLM weights": lin_w * q_bytes + rest * d_llm}
    targets = set(lora_targets or LORA_TARGETS.get(cfg.model_type, ["q_proj", "v_proj"]))
    lora = sum(lora_r * (m.in_features + m.out_features) for n, m in linears if n.rsplit(".", 1)[-1] in targets)
    vit_params, qf_params, vision, qformer = _towers(arch, image_size)
    hidden = cfg.get_text_config().hidden_size if hasattr(cfg, "get_text_config") else cfg.hidden_size
    trained = qf_params + qformer["hidden_size"] * hidden + hidden  # Q-Former + queries, projection
    trained += 2 * vision["hidden_size"]  # ln_vision
    vit_linear = sum(m.weight.numel() for m in _vit_linears(vision))
    parts["ViT weights"] = (vit_linear * (BYTES_PER_WEIGHT[vision_quant] if vision_quant else d_vit)
                            + (vit_params - vit_linear) * d_vit)
    if adapter == "lora":
        trained += lora
    if not freeze_llm:  # the whole LLM trains (fp32 weights, llm_dtype=float32): gradient + two AdamW moments
        parts["LLM gradients + optimizer"] = total_llm * 12
    parts["trained weights (fp32)"] = trained * 4
    parts["gradients + AdamW moments"] = trained * 12
    parts["activations"] = activations(cfg, batch_size, text_len + qformer["nq"], d_llm, adapter == "lora",
                                       len(targets), llm_checkpointing) + qformer_activations(
        qformer, vision, batch_size, image_size)
    parts["transient"] = transient(cfg, batch_size, text_len + qformer["nq"], d_llm, vision, image_size, d_vit)
    out = {k: int(v) for k, v in parts.items()}
    out["total"] = sum(out.values())
    out["params"] = {"llm": total_llm, "vit": vit_params, "trained": trained, "lora": lora if adapter == "lora" else 0}
    return out


def _vit_linears(vision: dict):
    from transformers import Blip2VisionConfig, Blip2VisionModel

    with torch.device("meta"):
        vit = Blip2VisionModel(Blip2VisionConfig(**vision))
    return [m for m in vit.modules() if isinstance(m, torch.nn.Linear)]


def _dims(cfg) -> tuple[int, int, int, bool]:
    """(hidden, intermediate, layers, gated MLP) of an LLM config."""
    h = getattr(cfg, "hidden_size", None) or cfg.d_model
    i = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None) or cfg.d_ff
    n = cfg.num_hidden_layers if not cfg.is_encoder_decoder else cfg.num_layers + cfg.num_decoder_layers
    gated = cfg.model_type in ("llama", "mistral", "qwen2", "gemma") or "gated" in str(getattr(cfg, "feed_forward_proj", ""))
    return h, i, n, gated


def activations(cfg, batch: int, tokens: int, d: int, lora: bool, targets: int, checkpointing: bool) -> int:
    """What autograd keeps through a frozen LLM whose input needs a gradient, per token and layer: the two norms'
    inputs, attention's q, k, v and output (SDPA keeps no score matrix), the MLP nonlinearity's inputs (gated: the
    gate, the up projection and the product's factors; else the activation), LoRA's inputs per adapted projection.
    With checkpointing: each layer's input, plus one layer in full during its recomputation."""
    h, i, n, gated = _dims(cfg)
    per_layer = (2 * h + 4 * h + (3 * i if gated else i) + (targets * h if lora else 0)) * d
    per_layer += 2 * h  # dropout masks (bool) of the residual branches
    if checkpointing:
        return batch * tokens * (n * h * d + per_layer)
    return batch * tokens * n * per_layer


def qformer_activations(qformer: dict, vision: dict, batch: int, image_size: int) -> int:
    """The trained Q-Former keeps everything (fp32): per query token and layer about 20 hidden-wide tensors
    (attention in/out, LayerNorms, the 4x FFN), and per cross-attention layer the keys and values of every image
    token."""
    h, layers, nq = qformer["hidden_size"], qformer["num_hidden_layers"], qformer["nq"]
    img = (image_size // vision["patch_size"]) ** 2 + 1
    cross = layers // qformer.get("cross_attention_frequency", 2)
    return batch * 4 * (layers * nq * 20 * h + cross * img * (2 * h + vision["hidden_size"]))


def transient(cfg, batch: int, tokens: int, d: int, vision: dict, image_size: int, d_vit: int) -> int:
    """The largest short-lived tensors: the LLM MLP's intermediates in flight in one layer's backward, or the
    frozen ViT's in its forward (no_grad), whichever is larger."""
    h, i, n, gated = _dims(cfg)
    llm = batch * tokens * i * d * 4
    img = (image_size // vision["patch_size"]) ** 2 + 1
    vit = batch * img * vision["intermediate_size"] * d_vit * 3
    return max(llm, vit)


# --- measured -------------------------------------------------------------------------------------------------


def make_random_llm(preset: str, out: Path) -> Path:
    """A preset-shaped LLM with random weights saved with save_pretrained (no download), with a tokenizer."""
    from transformers import AutoModelForCausalLM

    from blip2_train.bench.train import synthetic_bert_tokenizer

    cfg = llm_config(preset)
    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a GPU initialises 7B in seconds
        lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    lm.save_pretrained(str(out))
    del lm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(synthetic_bert_tokenizer(out / "_tok", cfg.vocab_size - 8)))
    tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
    tok.save_pretrained(str(out))
    return out


def measure(llm: str, arch: str, adapter: str, quant: str | None, vision_quant: str | None, batch_size: int,
            text_len: int, llm_dtype: str, vision_dtype: str, image_size: int, steps: int) -> dict:
    """Peak memory of `steps` real training steps of the builder's model (stage 2, random Q-Former), in a fresh
    process whose allocator hands large blocks back at once."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    args = json.dumps(dict(llm=llm, arch=arch, adapter=adapter, quant=quant, vision_quant=vision_quant,
                           batch_size=batch_size, text_len=text_len, llm_dtype=llm_dtype, vision_dtype=vision_dtype,
                           image_size=image_size, steps=steps))
    r = subprocess.run([sys.executable, "-c", f"from blip2_train.bench.plan import _measure_here as m; m({args!r})"],
                       env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) * 1024


class _AnonPeak:
    """The highest RssAnon seen while in the block, sampled every 2 ms by a thread."""

    def __enter__(self):
        import threading

        self.peak, self._stop = _rss("RssAnon:"), threading.Event()

        def sample():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, _rss("RssAnon:"))

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss("RssAnon:"))


def _measure_here(args_json: str) -> None:
    from omegaconf import OmegaConf

    from blip2_train.config.compose import compose
    from blip2_train.lit.optim import build_adamw
    from blip2_train.models.build_stage2 import build_stage2_model

    a = json.loads(args_json)
    cuda = torch.cuda.is_available()
    llm_dir = a["llm"] if Path(a["llm"]).is_dir() else str(make_random_llm(a["llm"], Path(f"/tmp/blip2-bench-{a['llm']}")))
    cfg = compose("train", [f"arch={a['arch']}", "model=stage2_opt", f"paths.llm_dir={llm_dir}",
                            "paths.stage1_checkpoint=null", f"data.image_size={a['image_size']}",
                            f"adapter={a['adapter']}"])
    adapter = OmegaConf.to_container(cfg.adapter, resolve=True)
    base = torch.cuda.memory_allocated() if cuda else _rss("RssAnon:")
    t0 = time.perf_counter()
    model = build_stage2_model(llm=llm_dir, vision=OmegaConf.to_container(cfg.model.vision, resolve=True),
                               qformer=OmegaConf.to_container(cfg.model.qformer, resolve=True),
                               num_query_tokens=int(cfg.model.num_query_tokens), llm_dtype=a["llm_dtype"],
                               vision_dtype=a["vision_dtype"], end_text=None, adapter=adapter, llm_quant=a["quant"],
                               vision_quant=a["vision_quant"], llm_dropout=True, seed=0)
    build_s = time.perf_counter() - t0
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:  # out of the memory-mapped checkpoint file, into memory the process owns
        import gc

        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point():
                    p.data = p.data.clone()
        gc.collect()
    model.to(device)
    model.set_train_modes(True)
    q, b, n = model.num_query_tokens, a["batch_size"], a["text_len"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (b, q + n), generator=g)
    ids[:, :q] = model.image_token_id
    labels = ids.masked_fill(ids == model.image_token_id, -100)
    batch = dict(pixel_values=torch.randn(b, 3, a["image_size"], a["image_size"], generator=g), input_ids=ids,
                 attention_mask=torch.ones_like(ids), labels=labels)
    batch = {k: v.to(device) for k, v in batch.items()}
    opt = build_adamw(model, 1e-5)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    with _AnonPeak() as anon:
        for _ in range(a["steps"]):
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() if cuda else anon.peak) - base
    print(json.dumps({"peak_bytes": int(peak), "step_seconds": times, "build_seconds": build_s,
                      "loss": float(loss), "device": torch.cuda.get_device_name() if cuda else
                      f"CPU ({os.cpu_count()} cores)", "kind": "torch.cuda.max_memory_allocated" if cuda else
                      "peak RssAnon during the steps - RssAnon before the model was built"}))


# --- reports --------------------------------------------------------------------------------------------------


def markdown(p: dict, command: str, measured: dict | None = None) -> str:
    lines = [f"Command: `{command}`  ", "", "| part | predicted (GiB) |", "| --- | ---: |"]
    lines += [f"| {k} | {v / GIB:.2f} |" for k, v in p.items() if k not in ("total", "params")]
    lines.append(f"| **total** | **{p['total'] / GIB:.2f}** |")
    pr = p["params"]
    lines += ["", f"Parameters: LLM {pr['llm'] / 1e9:.2f} B, ViT {pr['vit'] / 1e9:.2f} B, trained "
                  f"{pr['trained'] / 1e6:.1f} M (LoRA {pr['lora'] / 1e6:.1f} M)."]
    if measured:
        err = measured["peak_bytes"] / p["total"] - 1
        steps = ", ".join(f"{s:.1f}" for s in measured["step_seconds"])
        lines += [f"Measured on {measured['device']}: **{measured['peak_bytes'] / GIB:.2f} GiB** "
                  f"({measured['kind']}), {err:+.1%} against the prediction; step times {steps} s, model built in "
                  f"{measured['build_seconds']:.0f} s."]
    return "\n".join(lines)


TABLE_LLMS = (("OPT-2.7B", "opt-2.7b"), ("OPT-6.7B", "opt-6.7b"), ("Vicuna-7B", "llama-7b"), ("FlanT5-XL", "flant5-xl"))
TABLE_SETTINGS = (
    ("frozen LLM, bf16 (the paper)", dict(adapter="none", quant=None)),
    ("LoRA r=16, bf16", dict(adapter="lora", quant=None)),
    ("LoRA r=16, int8 LLM", dict(adapter="lora", quant="int8")),
    ("QLoRA: LoRA r=16, NF4 LLM", dict(adapter="lora", quant="nf4")),
    ("QLoRA + NF4 ViT, LLM checkpointing", dict(adapter="lora", quant="nf4", vision_quant="nf4",
                                                llm_checkpointing=True)),
)


TABLE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
CARDS_GB = (24, 40, 80)


def fits(total_bytes: int, card_gb: int) -> bool:
    """The prediction + 15% (its measured error bound) + 1.5 GiB of CUDA context and allocator slack within 93% of
    the card (what the driver leaves usable)."""
    return total_bytes / GIB * 1.15 + 1.5 <= card_gb * 1e9 / GIB * 0.93


def table() -> str:
    """Per LLM and setting: the predicted peak at batch 8, and the largest per-GPU batch (of 1, 2, 4, ... 128) that
    fits each card."""
    lines = ["| LLM | setting | peak at batch 8 (GiB) | " + " | ".join(f"largest batch, {c} GB" for c in CARDS_GB) + " |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in CARDS_GB) + " |"]
    for name, preset in TABLE_LLMS:
        for label, kw in TABLE_SETTINGS:
            totals = {b: predict(preset, batch_size=b, **kw)["total"] for b in TABLE_BATCHES}
            best = [max((b for b, t in totals.items() if fits(t, c)), default=None) for c in CARDS_GB]
            lines.append(f"| {name} | {label} | {totals[8] / GIB:.1f} | " +
                         " | ".join(str(b) if b else "does not fit" for b in best) + " |")
    return "\n".join(lines)
