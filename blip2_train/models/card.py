"""The model card (`README.md`) every export carries, and the export's upload to the Hugging Face Hub.

`model_card` is a pure function of what the export and its run recorded: `blip2_train.json` (stage, prompt,
decoding), `config.json` (the towers' shapes, the LLM family), the run's resolved config (starting points, data,
optimisation, evaluation protocol) and its `metrics.json`. What was not recorded is written as "not recorded",
never guessed. Licenses are derived only for the bases this module knows (by the LLM family in config.json and
the ViT's shape); any other part is "unknown: check the base's own card". `write_card` gathers those files (a
missing or unreadable one becomes a line of the card, never an error: the card must not break an export), and
`push_export` uploads a finished export, checking token and endpoint before it writes anything remote.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from blip2_train.utils.errors import Blip2TrainError

log = logging.getLogger(__name__)
CARD = "README.md"
NOT_RECORDED = "not recorded"


@dataclass(frozen=True)
class License:
    id: str  # the Hub's `license` field
    name: str
    slug: str | None = None  # the Hub's `license_name` when `id` is "other"
    link: str | None = None


MIT = License("mit", "MIT")
APACHE = License("apache-2.0", "Apache-2.0")
UNKNOWN = License("unknown", "unknown")
OPT = License("other", "OPT-175B license (non-commercial research use)", "opt-175b-license",
              "https://github.com/facebookresearch/metaseq/blob/main/projects/OPT/MODEL_LICENSE.md")
LLAMA = License("other", "the LLaMA-family license of the base (it depends on the release)", "llama-family")

# Each transformers class an export loads as, and the Hub task that class serves. Stage 1: transformers maps
# blip-2 to Blip2ForImageTextRetrieval for zero-shot image classification (AutoModel would load Blip2Model and
# drop the ITC / ITM heads), so `pipeline("zero-shot-image-classification", export)` runs the exported heads.
# Stages 2 and 3: transformers 5 replaced the image-to-text task by image-text-to-text (prompt or instruction in).
KINDS = {1: ("Blip2ForImageTextRetrieval", "Blip2Processor", "zero-shot-image-classification"),
         2: ("Blip2ForConditionalGeneration", "Blip2Processor", "image-text-to-text"),
         3: ("InstructBlipForConditionalGeneration", "InstructBlipProcessor", "image-text-to-text")}
# What each starting point of a model config contributes, in the order a reader follows the weights.
SOURCES = (("vision_checkpoint", "the ViT's weights"), ("bert_checkpoint", "the Q-Former's initialisation (BERT)"),
           ("stage1_checkpoint", "the stage-1 result: ViT, Q-Former and query tokens"),
           ("stage2_checkpoint", "the stage-2 result it continued from"),
           ("instruct_checkpoint", "the InstructBLIP result it continued from"),
           ("qformer_text_init", "the Q-Former's text parts"), ("llm", "the frozen LLM"))
# metrics.json holds training figures beside the evaluation's: these are not evaluation figures
TRAINING_FIGURES = ("train/", "data/", "val/", "lr-", "global_step", "nonfinite_skipped")
TIMINGS = ("_seconds", "samples_per_s")
CITATION = {
    "blip2": "@inproceedings{li2023blip2,\n  title={{BLIP-2}: Bootstrapping Language-Image Pre-training with Frozen "
             "Image Encoders and Large Language Models},\n  author={Li, Junnan and Li, Dongxu and Savarese, Silvio "
             "and Hoi, Steven},\n  booktitle={ICML},\n  year={2023}\n}",
    "instructblip": "@inproceedings{dai2023instructblip,\n  title={{InstructBLIP}: Towards General-purpose "
                    "Vision-Language Models with Instruction Tuning},\n  author={Dai, Wenliang and Li, Junnan and "
                    "Li, Dongxu and Tiong, Anthony Meng Huat and Zhao, Junqi and Wang, Weisheng and Li, Boyang and "
                    "Fung, Pascale and Hoi, Steven},\n  booktitle={NeurIPS},\n  year={2023}\n}"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def dig(d, dotted: str):
    """d["a"]["b"] for "a.b", None where any level is missing."""
    for k in dotted.split("."):
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def hub_id_of(path) -> str | None:
    """The hub id a local path stands for, where the path says so: a Hugging Face cache snapshot
    (`.../models--ORG--NAME/snapshots/<sha>`). A plain saved directory does not record where it came from."""
    m = re.search(r"(?:^|/)models--([^/]+)/snapshots/", str(path or ""))
    return m.group(1).replace("--", "/", 1) if m else None


# ---- the parts and their licenses --------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    name: str
    shape: str
    license: License
    why: str


def llm_part(config: dict, run_config: dict | None) -> Part:
    text = config.get("text_config") or {}
    family = text.get("model_type", "?")
    hint = str(dig(run_config, "model.llm") or "").lower()
    width = text.get("hidden_size") or text.get("d_model")
    layers = text.get("num_hidden_layers") or text.get("num_layers")
    shape = f"{family}, {layers} layers, width {width}"
    if family == "opt":
        return Part("LLM", shape, OPT, "OPT (Meta) is released under the OPT-175B license")
    if family == "t5":
        name = "FlanT5" if "flan" in hint else "T5 / FlanT5"
        return Part("LLM", shape, APACHE, f"{name} (Google) is released under Apache-2.0")
    if family == "llama":
        why = ("a LLaMA-family LLM: LLaMA 1 has a non-commercial research license, Llama 2 / 3 Meta's community "
               "licenses")
        if "vicuna" in hint:
            why += "; Vicuna v1.1 (LMSYS, fine-tuned from LLaMA 1) states a non-commercial license, v1.5 Llama 2's"
        return Part("LLM", shape, LLAMA, why + ": check the base's own card")
    return Part("LLM", shape, UNKNOWN, f"no license known for the {family!r} family here: check the base's own card")


def parts(stage: int, config: dict, run_config: dict | None) -> list[Part]:
    v, q = config.get("vision_config") or {}, config.get("qformer_config") or {}
    vshape = (f"{v.get('num_hidden_layers')} layers, width {v.get('hidden_size')}, patch {v.get('patch_size')}, "
              f"{v.get('image_size')} px")
    # EVA ViT-g/14 as BLIP-2 uses it: 1408 wide, patch 14, its 40 blocks or the 39 BLIP-2 keeps
    if v.get("hidden_size") == 1408 and v.get("patch_size") == 14 and v.get("num_hidden_layers") in (39, 40):
        vit = Part("ViT", "EVA ViT-g/14: " + vshape, MIT,
                   "EVA ViT-g (BAAI) is MIT, as are BLIP-2's released weights (Salesforce)")
    else:
        vit = Part("ViT", vshape, UNKNOWN, "not the EVA ViT-g/14 shape: its source decides; check the base's own card")
    qshape = (f"{q.get('num_hidden_layers')} layers, width {q.get('hidden_size')}, "
              f"{config.get('num_query_tokens')} query tokens")
    if q.get("hidden_size") == 768 and q.get("num_hidden_layers") == 12:
        qformer = Part("Q-Former", "BERT-base: " + qshape, APACHE,
                       "initialised from BERT-base (bert-base-uncased, Apache-2.0) in the BLIP-2 recipe")
    else:
        qformer = Part("Q-Former", qshape, UNKNOWN, "not the BERT-base shape: its initialisation decides; check "
                       "its source")
    return [vit, qformer] + ([llm_part(config, run_config)] if stage >= 2 else [])


def overall_license(licenses: list[License]) -> License:
    """A restrictive base binds the whole export; an unknown one leaves it unknown; MIT with Apache-2.0 parts is
    declared Apache-2.0 (the stricter of the two permissive licenses; the card lists each part's own)."""
    for lic in licenses:
        if lic.id == "other":
            return lic
    ids = {lic.id for lic in licenses}
    if "unknown" in ids or not ids:
        return UNKNOWN
    return MIT if ids == {"mit"} else APACHE


# ---- the card ---------------------------------------------------------------------------------------------


def model_card(meta: dict, config: dict, *, model_id: str, run_config: dict | None = None,
               metrics: dict | None = None, metrics_origin: str | None = None, checkpoint: str | None = None,
               step: int | None = None, reference: bool = False, base_models=()) -> str:
    """The README.md of an export: YAML front matter the Hub reads, then what it is, how it was trained and
    evaluated, how to load it, and its license. `model_id`: what `from_pretrained` is given in the loading
    snippet (the hub repo, or the export directory); `run_config`: the run's resolved config (a reference
    checkpoint: the config blip2-export composed for it); `metrics`: the run's metrics.json; `base_models`: hub ids
    of the bases, declared by the user (local paths cannot say which hub model they hold)."""
    stage = int(meta.get("stage") or 2)
    cls, processor, pipeline_tag = KINDS.get(stage, KINDS[2])
    the_parts = parts(stage, config, run_config)
    lic = overall_license([p.license for p in the_parts])
    sources = [(key, role, dig(run_config, f"model.{key}")) for key, role in SOURCES]
    sources = [(k, role, str(p)) for k, role, p in sources if p not in (None, "", "???") and (k != "llm" or stage > 1)]
    bases = list(dict.fromkeys([*base_models, *(h for _, _, p in sources if (h := hub_id_of(p)))]))
    family = (config.get("text_config") or {}).get("model_type") if stage >= 2 else None
    front = {"license": lic.id}
    if lic.id == "other":
        front["license_name"] = lic.slug
        if lic.link:
            front["license_link"] = lic.link
    if bases:
        front["base_model"] = bases
    front.update({"library_name": "transformers", "pipeline_tag": pipeline_tag,
                  "tags": [t for t in ("instructblip" if stage == 3 else "blip-2", "blip2-train",
                                       {1: "image-text-retrieval", 2: "image-captioning",
                                        3: "visual-question-answering"}[stage], family) if t]})
    datasets = [s.get("name") for s in dig(run_config, "data.train_sources") or [] if isinstance(s, dict)]
    datasets = [d for d in datasets if isinstance(d, str) and HUB_ID.match(d)]  # local shard names are not hub ids
    if datasets:
        front["datasets"] = datasets
    import yaml

    vit = "a ViT (trained too: `model.freeze_vision` false)" if dig(run_config, "model.freeze_vision") is False \
        else "a frozen ViT"
    what = {1: f"BLIP-2 stage 1: {vit} and a Q-Former trained with image-text contrastive (ITC), image-text "
               "matching (ITM) and image-grounded generation (LM) losses",
            2: f"BLIP-2 stage 2: {vit}, a Q-Former whose query outputs are projected into a frozen LLM as a soft "
               "visual prompt, for captioning and visual question answering",
            3: f"InstructBLIP: {vit}, an instruction-aware Q-Former (the instruction enters it beside the queries) "
               "and a frozen LLM, instruction-tuned"}[stage]
    origin = ("a reference (LAVIS) checkpoint" if reference else "a blip2-train checkpoint")
    if checkpoint:
        origin += f" `{checkpoint}`" + (f" (step {step})" if step is not None else "")
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {Path(str(model_id)).name or model_id}", "",
             f"{what}. Loads in plain transformers as `{cls}` with `{processor}`. Exported by "
             f"{meta.get('exporter', 'blip2-train')} from {origin}.", "", "## Model", "",
             "| part | shape |", "| --- | --- |"]
    lines += [f"| {p.name} | {p.shape} |" for p in the_parts]
    lines += ["", f"Image size {meta.get('image_size', NOT_RECORDED)} px; ViT final LayerNorm eps "
                  f"{meta.get('ln_vision_eps', NOT_RECORDED)}; weights in {config.get('dtype', NOT_RECORDED)}"
                  + (f" (LLM), ViT in {dig(config, 'vision_config.dtype')}" if dig(config, "vision_config.dtype")
                     else "") + ".", ""]
    adapter = meta.get("adapter") or {}
    if adapter:
        settings = ", ".join(f"{k} {v}" for k, v in adapter.items() if k not in ("merged", "base", "dir"))
        lines += [f"The LLM was trained with an adapter ({settings}): " + (
            "merged into the LLM's weights." if adapter.get("merged", True) else
            f"kept apart in `{adapter.get('dir')}/`, on the base LLM `{adapter.get('base')}` (see below)."), ""]
    lines += ["Built from:", ""]
    if sources:
        for key, role, path in sources:
            hub = hub_id_of(path)
            lines.append(f"- {role} (`model.{key}`): " + (f"[{hub}](https://huggingface.co/{hub})" if hub else
                                                           f"the local path `{path}`"))
    else:
        lines.append(f"- {NOT_RECORDED} (no run config)")
    if stage == 1 and run_config is not None and not any(k in ("vision_checkpoint", "stage1_checkpoint")
                                                         for k, _, _ in sources):
        lines.append("- the ViT: none given (`model.vision_checkpoint` null): randomly initialised and frozen")
    if base_models:
        lines.append("- declared at export (`--base-model`): " + ", ".join(f"`{b}`" for b in base_models))
    lines += [""] + training_section(run_config, reference)
    lines += [""] + evaluation_section(metrics, metrics_origin, run_config, step, reference)
    lines += [""] + usage_section(stage, cls, processor, model_id, meta, config)
    declared = f"`{lic.id}`" + (f" ({lic.name}{': ' + lic.link if lic.link else ''})" if lic.id == "other" else "")
    lines += ["", "## License", "", f"Declared: {declared}. Each part:", "", "| part | license | why |",
              "| --- | --- | --- |"]
    lines += [f"| {p.name} | {p.license.name} | {p.why} |" for p in the_parts]
    lines += ["", "A restrictive base binds the whole export; where a part's license is unknown, so is the export's. "
                  "The training data's own terms apply as well. This is derived from the recorded architecture, "
                  "not legal advice: check each base's own card."]
    cite = [CITATION["blip2"]] + ([CITATION["instructblip"]] if stage == 3 else [])
    lines += ["", "## Citation", "", "```bibtex", *cite, "```", ""]
    return "\n".join(lines)


