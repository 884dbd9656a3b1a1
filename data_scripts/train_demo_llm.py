#!/usr/bin/env python
"""DEMO STAND-IN for a pretrained LLM: a tiny OPT-architecture model trained on the captions' language only.

BLIP-2 freezes an LLM that already knows language. No LLM can be downloaded here, so the demo trains a tiny
one on the training captions (text only, no images) and then freezes it in stage 2, exactly as a real run
freezes OPT-2.7B. It knows how captions are worded, not what any image shows.

    python data_scripts/train_demo_llm.py --annotations data/synthetic/coco/annotations/coco_karpathy_train.json \
        --out data/synthetic/llm
"""

import argparse
import json
from pathlib import Path


def qa_texts(data_dir: str) -> list[tuple[str, str]]:
    """(caption, "Question: q Short answer: a") for questions about the train scenes, in the VQA evaluation's
    template: the LM learns the format and to read the answer from its context, never from an image."""
    from blip2_train.demo.world_vqa import build_questions, grid_size, read_scenes
    from blip2_train.eval.vqa import question_prompt

    scenes = read_scenes(data_dir, "train")
    grid = grid_size(scenes)
    out = []
    for q in build_questions(scenes, per_image=3, noise=0.0, seed=1):
        scene = scenes[q["image_index"]]
        context = scene.get("caption") or scene_words(scene, grid)  # the adapter keeps a caption; scenes.json not
        out.append((context, question_prompt("Question: {} Short answer:", q["question"]) + " " + q["answers"][0]))
    return out


def described_captions(data_dir: str, records, prompt: str = "") -> list[tuple[str, str]]:
    """(the scene's description, objects in a random order; one of its captions) for every train caption.

    With `prompt` (caption fine-tuning's, "a photo of"), one caption in two is also read as "<prompt> <caption>":
    a real LLM has read "a photo of a dog" many times; a stand-in that never read the prompt's words continued
    them with fragments of words after caption fine-tuning ("a photo of" -> "hows a yellow square", measured),
    and the frozen LLM cannot learn them there. Added, not substituted: with half the plain captions replaced,
    the stand-in continued a bare soft prompt with a question ("Question: what shape is ...", measured) more
    often than with a caption, and stage 2's captions without a prompt scored CIDEr 10 instead of ~200.

    A real LLM reads a description in its context and writes about it in its own words and order. A tiny LM
    trained to continue its own words in order (`pretrain_on_captions`' default context) learns to copy in
    order: given another caption of the same image as context it did worse than with none (loss 1.24 vs 0.80
    per token, measured), so a soft prompt could not help it when a caption names the objects in another order,
    and stage 2 learnt to ignore the image (CIDEr at the image-blind baseline)."""
    import random

    from blip2_train.demo.world_vqa import grid_size, read_scenes

    rng = random.Random(2)
    scenes = read_scenes(data_dir, "train")
    by_image = {s["image"]: s for s in scenes}
    grid = grid_size(scenes)
    out = []
    for r in records:
        scene = by_image[r.image]
        for cap in r.captions:
            shuffled = dict(scene, objects=rng.sample(scene["objects"], len(scene["objects"])))
            out.append((scene_words(shuffled, grid), cap))
            if prompt and rng.random() < 0.5:
                out.append((out[-1][0], f"{prompt} {cap}"))
    return out


def scene_words(scene: dict, grid: int) -> str:
    """A caption-like description of a scene record: every object's colour, shape and cell, the background."""
    from blip2_train.demo.world_vqa import cell_name

    text = " and ".join(f"a {o['color']} {o['shape']} in the {cell_name(o['row'], o['col'], grid)}"
                        for o in scene["objects"])
    return text + (f" on a {scene['background']} background" if scene.get("background") else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", required=True)
    p.add_argument("--format", default="karpathy")
    p.add_argument("--out", required=True)
    p.add_argument("--family", default="opt", choices=["opt", "llama", "gpt2", "t5"])
    # 300 leaves ~44 merges over the byte alphabet: nearly character-level ("yellow" is 7 tokens, a caption of
    # world 1 ~35). 512 makes every word of the captions and questions one token (docs/itm_at_tiny_size.md)
    p.add_argument("--vocab-size", type=int, default=300)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--qa-data-dir", default=None,
                   help="also teach the question-answer format: questions about the train scenes of this synthetic "
                        "data dir, each after the scene's description (what a real LLM brings to zero-shot VQA)")
    p.add_argument("--caption-context", default="own-words", choices=["own-words", "description"],
                   help="what precedes each caption: some of its own words, in order (the demo's), or its scene's "
                        "description with the objects in a random order (needs --qa-data-dir; "
                        "docs/itm_at_tiny_size.md)")
    p.add_argument("--caption-prompt", default="",
                   help="the prompt caption fine-tuning puts before each caption (experiment=caption_coco_ft's "
                        "model.text.prompt, 'a photo of'): half the captions are also read after it (needs "
                        "--caption-context description)")
    p.add_argument("--end-text", default="\n",
                   help='what ends a caption: "\\n" as OPT in the reference (model.text.end_text); "" = eos')
    a = p.parse_args()
    if a.caption_context == "description" and not a.qa_data_dir:
        p.error("--caption-context description reads the scenes: give --qa-data-dir")
    if a.caption_prompt and a.caption_context != "description":
        p.error("--caption-prompt needs --caption-context description (an own-words context is the caption itself)")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from blip2_train.data.annotations import read_annotations
    from blip2_train.demo.llm import make_tiny_llm, pretrain_on_captions, train_llm_tokenizer

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(a.out)
    records = read_annotations(a.annotations, a.format)
    texts = [c for r in records for c in r.captions]
    qa = qa_texts(a.qa_data_dir) if a.qa_data_dir else []
    captions = (described_captions(a.qa_data_dir, records, a.caption_prompt.strip())
                if a.caption_context == "description" else texts)
    # the tokenizer learns from the captions as written: the prompt's words are spelt with what they learnt
    # (with prompted captions among its texts, its 44 merges changed and zero-shot VQA lost 5 points, one run)
    train_llm_tokenizer(texts + [t for _, t in qa], out / "tokenizer", a.family, a.vocab_size)
    make_tiny_llm(a.family, out / "tokenizer", out, seed=a.seed, hidden=a.hidden, layers=a.layers)
    if a.family == "t5":
        print(f"tiny {a.family} saved to {out} (not pretrained: caption pretraining is for decoder-only models)")
        return
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    losses = pretrain_on_captions(model, tok, captions + qa, steps=a.steps, seed=a.seed, end_text=a.end_text or None)
    model.save_pretrained(str(out))
    (out / "demo_llm_losses.json").write_text(json.dumps(losses))
    print(f"demo LLM ({a.family}, text-only) saved to {out}: loss {losses[0]:.2f} -> {sum(losses[-20:]) / 20:.2f}")


if __name__ == "__main__":
    main()
