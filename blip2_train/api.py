"""The Python API: load an export (or an official BLIP-2 transformers directory), then caption, answer or score.

    import blip2_train
    m = blip2_train.load("exports/caption")                 # stage 2: caption / answer
    m.caption(["a.jpg", "b.jpg"])                          # -> ["a dog on a bench", ...]
    m.answer(["a.jpg"], ["what colour is the dog?"])       # -> ["brown"]
    s = blip2_train.load("exports/retrieval")               # stage 1: score
    s.score(["a.jpg"], ["a dog on a bench"], head="itm")   # -> [match logit] per (image, text) pair

The same code path as `blip2-eval` (the image decoding and transform of evaluation, the prompt inputs and decoding
of the captioning and VQA evaluations), so the same images give the same texts. `blip2-generate` is this API on
files, folders and shards.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from blip2_train.data.eval_sets import load_eval_image
from blip2_train.data.transforms import EvalTransform
from blip2_train.eval.vqa import VQA_GENERATION, question_prompt
from blip2_train.eval.captioning import CAPTION_GENERATION
from blip2_train.eval.generation import autocast, generate_texts
from blip2_train.models.export import export_meta
from blip2_train.utils.errors import CheckpointError

__all__ = ["load", "Blip2Captioner", "Blip2Scorer", "VQA_PROMPT"]

VQA_PROMPT = "Question: {} Short answer:"  # the reference's zero-shot template (conf/experiment/vqa_*_eval.yaml)


def _config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.exists():
        raise CheckpointError(f"{path} has no config.json: not an export or a transformers BLIP-2 directory")
    return json.loads(cfg.read_text())


def _image_size(path: Path, cfg: dict) -> int:
    meta = export_meta(path)
    if meta.get("image_size"):
        return int(meta["image_size"])
    pre = path / "preprocessor_config.json"
    if pre.exists():
        size = json.loads(pre.read_text()).get("size", {})
        return int(size.get("height", size) if isinstance(size, dict) else size)
    return int(cfg["vision_config"]["image_size"])


def load(path: str | Path, device: str | torch.device | None = None, dtype: str | None = None):
    """A stage-2 directory (`Blip2ForConditionalGeneration`: our export or an official one) -> Blip2Captioner;
    a stage-1 export (`Blip2ForImageTextRetrieval`) -> Blip2Scorer. `dtype`: the frozen parts' dtype (default:
    what the directory records; "float32" on a CPU)."""
    p = Path(str(path))
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a directory (load takes an export or a transformers BLIP-2 directory)")
    cfg = _config(p)
    arch = (cfg.get("architectures") or [""])[0]
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if export_meta(p).get("stage") == 1 or arch == "Blip2ForImageTextRetrieval":
        return Blip2Scorer(p, cfg, dev)
    if export_meta(p).get("stage") == 2 or arch == "Blip2ForConditionalGeneration":
        return Blip2Captioner(p, cfg, dev, dtype)
    raise CheckpointError(f"{p}: config.json names {arch or 'no architecture'}; expected a BLIP-2 export "
                          "(Blip2ForConditionalGeneration or Blip2ForImageTextRetrieval)")


class _Images:
    def __init__(self, path: Path, cfg: dict, device: torch.device):
        self.path, self.device = path, device
        self.transform = EvalTransform(_image_size(path, cfg))

    def pixels(self, images) -> torch.Tensor:
        """Paths, encoded bytes or PIL images -> [B, 3, H, W], decoded as evaluation decodes them."""
        out = []
        for im in images:
            if hasattr(im, "convert"):  # a PIL image: already decoded
                out.append(self.transform(im.convert("RGB")))
            else:
                out.append(load_eval_image(im if isinstance(im, bytes) else str(im), self.transform))
        return torch.stack(out)


class Blip2Captioner(_Images):
    """A stage-2 model: `caption(images)`, `answer(images, questions)`, `generate(images, prompts)`."""

    def __init__(self, path: Path, cfg: dict, device: torch.device, dtype: str | None = None):
        from blip2_train.models.build_stage2 import build_stage2_model
        from blip2_train.models.llm import load_llm_tokenizer

        super().__init__(path, cfg, device)
        meta = export_meta(path)
        frozen = dtype or cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
        self.model = build_stage2_model(
            llm=str(path), vision=cfg["vision_config"], qformer=cfg["qformer_config"],
            num_query_tokens=int(cfg["num_query_tokens"]), llm_dtype=frozen,
            vision_dtype=dtype or cfg["vision_config"].get("dtype") or "float32",
            stage2_checkpoint=str(path), ln_vision_eps=meta.get("ln_vision_eps"))
        # where generation stops: what the export recorded (OPT: "\n"), else the config's (official: "\n" too)
        end = meta.get("end_token_id", cfg.get("text_config", {}).get("eos_token_id"))
        if end is not None:
            self.model.end_token_id = int(end)
        self.model.to(device).eval()
        self.tokenizer = load_llm_tokenizer(path)
        self.prompt = meta.get("prompt", "")  # the prompt the export was fine-tuned with ("a photo of")

    def generate(self, images, prompts: list[str], **generate_kwargs) -> list[str]:
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return generate_texts(self.model, self.tokenizer, self.pixels(images), list(prompts), generate_kwargs)

    def caption(self, images, prompt: str | None = None, **generate_kwargs) -> list[str]:
        """Captions with the export's prompt and the captioning evaluation's decoding (beam 5, 8-30 new tokens)."""
        p = self.prompt if prompt is None else prompt
        return self.generate(images, [p] * len(images), **{**CAPTION_GENERATION, **generate_kwargs})

    def answer(self, images, questions: list[str], template: str = VQA_PROMPT, **generate_kwargs) -> list[str]:
        """Short answers with the VQA evaluation's template and decoding (beam 5, 1-10 new tokens). Questions
        are used as given (the VQA evaluation lower-cases them: `blip2_train.data.vqa.clean_question`)."""
        prompts = [question_prompt(template, q) for q in questions]
        return self.generate(images, prompts, **{**VQA_GENERATION, **generate_kwargs})


class Blip2Scorer(_Images):
    """A stage-1 model: `score(images, texts, head)` for each (images[i], texts[i]) pair, as retrieval scores them:
    ITC = the highest query-text cosine similarity; ITM = the match logit."""

    def __init__(self, path: Path, cfg: dict, device: torch.device):
        from blip2_train.models.build_stage1 import build_stage1_model
        from blip2_train.models.tokenizer import load_qformer_tokenizer

        super().__init__(path, cfg, device)
        self.model = build_stage1_model(tokenizer=str(path), vision=cfg["vision_config"],
                                        qformer=cfg["qformer_config"], num_query_tokens=int(cfg["num_query_tokens"]),
                                        embed_dim=int(cfg["image_text_hidden_size"]), stage1_checkpoint=str(path),
                                        ln_vision_eps=export_meta(path).get("ln_vision_eps"))
        self.model.to(device).eval()
        self.tokenizer = load_qformer_tokenizer(path)

    @torch.no_grad()
    def score(self, images, texts: list[str], head: str = "itc", max_txt_len: int = 35) -> list[float]:
        from blip2_train.data.captions import clean_caption
        from blip2_train.eval.metrics.retrieval import itc_similarity

        if head not in ("itc", "itm"):
            raise ValueError(f"head must be 'itc' or 'itm', not {head!r}")
        if len(texts) != len(images):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        tok = self.tokenizer([clean_caption(t, 50) for t in texts], padding="longest", truncation=True,
                             max_length=max_txt_len, return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        with autocast(self.device):
            embeds, feats = self.model.retrieval_image_embeds(self.pixels(images).to(self.device))
            if head == "itm":
                return self.model.itm_forward(embeds.float(), ids, mask)[:, 1].float().tolist()
            text_feat = self.model.retrieval_text_feat(ids, mask).float()
        return torch.diagonal(itc_similarity(feats.float(), text_feat)).tolist()