def training_section(run_config: dict | None, reference: bool) -> list[str]:
    out = ["## Training", ""]
    if run_config is None:
        return out + [f"Training data and config: {NOT_RECORDED} (no config.yaml beside the checkpoint, and no "
                      "`--config` given)."]
    if reference:
        out += ["Trained by the reference implementation (LAVIS); blip2-export composed the config below to rebuild "
                "it, so it describes the architecture, not the training.", ""]
    def val(key):
        v = dig(run_config, key)
        return NOT_RECORDED if v is None else f"`{v}`"
    target = str(dig(run_config, "module._target_") or "").rsplit(".", 1)[-1] or NOT_RECORDED
    out += [f"- experiment: {val('task_name')} (module `{target}`), seed {val('seed')}",
            f"- steps: {val('trainer.max_steps')}; batch {val('data.batch_size')} per device, "
            f"{val('trainer.devices')} device(s) x {val('trainer.num_nodes')} node(s), gradient accumulation "
            f"{val('trainer.accumulate_grad_batches')}",
            f"- optimiser: lr {val('module.lr')}, min lr {val('module.min_lr')}, warmup {val('module.warmup_steps')} "
            f"steps, weight decay {val('module.weight_decay')}; precision {val('trainer.precision')}",
            f"- ViT frozen: {val('model.freeze_vision')}; image size {val('data.image_size')} px"]
    if dig(run_config, "model.text.prompt") is not None:
        out.append(f"- prompt: {val('model.text.prompt')}")
    train_sources = [s for s in dig(run_config, "data.train_sources") or [] if isinstance(s, dict)]
    if train_sources:
        out += ["", "Training data (WebDataset shards, mixed by weight):", "", "| source | shards | weight |",
                "| --- | --- | --- |"]
        out += [f"| {s.get('name')} | `{s.get('urls')}` | {s.get('weight', NOT_RECORDED)} |" for s in train_sources]
    else:
        out += ["", f"Training data: {NOT_RECORDED}."]
    import yaml

    out += ["", "<details><summary>The resolved config</summary>", "", "```yaml",
            yaml.safe_dump(run_config, sort_keys=False, allow_unicode=True).rstrip(), "```", "", "</details>"]
    return out


