"""Shared fixtures: a small synthetic dataset, its tokenizer and shards, built once per session with the same
scripts a user runs; tiny real transformers models built from configs."""

from __future__ import annotations

import os

import pytest

from helpers.tiny import tiny_stage1

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> dict:
    """The synthetic world laid out as the real data (what `preset=tiny` reads with paths.data_dir=synth["dir"]):
    COCO / VG / Flickr30k / NoCaps annotations, train shards of both sources, test shards, and the Q-Former
    tokenizer with a tiny random BERT beside it and the ViT stand-in (vit/), built with the same functions the data
    scripts run."""
    from blip2_train.data.annotations import read_annotations
    from blip2_train.data.shards import build_shards
    from blip2_train.demo.world import add_dataset_views, image_root, make_synthetic
    from blip2_train.demo.world_vqa import write_vg_qa, write_vqa_sets, write_vqa_train
    from blip2_train.demo.llm import make_tiny_bert
    from blip2_train.models.tokenizer import train_wordpiece_tokenizer

    root = tmp_path_factory.mktemp("synthetic")
    ann = make_synthetic(root, num_train=120, num_val=10, num_test=24, seed=1, image_size=32)
    ann.update(add_dataset_views(root))
    write_vqa_sets(root)  # vqav2/, okvqa/, gqa/: the VQA experiments' files
    vqa_train = write_vqa_train(root)  # VQAv2-format training questions on the train images
    vg_qa = write_vg_qa(root)  # Visual Genome QA's layout
    texts = [c for r in read_annotations(ann["train"], "karpathy") for c in r.captions]
    train_wordpiece_tokenizer(texts, root / "bert", 300)
    make_tiny_bert(root / "bert", root / "bert")
    # the demo ViT stand-in (paths.vision_checkpoint=<dir>/vit), a few steps: the tests need its format
    from omegaconf import OmegaConf

    from blip2_train.config.compose import compose
    from blip2_train.demo.vit import pretrain_demo_vit

    vision = OmegaConf.to_container(compose("train", ["experiment=stage1_pretrain", "preset=tiny"]).arch.vision,
                                    resolve=True)
    pretrain_demo_vit(root, root / "vit", vision, steps=5, batch_size=16, log=lambda s: None)
    for name, split in (("coco_karpathy_train", "train"), ("vg_caption", "vg"), ("test", "test")):
        build_shards(read_annotations(ann[split], "karpathy"), image_root(root), root / "shards" / name,
                     shard_size=15, progress=False)
    build_shards(read_annotations(",".join(map(str, vqa_train)), "vqa"), root / "vqav2" / "images",
                 root / "shards" / "vqav2_train", shard_size=15, progress=False)
    build_shards(read_annotations(vg_qa, "vg_qa"), root / "vg" / "qa_images", root / "shards" / "vg_qa",
                 shard_size=15, progress=False)
    # "root": what an annotation's image paths are relative to; "dir": paths.data_dir for preset=tiny
    return {"root": image_root(root), "dir": root, "ann": ann, "tokenizer": root / "bert",
            "train_shards": root / "shards" / "coco_karpathy_train", "test_shards": root / "shards" / "test"}


@pytest.fixture(scope="session")
def tokenizer(synth):
    from blip2_train.models.tokenizer import load_qformer_tokenizer

    return load_qformer_tokenizer(synth["tokenizer"])


@pytest.fixture
def tiny_model(synth):
    return tiny_stage1(synth["tokenizer"])


@pytest.fixture(scope="session")
def tiny_llms(synth, tmp_path_factory) -> dict:
    """Tiny OPT / LLaMA / GPT-2 / T5 models with tokenizers trained on the synthetic captions, saved to disk."""
    from blip2_train.data.annotations import read_annotations
    from blip2_train.demo.llm import make_tiny_llm, train_llm_tokenizer

    root = tmp_path_factory.mktemp("llms")
    texts = [c for r in read_annotations(synth["ann"]["train"], "karpathy") for c in r.captions]
    out = {}
    for i, fam in enumerate(("opt", "llama", "gpt2", "t5")):
        train_llm_tokenizer(texts, root / f"{fam}_tok", fam, vocab_size=200)
        make_tiny_llm(fam, root / f"{fam}_tok", root / fam, seed=i, hidden=32, layers=2)
        out[fam] = root / fam
    return out


@pytest.fixture(scope="session")
def stage1_export(synth, tmp_path_factory):
    """A tiny stage-1 model exported in the transformers format (the usual start of stage 2)."""
    from blip2_train.models.export import export_stage1
    from blip2_train.models.tokenizer import load_qformer_tokenizer

    model = tiny_stage1(synth["tokenizer"], seed=3)
    out = tmp_path_factory.mktemp("stage1_export")
    export_stage1(model, load_qformer_tokenizer(synth["tokenizer"]), out, image_size=32)
    return out


