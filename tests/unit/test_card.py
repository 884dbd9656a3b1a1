"""The model card every export carries: front matter the Hub reads (license from the bases, pipeline tag, base
models), the run's config and metrics or "not recorded", and a loading snippet that runs against the export."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import yaml

from helpers.tiny import TINY_QFORMER, TINY_VISION, tiny_stage2

# BLIP-2's towers at full size (conf/arch/vitg.yaml): the shapes the licenses are derived from
EVA_VITG = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16, image_size=224,
                patch_size=14)
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
LLMS = {"opt": dict(model_type="opt", hidden_size=2560, num_hidden_layers=32),
        "t5": dict(model_type="t5", d_model=2048, num_layers=24),
        "llama": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32)}
OPT_LICENSE = "https://github.com/facebookresearch/metaseq/blob/main/projects/OPT/MODEL_LICENSE.md"
CASES = {  # name: (stage, LLM family, LLM path, license, pipeline tag, transformers class)
    "stage1": (1, None, None, "apache-2.0", "zero-shot-image-classification", "Blip2ForImageTextRetrieval"),
    "opt": (2, "opt", "/ckpt/opt-2.7b", "other", "image-text-to-text", "Blip2ForConditionalGeneration"),
    "flant5": (2, "t5", "/ckpt/flan-t5-xl", "apache-2.0", "image-text-to-text", "Blip2ForConditionalGeneration"),
    "vicuna": (3, "llama", "/ckpt/vicuna-7b", "other", "image-text-to-text", "InstructBlipForConditionalGeneration"),
}


def full_size_config(stage: int, family: str | None) -> dict:
    """config.json of a full-size export (transformers' own config classes; no weights built)."""
    from transformers import Blip2Config, InstructBlipConfig

    cls = InstructBlipConfig if stage == 3 else Blip2Config
    return cls(vision_config=EVA_VITG, qformer_config=BERT_BASE, text_config=LLMS[family] if family else None,
               num_query_tokens=32).to_dict()


def front_matter(card: str) -> dict:
    m = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert m, card[:200]
    return yaml.safe_load(m.group(1))


def snippet(card: str) -> str:
    return re.search(r"## How to use\n\n```python\n(.*?)\n```", card, re.S).group(1)


@pytest.mark.parametrize("name", CASES)
def test_front_matter_license_pipeline_and_class_follow_the_bases(name):
    from huggingface_hub import ModelCard

    from blip2_train.models.card import model_card

    stage, family, llm, license_, tag, cls = CASES[name]
    meta = {"stage": stage, "image_size": 224, "prompt": "a photo of", "encoder_decoder": family == "t5",
            "generate_kwargs": {"num_beams": 5}, "template": "Question: {} Short answer:"}
    card = model_card(meta, full_size_config(stage, family), model_id="me/blip2-x",
                      run_config={"model": {"llm": llm}} if llm else None)
    fm = front_matter(card)
    assert fm["license"] == license_ and fm["pipeline_tag"] == tag and fm["library_name"] == "transformers"
    assert ModelCard(card).data.license == license_  # the Hub's own parser reads the same
    assert "base_model" not in fm  # no hub id is known: local paths are not base models
    if family == "opt":
        assert fm["license_name"] == "opt-175b-license" and fm["license_link"] == OPT_LICENSE
    if family == "llama":  # the release decides: said so, and Vicuna's non-commercial terms named
        assert fm["license_name"] == "llama-family" and "check the base's own card" in card and "Vicuna v1.1" in card
    if stage == 1:  # EVA ViT-g (MIT) + a BERT-base Q-Former (Apache-2.0)
        assert "| ViT | MIT |" in card and "| Q-Former | Apache-2.0 |" in card
    code = snippet(card)
    assert f"{cls}.from_pretrained(\"me/blip2-x\")" in code
    assert ("ids[:, inputs[\"input_ids\"].shape[1]:]" in code) == (stage > 1 and family != "t5")
    # what the run did not record is said, not guessed
    assert "Evaluation figures: not recorded" in card
    assert ("Training data and config: not recorded" if llm is None else "experiment: not recorded") in card


def test_local_paths_are_described_and_cache_snapshots_become_base_models():
    from blip2_train.models.card import model_card

    snap = "/home/u/.cache/huggingface/hub/models--facebook--opt-2.7b/snapshots/0123abc"
    run = {"model": {"llm": snap, "stage1_checkpoint": "/work/exports/stage1"}}
    card = model_card({"stage": 2}, full_size_config(2, "opt"), model_id="exports/stage2", run_config=run,
                      base_models=["Salesforce/blip2-opt-2.7b"])
    assert front_matter(card)["base_model"] == ["Salesforce/blip2-opt-2.7b", "facebook/opt-2.7b"]
    assert "the local path `/work/exports/stage1`" in card and "[facebook/opt-2.7b](https://huggingface.co/" in card


@pytest.fixture(scope="module")
def exports(stage1_export, tiny_llms, tmp_path_factory) -> dict:
    """Real tiny exports of each kind, written by the exporters blip2-export calls."""
    from blip2_train.models.build_instruct import build_instruct_model, load_instruct_tokenizer
    from blip2_train.models.export import export_instruct, export_stage2
    from blip2_train.models.llm import load_llm_tokenizer

    root = tmp_path_factory.mktemp("card_exports")
    out = {"stage1": shutil.copytree(stage1_export, root / "stage1")}  # a copy: the card is written into it
    gen = {"num_beams": 2, "max_new_tokens": 5, "min_new_tokens": 1}
    for family in ("opt", "t5"):
        model = tiny_stage2(tiny_llms[family], stage1_export).eval()
        out[family] = export_stage2(model, load_llm_tokenizer(tiny_llms[family]), root / family, 32,
                                    prompt="a photo of", generate_kwargs=gen)
    specials = {"pad_token": "[PAD]", "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>"}
    model = build_instruct_model(llm=str(tiny_llms["llama"]), vision=TINY_VISION, qformer=TINY_QFORMER,
                                 num_query_tokens=4, llm_dtype="float32", attn_implementation="eager",
                                 llm_attn_implementation="eager", seed=0, ln_vision_eps=1e-5,
                                 stage1_checkpoint=str(stage1_export),
                                 text={"kind": "instruct", "qformer_tokenizer": str(stage1_export),
                                       "special_tokens": specials}).eval()
    out["instruct"] = export_instruct(model, load_instruct_tokenizer(tiny_llms["llama"], specials),
                                      model.qformer_tokenizer, root / "instruct", 32, generate_kwargs=gen,
                                      template="Question: {} Short answer:")
    return out


EXPECT = {"stage1": ("Blip2ForImageTextRetrieval", "zero-shot-image-classification", "img_r1"),
          "opt": ("Blip2ForConditionalGeneration", "image-text-to-text", "cider"),
          "t5": ("Blip2ForConditionalGeneration", "image-text-to-text", "cider"),
          "instruct": ("InstructBlipForConditionalGeneration", "image-text-to-text", "accuracy")}


@pytest.mark.parametrize("kind", EXPECT)
def test_the_card_of_a_real_export_records_the_run_and_its_snippet_runs(kind, exports, tmp_path, monkeypatch,
                                                                        capsys):
    from PIL import Image

    from blip2_train.models.card import write_card

    cls, tag, metric = EXPECT[kind]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    config = {"task_name": f"my_{kind}_run", "model": {"llm": "/ckpt/my-llm", "text": {"prompt": "a photo of"}},
              "module": {"_target_": "x.Stage2Module", "lr": 1.0e-4}, "trainer": {"max_steps": 7},
              "data": {"batch_size": 3, "train_sources": [{"name": "coco", "urls": "/d/shards/coco", "weight": 1.0}],
                       "eval_set": {"annotation": "/d/coco/val.json", "format": "karpathy", "limit": 6}},
              "eval": {"kind": "retrieval" if kind == "stage1" else "caption", "k_test": 3,
                       "generate": {"num_beams": 2}}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.json").write_text(json.dumps({"train/loss": 2.5, "global_step": 7, metric: 41.25,
                                                  "blind/" + metric: 3.5, "eval_seconds": 1.0, "num_images": 6.0}))
    path, said = write_card(exports[kind], checkpoint=run / "checkpoints" / "last.ckpt", model_id=str(exports[kind]),
                            step=9)
    card = path.read_text()
    fm = front_matter(card)
    assert fm["pipeline_tag"] == tag and fm["license"] in ("other", "unknown")  # tiny ViT: no license known for it
    assert fm["license"] == ("other" if kind in ("opt", "instruct") else "unknown")  # OPT / LLaMA bind it anyway
    assert "`my_" + kind + "_run`" in card and "`/d/shards/coco`" in card and "lr `0.0001`" in card
    assert f"| {metric} | 41.25 |" in card and f"| blind/{metric} | 3.50 |" in card  # headline, then the rest
    assert "train/loss" not in card.split("## Evaluation")[1].split("## How to use")[0]  # a training figure
    assert "These figures are from step 7; this export is from step 9" in card
    assert "| num_images | 6 |" in card and "the first 6 images only" in card and said.endswith("3 evaluation figures")
    code = snippet(card)
    assert f"from transformers import {cls}" in code
    # run as it stands, where an image.jpg is
    monkeypatch.chdir(tmp_path)
    Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()).save(
        tmp_path / "image.jpg")
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the card's own snippet, on the test's export
    printed = capsys.readouterr().out  # a tiny random LLM's caption may be empty: count the lines
    assert printed.count("\n") == (2 if kind == "stage1" else 1), printed