def protocol_lines(run_config: dict) -> list[str]:
    """What decides the evaluation's figures, as the run's `eval` and `data.eval_set` recorded them."""
    ev, es = dig(run_config, "eval") or {}, dig(run_config, "data.eval_set") or {}
    kind = ev.get("kind", "retrieval")
    files = [es.get(k) for k in ("annotation", "questions") if es.get(k)]
    out = [f"- task: {kind}; set: " + (", ".join(f"`{f}`" for f in files) or NOT_RECORDED)
           + (f" ({es.get('format')})" if es.get("format") else "")
           + (f", the first {es['limit']} images only" if es.get("limit") else "")]
    if kind == "retrieval":
        out.append(f"- ITC top-k re-ranked by ITM: k_test {ev.get('k_test', 128)}, score "
                   f"{ev.get('rerank_score', 'reference')}")
    else:
        key = "generate" if kind == "caption" else "vqa_generate"
        out.append(f"- decoding: {json.dumps(ev.get(key) or {})}; prompt "
                   f"{json.dumps(dig(run_config, 'model.text.prompt') or '')}; image-blind baseline "
                   f"{bool(ev.get('image_blind_baseline', False))}"
                   + (f"; VQA scorer {ev.get('vqa_metric', 'reference')}" if kind == "vqa" else ""))
    return out


def evaluation_figures(metrics: dict | None) -> dict:
    """The evaluation's figures among metrics.json's (which also holds the last training step's)."""
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and not k.startswith(TRAINING_FIGURES) and not k.endswith(TIMINGS)}


def evaluation_section(metrics: dict | None, origin: str | None, run_config: dict | None, step: int | None,
                       reference: bool) -> list[str]:
    out = ["## Evaluation", ""]
    if metrics is None:
        why = ("a reference checkpoint has no run" if reference else origin or "no metrics.json in the run directory")
        return out + [f"Evaluation figures: {NOT_RECORDED} ({why}). Evaluate the export with `blip2-eval` "
                      "(e.g. `experiment=retrieval_coco_eval` / `caption_coco_eval` / `vqa_vqav2_eval`)."]
    figures = evaluation_figures(metrics)
    at = metrics.get("global_step")
    if not figures:
        return out + [f"Evaluation figures: {NOT_RECORDED}: {origin} holds training figures only (the run had "
                      "`eval.enabled=false`, or a later resume rewrote it). Evaluate the export with `blip2-eval`."]
    out.append(f"The run's final evaluation ({origin}" + (f", step {at}" if at is not None else "") + "):")
    if at is not None and step is not None and at != step:
        out += ["", f"**These figures are from step {at}; this export is from step {step}.**"]
    out += [""] + (protocol_lines(run_config) if run_config else [f"- protocol: {NOT_RECORDED}"])
    order = sorted(figures, key=lambda k: [(0, int(t), "") if t.isdigit() else (1, 0, t)
                                           for t in re.split(r"(\d+)", k)])
    main = {k: figures[k] for k in order if "/" not in k}  # r1, r5, r10: in rank order
    rest = {k: figures[k] for k in order if "/" in k}
    def fmt(k, v):  # counts (num_images, num_questions) as counts
        return str(int(v)) if k.startswith("num_") and float(v).is_integer() else f"{v:.2f}" if isinstance(v, float) \
            else str(v)
    out += ["", "| metric | value |", "| --- | --- |"] + [f"| {k} | {fmt(k, v)} |" for k, v in main.items()]
    if rest:  # baselines, re-ranking variants, per-type breakdowns
        out += ["", "<details><summary>More figures</summary>", "", "| metric | value |", "| --- | --- |"]
        out += [f"| {k} | {fmt(k, v)} |" for k, v in rest.items()] + ["", "</details>"]
    return out