def test_missing_or_unreadable_run_files_are_not_recorded_never_an_error(exports, tmp_path):
    from blip2_train.models.card import write_card

    alone = tmp_path / "alone" / "last.ckpt"  # no config.yaml, no metrics.json anywhere near
    alone.parent.mkdir()
    card = write_card(exports["opt"], checkpoint=alone, model_id="x")[0].read_text()
    assert "Training data and config: not recorded" in card and "Evaluation figures: not recorded" in card
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("task_name: t\n")
    (run / "metrics.json").write_text("{not json")
    card = write_card(exports["opt"], checkpoint=run / "checkpoints" / "last.ckpt", model_id="x")[0].read_text()
    assert re.search(r"Evaluation figures: not recorded \(.*metrics.json is unreadable", card)
    (run / "metrics.json").write_text(json.dumps({"train/loss": 1.0, "global_step": 3}))  # eval.enabled=false
    card = write_card(exports["opt"], checkpoint=run / "checkpoints" / "last.ckpt", model_id="x")[0].read_text()
    assert "holds training figures only" in card
    assert "experiment: `t`" in card and "steps: not recorded" in card
    # a reference .pth: no run; the config blip2-export composed describes the architecture only
    from omegaconf import OmegaConf

    card = write_card(exports["opt"], checkpoint=tmp_path / "blip2_caption_opt2.7b.pth", model_id="x",
                      composed=OmegaConf.create({"task_name": "t", "model": {"llm": "/ckpt/opt-2.7b"}}))[0].read_text()
    assert "Trained by the reference implementation (LAVIS)" in card and "a reference checkpoint has no run" in card
    assert "from a reference (LAVIS) checkpoint" in card