def usage_section(stage: int, cls: str, processor: str, model_id: str, meta: dict, config: dict) -> list[str]:
    """A snippet that runs as it stands in a directory holding `image.jpg`."""
    adapter = meta.get("adapter") or {}
    if adapter and not adapter.get("merged", True):  # the LLM's LoRA adapter apart: the base LLM + peft
        from blip2_train.models.export import ADAPTER_ONLY_LOADING

        head = [f"export, base_llm = {json.dumps(str(model_id))}, {json.dumps(str(adapter.get('base')))}",
                *ADAPTER_ONLY_LOADING.format(cls=cls).strip().splitlines(), "model.eval()",
                "from PIL import Image", 'image = Image.open("image.jpg").convert("RGB")']
    else:
        head = ["import torch", "from PIL import Image", f"from transformers import {cls}, {processor}", "",
                f"model = {cls}.from_pretrained({json.dumps(str(model_id))}).eval()",
                f"processor = {processor}.from_pretrained({json.dumps(str(model_id))})",
                'image = Image.open("image.jpg").convert("RGB")']
    if stage == 1:
        body = ['texts = ["a photo of a dog", "a photo of a cat"]', "with torch.no_grad():",
                "    # ITC: cosine similarity of the image to each text (unscaled: the trained temperature is",
                "    # `temp` in blip2_train_extras.safetensors)",
                '    inputs = processor(images=image, text=texts, return_tensors="pt", padding=True)',
                "    itc = model(**inputs, use_image_text_matching_head=False).logits_per_image[0]",
                "    # ITM: the probability that each (image, text) pair matches",
                '    pairs = processor(images=[image] * len(texts), text=texts, return_tensors="pt", padding=True)',
                "    itm = model(**pairs, use_image_text_matching_head=True).logits_per_image.softmax(-1)[:, 1]",
                "for t, s, p in zip(texts, itc.tolist(), itm.tolist()):",
                '    print(f"{t}: itc {s:.3f}, itm {p:.3f}")']
        tail = ["", f'`pipeline("zero-shot-image-classification", model={json.dumps(str(model_id))})` runs the '
                "ITC head too. With blip2-train: `blip2_train.load(...)` scores pairs (`.score(images, texts, "
                "head=\"itm\")`), and `paths.stage1_checkpoint=<this>` starts stage 2 or retrieval fine-tuning."]
    else:
        gen = ", ".join(f"{k}={v!r}" for k, v in (meta.get("generate_kwargs") or {}).items())
        decoder_only = not meta.get("encoder_decoder", config.get("use_decoder_only_language_model") is False)
        if stage == 2:
            text, say = json.dumps(meta.get("prompt") or ""), "the prompt it was trained with"
        else:
            template = meta.get("template")
            text = (json.dumps(template.replace("{}", "What is in the image?")) if template and "{}" in template
                    else json.dumps("Describe the image in detail."))
            say = "an instruction" + (" in its evaluation template" if template and "{}" in template else "")
        new = 'ids[:, inputs["input_ids"].shape[1]:]' if decoder_only else "ids"  # a decoder-only LLM echoes its input
        body = [f"inputs = processor(images=image, text={text}, return_tensors=\"pt\")  # {say}",
                "with torch.no_grad():", f"    ids = model.generate(**inputs{', ' + gen if gen else ''})"
                + "  # the decoding its evaluation used",
                f"print(processor.batch_decode({new}, skip_special_tokens=True)[0].strip())"]
        tail = ["", "With blip2-train: `blip2_train.load(...)` (`.caption(images)`" + (", `.generate(images, "
                "instructions)`" if stage == 3 else ", `.answer(images, questions)`") + ") and `blip2-generate` read "
                "the same decoding from `blip2_train.json`."]
    return ["## How to use", "", "```python", *head, *body, "```", *tail]


# ---- gathering the run's files, writing, pushing ----------------------------------------------------------


def find_run_dir(checkpoint, config_file=None) -> Path | None:
    """The run directory of a checkpoint (`<run>/checkpoints/x.ckpt`, `<run>/snapshots/x.ckpt`, `<run>/x.ckpt`):
    where its config.yaml is, as blip2-export finds the config; `--config`'s directory when given."""
    if config_file:
        return Path(config_file).resolve().parent
    p = Path(checkpoint).resolve()
    return next((d for d in (p.parent, p.parent.parent) if (d / "config.yaml").exists()), None)


def read_json(path: Path) -> tuple[dict | None, str]:
    """(content, how it reads in the card); (None, why) for a missing or unreadable file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"no {path.name} in {path.parent}"
    except (OSError, ValueError) as e:
        return None, f"{path} is unreadable: {str(e).splitlines()[0]}"
    return (data, f"`{path}`") if isinstance(data, dict) else (None, f"{path} is not a JSON object")


def write_card(out_dir, *, checkpoint, model_id: str, config_file=None, composed=None, step=None,
               base_models=()) -> tuple[Path, str]:
    """Write `<out_dir>/README.md`; -> (its path, a one-line description for the summary). `composed`: the
    config blip2-export built for a reference `.pth` (no run directory); else the run's config.yaml is read
    again here, as recorded (blip2-export changes its copy, e.g. the ViT's export precision)."""
    from omegaconf import OmegaConf

    out = Path(out_dir)
    run_dir = None if composed is not None else find_run_dir(checkpoint, config_file)
    run_config, metrics, origin = None, None, None
    try:
        if composed is not None:
            run_config = OmegaConf.to_container(composed, resolve=True)
        elif config_file or run_dir is not None:
            run_config = OmegaConf.to_container(OmegaConf.load(config_file or run_dir / "config.yaml"), resolve=True)
    except Exception as e:  # noqa: BLE001 - an unreadable config is a line of the card, not a failed export
        log.warning("model card: the run config is unreadable (%s)", str(e).splitlines()[0] if str(e) else e)
    if run_dir is not None:
        metrics, origin = read_json(run_dir / "metrics.json")
    meta, _ = read_json(out / "blip2_train.json")
    config, _ = read_json(out / "config.json")
    text = model_card(meta or {}, config or {}, model_id=model_id, run_config=run_config, metrics=metrics,
                      metrics_origin=origin, checkpoint=str(checkpoint), step=step, reference=composed is not None,
                      base_models=base_models)
    (out / CARD).write_text(text)
    lic = overall_license([p.license for p in parts(int((meta or {}).get("stage") or 2), config or {}, run_config)])
    figures = len(evaluation_figures(metrics))
    return out / CARD, (f"license {lic.id}; "
                        + (f"{figures} evaluation figures" if figures else f"evaluation {NOT_RECORDED}"))


class HubError(Blip2TrainError):
    """The push to the Hub cannot happen (offline, no token, endpoint unreachable) or failed."""


def check_hub(repo_id: str, later: str) -> str:
    """The token, once the Hub is known to be reachable with it; nothing remote is written here."""
    from huggingface_hub import constants, get_token, whoami

    if constants.HF_HUB_OFFLINE:
        raise HubError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set; {later}")
    token = get_token()
    if not token:
        raise HubError(f"cannot push to {repo_id}: no Hugging Face token (set HF_TOKEN or run `hf auth login`); "
                       f"{later}")
    try:
        whoami(token=token)  # read-only: proves the endpoint answers and accepts the token
    except Exception as e:  # noqa: BLE001 - any failure to talk to the Hub is one line
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            raise HubError(f"cannot push to {repo_id}: {constants.ENDPOINT} refused the token (401); {later}") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"cannot push to {repo_id}: {constants.ENDPOINT} is unreachable ({first}); {later}") from None
    return token


def push_export(out_dir, repo_id: str, private: bool = False, revision: str | None = None) -> str:
    """Upload a finished export as a model repo (created if missing); -> its URL. Token, offline mode and the
    endpoint are checked first, so a failure there writes nothing remote and leaves the local export as it is."""
    from huggingface_hub import create_branch, create_repo, upload_folder

    later = (f"the export in {out_dir} is complete; push it later with `hf upload {repo_id} {out_dir} .`"
             + (f" --revision {revision}" if revision else ""))
    token = check_hub(repo_id, later)
    try:
        url = create_repo(repo_id, token=token, private=private or None, exist_ok=True)
        if revision:
            create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        upload_folder(repo_id=repo_id, folder_path=str(out_dir), token=token, revision=revision,
                      commit_message="Upload a blip2-train export")
    except Exception as e:  # noqa: BLE001 - permissions, quota, network: one line, the local export kept
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"push to {repo_id} failed: {first}; {later}") from None
    return str(url) + (f"/tree/{revision}" if revision else "")


def hub_repo_id(value: str) -> str:
    """argparse type of `--push-to-hub` / `--base-model`: ORG/NAME."""
    import argparse

    if not HUB_ID.match(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a hub id (ORG/NAME, e.g. Salesforce/blip2-opt-2.7b)")
    return value


def finish_export(out_dir, *, checkpoint, config_file=None, composed=None, step=None, base_models=(),
                  push_to_hub: str | None = None, private: bool = False, revision: str | None = None
                  ) -> list[tuple[str, str]]:
    """After the export is written: its model card, then the upload if asked. -> the summary's rows."""
    rows = []
    try:
        path, said = write_card(out_dir, checkpoint=checkpoint, model_id=push_to_hub or str(out_dir),
                                config_file=config_file, composed=composed, step=step, base_models=base_models)
        rows.append(("model card", f"{path} ({said})"))
    except Exception as e:  # noqa: BLE001 - the card must never break an export that is written
        log.warning("model card not written: %s", e)
        rows.append(("model card", f"not written ({str(e).splitlines()[0] if str(e) else type(e).__name__})"))
    if push_to_hub:
        rows.append(("hub", push_export(out_dir, push_to_hub, private, revision)))
    return rows
