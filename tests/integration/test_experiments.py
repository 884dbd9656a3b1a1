"""Every shipped experiment, run as a user runs it: `blip2-train` / `blip2-eval` / `blip2-export` through its
experiment file with `preset=tiny` on the synthetic world, on 1 process and on 2 processes launched by torchrun
(gloo). Training experiments: a few steps, export, resume. Evaluation experiments: a few images, 2 ranks = 1 rank,
each rank encoding only its share. The chain follows the user's path: stage 1 -> export -> stage 2 -> export ->
caption fine-tuning -> export -> captioning evaluation; stage 1 -> retrieval fine-tuning; retrieval evaluation of
a 32 px export at 48 px (the 224 -> 364 px case) and of a reference-layout `.pth`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from helpers.tiny import tiny_cli
from helpers.procs import REPO, run

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
# name[+variant]: the README's FlanT5 workflow is stage2_pretrain with model=stage2_flant5
TRAIN = ["stage1_pretrain", "stage2_pretrain", "stage2_pretrain+flant5", "caption_coco_ft", "caption_coco_ft_frozen_vit",
         "retrieval_coco_ft", "instruct_tune", "instruct_tune+flant5", "vqa_vqav2_ft"]
INSTRUCT = ("instruct_tune", "vqa_vqav2_ft")
EVAL = ["retrieval_coco_eval", "retrieval_flickr_eval", "caption_coco_eval", "caption_nocaps_eval", "vqa_vqav2_eval",
        "vqa_okvqa_eval", "vqa_gqa_eval"]
# run on 1 and 2 processes in their own module (they need a model that has learned something, or other data)
ELSEWHERE = {"classify_zeroshot_eval": "test_classify.py"}


def test_the_matrix_covers_every_experiment_file():
    assert sorted({n.split("+")[0] for n in TRAIN} | set(EVAL) | set(ELSEWHERE)) == EXPERIMENTS
    assert all((Path(__file__).parent / f).exists() for f in ELSEWHERE.values())


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def small(synth, llm, tool: str = "train") -> list[str]:
    """preset=tiny, then smaller still: a few steps, a few images, short generation."""
    if tool == "eval":  # blip2-eval has no trainer; the preset's own train-only keys are ignored there
        return ["preset=tiny", f"paths.data_dir={synth['dir']}", "data.num_workers=0", "data.eval_set.limit=6",
                "eval.k_test=3", "eval.generate.num_beams=2", "eval.generate.max_new_tokens=6",
                "eval.generate.min_new_tokens=2"]
    return tiny_cli(synth, "trainer.max_steps=2", "data.batch_size=4",
                    "data.samples_per_epoch=32", "data.eval_set.limit=6", "eval.k_test=3",
                    "eval.generate.num_beams=2", "eval.generate.max_new_tokens=6", "eval.generate.min_new_tokens=2")


def starts(name: str, chain: dict) -> list[str]:
    """Where each experiment starts from, as the README says."""
    if name == "stage1_pretrain":
        return []
    if name == "stage2_pretrain":
        return [f"paths.stage1_checkpoint={chain['export/stage1_pretrain']}", f"paths.llm_dir={chain['opt']}"]
    if name == "stage2_pretrain+flant5":
        return [f"paths.stage1_checkpoint={chain['export/stage1_pretrain']}", "model=stage2_flant5",
                f"paths.llm_dir={chain['t5']}"]
    if name in ("instruct_tune", "vqa_vqav2_ft"):  # from the stage-2 result, the LLM it was trained with (OPT)
        return [f"paths.stage2_checkpoint={chain['export/stage2_pretrain']}", f"paths.llm_dir={chain['opt']}",
                "model=instruct_opt"]
    if name == "instruct_tune+flant5":
        return [f"paths.stage2_checkpoint={chain['export/stage2_pretrain+flant5']}", "model=instruct_flant5",
                f"paths.llm_dir={chain['t5']}"]
    if name.startswith("caption_coco_ft"):
        return [f"paths.stage2_checkpoint={chain['export/stage2_pretrain']}"]
    if name == "retrieval_coco_ft":  # fine-tuned at a higher resolution than stage 1 (the reference: 224 -> 364 px)
        return [f"paths.stage1_checkpoint={chain['export/stage1_pretrain']}", "data.image_size=48"]
    if name == "retrieval_coco_eval":  # an export holds the Q-Former tokenizer: no paths.bert_dir needed
        # re-ranked as make demo re-ranks (the flickr run keeps the default, the reference's score)
        return [f"paths.stage1_checkpoint={chain['export/retrieval_coco_ft']}", "data.image_size=48",
                "paths.bert_dir=???", "eval.rerank_score=product"]
    if name == "retrieval_flickr_eval":  # the official .pth layout of the 32 px stage-1 result, at 48 px
        return [f"paths.stage1_checkpoint={chain['pth']}", "data.image_size=48"]
    if name == "caption_coco_eval":  # as make demo runs it: with the image-blind baseline
        return [f"paths.stage2_checkpoint={chain['export/caption_coco_ft']}", "eval.image_blind_baseline=true"]
    assert name.startswith(("caption_", "vqa_")) and name.endswith("_eval"), name
    return [f"paths.stage2_checkpoint={chain['export/caption_coco_ft']}"]


@pytest.fixture(scope="module")
def chain(synth, tiny_llms, tmp_path_factory) -> dict:
    """The user's chain on one process, each training experiment followed by its export."""
    from blip2_train.cli.export import main as export_main
    from blip2_train.models.convert import ours_to_reference
    from blip2_train.models.export import read_stage1_export_weights

    root = tmp_path_factory.mktemp("chain")
    out: dict = {"root": root, "opt": tiny_llms["opt"], "t5": tiny_llms["t5"]}
    for name in TRAIN:
        run_dir = root / name
        run("train", [f"experiment={name.split('+')[0]}", *small(synth, tiny_llms["opt"]), *starts(name, out),
                      f"paths.output_dir={run_dir}"])
        out[name] = run_dir
        if name != "caption_coco_ft_frozen_vit":
            # blip2-export's entry point in this process (test_strategies.py and test_fsdp2.py run its command line)
            assert export_main([str(run_dir / "checkpoints" / "last.ckpt"), "--out", str(root / f"export_{name}")]) == 0
            out[f"export/{name}"] = root / f"export_{name}"
        if name == "stage1_pretrain":  # the official layout: blip2_pretrained.pth
            ref = ours_to_reference(read_stage1_export_weights(out["export/stage1_pretrain"]))
            torch.save({"model": ref}, root / "blip2_pretrained.pth")
            out["pth"] = root / "blip2_pretrained.pth"
    return out


@pytest.mark.parametrize("name", TRAIN)
def test_train_experiment_one_process_export_and_resume(name, chain, synth, tiny_llms):
    run_dir = chain[name]
    m = metrics(run_dir)
    assert m["global_step"] == 2 and m["nonfinite_skipped"] == 0
    final = "img_r1" if name.startswith(("stage1", "retrieval")) else "accuracy" if name.startswith(INSTRUCT) else "cider"
    assert final in m  # its final evaluation
    # a requeued job: the same command with ckpt_path=auto continues from last.ckpt
    r = run("train", [f"experiment={name.split('+')[0]}", *small(synth, tiny_llms["opt"]), *starts(name, chain),
                      f"paths.output_dir={run_dir}", "ckpt_path=auto", "trainer.max_steps=3", "eval.enabled=false"])
    assert "resuming from" in r.stderr and metrics(run_dir)["global_step"] == 3
    if name == "stage1_pretrain":
        from transformers import Blip2ForImageTextRetrieval

        Blip2ForImageTextRetrieval.from_pretrained(str(chain["export/stage1_pretrain"]))
    elif name.startswith(INSTRUCT):
        from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

        InstructBlipForConditionalGeneration.from_pretrained(str(chain[f"export/{name}"]))
        InstructBlipProcessor.from_pretrained(str(chain[f"export/{name}"]))
    elif f"export/{name}" in chain:
        from transformers import Blip2ForConditionalGeneration

        Blip2ForConditionalGeneration.from_pretrained(str(chain[f"export/{name}"]))


@pytest.mark.parametrize("name", TRAIN)
def test_train_experiment_two_processes(name, chain, synth, tiny_llms, tmp_path):
    run_dir = tmp_path / "run"
    # the final evaluation sharded over both ranks, once per kind (captioning pays a METEOR JVM start: ~5 s)
    final_eval = name in ("stage1_pretrain", "retrieval_coco_ft", "caption_coco_ft")
    r = run("train", [f"experiment={name.split('+')[0]}", *small(synth, tiny_llms["opt"]), *starts(name, chain),
                      f"paths.output_dir={run_dir}", f"eval.enabled={final_eval}"], nproc=2)
    m = metrics(run_dir)
    assert m["global_step"] == 2 and (run_dir / "checkpoints" / "last.ckpt").exists()
    assert list(run_dir.parent.iterdir()) == [run_dir]  # one output directory for both ranks
    if final_eval:  # each rank encoded its half of the 6 images
        assert "rank 0/2 encodes images [0, 3) of 6" in r.stderr and "rank 1/2 encodes images [3, 6) of 6" in r.stderr
        assert ("img_r1" in m) if name != "caption_coco_ft" else ("cider" in m)


def eval_args(name, chain, synth, tiny_llms, out):
    return [f"experiment={name}", *small(synth, tiny_llms["opt"], "eval"), *starts(name, chain),
            f"paths.output_dir={out}"]


@pytest.mark.parametrize("name", EVAL)
def test_eval_experiment_one_and_two_processes_agree(name, chain, synth, tiny_llms, tmp_path):
    run("eval", eval_args(name, chain, synth, tiny_llms, tmp_path / "one"))
    # 2 processes through the shipped launcher: run_scripts/eval_<kind>_<set>.sh starts torchrun with GPUS=2
    kind, dataset = name.split("_")[:2]
    r = run("eval", eval_args(name, chain, synth, tiny_llms, tmp_path / "two")[1:], nproc=2,
            script=f"eval_{kind}_{dataset}.sh")
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert "rank 0/2 encodes images [0, 3) of 6" in r.stderr and "rank 1/2 encodes images [3, 6) of 6" in r.stderr
    if name.startswith("retrieval"):  # the ITC matrix is computed in row shards too
        assert "rank 0/2 computes ITC rows [0, 3) x 18 texts" in r.stderr, r.stderr[-2000:]
        assert "rank 1/2 computes ITC rows [3, 6) x 18 texts" in r.stderr
    timing = ("eval_seconds", "eval_itc_seconds")
    assert {k for k in one if k not in timing} == {k for k in two if k not in timing} and len(one) > 5
    for k, v in one.items():
        if k not in timing:
            assert two[k] == pytest.approx(v, abs=1e-9), k
    if name.startswith("caption"):
        p1 = json.loads((tmp_path / "one" / "captions_predictions.json").read_text())
        p2 = json.loads((tmp_path / "two" / "captions_predictions.json").read_text())
        assert p1 == p2 and len(p1) == 6  # written once, by rank 0, all images
        assert not any(p["caption"].startswith("a photo of") for p in p1)  # the prompt is not generated again
        if name == "caption_coco_eval":
            assert "blind/cider" in one and "blind/bleu4" in one
        if name == "caption_nocaps_eval":
            assert any(k.startswith(("in-domain", "near-domain", "out-domain")) for k in one), one.keys()
    elif name.startswith("vqa"):
        p1 = json.loads((tmp_path / "one" / "vqa_predictions.json").read_text())
        assert p1 == json.loads((tmp_path / "two" / "vqa_predictions.json").read_text()) and len(p1) == 6
        assert 0.0 <= one["accuracy"] <= 100.0 and any(k.startswith("question_type/") for k in one)
    else:
        assert one["txt_r10"] <= 100.0 and one["img_r1"] <= one["img_r5"] <= one["img_r10"]
        # both score rules from one ITM pass; the headline is the configured one's (the temperature the run learnt,
        # from an export and from the official .pth layout)
        rule = "product" if name == "retrieval_coco_eval" else "reference"
        for k in ("txt_r1", "img_r1", "r_mean"):
            assert one[k] == one[f"rerank_{rule}/{k}"] and f"rerank_product/{k}" in one, k
        assert 0.001 <= one["itc_temp"] <= 0.5


def test_caption_labels_hold_the_prompt_once_and_never_as_a_target(synth, tiny_llms):
    """caption_coco_ft composed as shipped: the prompt sits once in the input, masked; labels are the caption."""
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from blip2_train.config.compose import compose

    cfg = compose("train", ["experiment=caption_coco_ft", *small(synth, tiny_llms["opt"]),
                            f"paths.stage2_checkpoint={tiny_llms['opt']}"])
    with open_dict(cfg):
        cfg.paths.output_dir = "/tmp/unused"
    assert cfg.data.text.prompt == "a photo of"
    dm = instantiate(cfg.data)
    stream = dm.build_train_stream(0, 1)
    batch = next(iter(stream))
    tok = dm.tokenizer
    prompt_ids = tok("a photo of", add_special_tokens=False)["input_ids"]
    for ids, labels, caption in zip(batch["input_ids"], batch["labels"], batch["caption"]):
        text = tok.decode([int(i) for i in ids if i != tok.pad_token_id and i != dm.make_collator().image_id])
        assert text.count("a photo of") == 1 and not caption.startswith("a photo of"), text
        targets = [int(i) for i in labels if i != -100]
        decoded = tok.decode(targets).strip()  # the caption, or its head when cut at max_txt_len (the reference)
        assert decoded and caption.strip().startswith(decoded), (decoded, caption)
        n = len(prompt_ids)
        assert not any(targets[i:i + n] == prompt_ids for i in range(len(targets)))


def tagged(out: Path, r: int) -> dict:
    return json.loads((out.parent / f"{out.name}.{r}").read_text())


@pytest.mark.parametrize("where", ["1", "all"])
def test_nonfinite_step_on_one_or_all_ranks_is_skipped_together(where, synth, tmp_path):
    """A NaN loss at step 5 of 12 (on rank 1, or on both ranks) under 2-process DDP: every rank skips that
    optimizer step, counts it, and the run finishes its 12 steps."""
    out = tmp_path / "ranks"
    run("train", ["experiment=stage1_pretrain",
                  *tiny_cli(synth, "trainer.max_steps=12", "data.batch_size=4", "data.samples_per_epoch=64",
                            "eval.enabled=false", f"paths.output_dir={tmp_path / 'run'}",
                            "+callbacks.nan._target_=helpers.fault_injection.NaNLossAt", "+callbacks.nan.step=5",
                            f"+callbacks.nan.rank={where}", f"+callbacks.nan.report={out}")],
        nproc=2, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    for r in range(2):
        report = tagged(out, r)
        assert report["global_step"] == 12 and report["nonfinite_total"] == 1, report
        assert report["adamw_steps"] == 11, report  # 12 steps, one of them skipped on this rank too
        assert report["finite"], report  # no NaN reached the weights
    assert metrics(tmp_path / "run")["nonfinite_skipped"] == 1


def test_instruct_nonfinite_step_on_one_rank_is_skipped_together(chain, synth, tiny_llms, tmp_path):
    """Instruction tuning under 2-process DDP with a NaN loss on rank 1 at step 3 of 6: both ranks skip it."""
    out = tmp_path / "ranks"
    run("train", ["experiment=instruct_tune", *small(synth, tiny_llms["opt"]), *starts("instruct_tune", chain),
                  "trainer.max_steps=6", "eval.enabled=false", f"paths.output_dir={tmp_path / 'run'}",
                  "+callbacks.nan._target_=helpers.fault_injection.NaNLossAt", "+callbacks.nan.step=3",
                  "+callbacks.nan.rank=1", f"+callbacks.nan.report={out}"],
        nproc=2, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    for r in range(2):
        report = tagged(out, r)
        assert report["global_step"] == 6 and report["nonfinite_total"] == 1 and report["adamw_steps"] == 5, report
        assert report["finite"], report
    assert metrics(tmp_path / "run")["nonfinite_skipped"] == 1


def test_stage2_export_keeps_the_frozen_towers_source_precision(chain, synth, tiny_llms, tmp_path):
    """Stage 2 with the frozen towers in bf16 (arch.frozen_dtype, as on GPUs): the export's ViT is the stage-1
    result's fp32 tensors (not bf16-rounded, so caption_coco_ft unfreezes the original weights), its LLM is bf16,
    and config.json says bfloat16, so plain `from_pretrained` does not upcast the LLM."""
    from transformers import Blip2ForConditionalGeneration

    from blip2_train.models.convert import load_hf_weights

    run_dir = tmp_path / "run"
    run("train", ["experiment=stage2_pretrain", *small(synth, tiny_llms["opt"]), *starts("stage2_pretrain", chain),
                  "arch.frozen_dtype=bfloat16", "eval.enabled=false", f"paths.output_dir={run_dir}"])
    run("export", [str(run_dir / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "e")])
    exported, stage1 = load_hf_weights(tmp_path / "e"), load_hf_weights(chain["export/stage1_pretrain"])
    k = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert exported[k].dtype == torch.float32 and torch.equal(exported[k], stage1[k])
    assert exported["language_model.model.decoder.layers.0.fc1.weight"].dtype == torch.bfloat16
    assert Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "e")).language_model.dtype == torch.bfloat16


def test_instruct_export_runs_the_vqa_and_caption_evaluations(chain, synth, tiny_llms, tmp_path):
    """An InstructBLIP export given to the shipped VQA and captioning evaluations as a stage-2 one is evaluated as
    what it is (the prompt its instruction), on 1 and 2 processes with the same answers."""
    export = chain["export/instruct_tune"]
    for n, out in ((1, tmp_path / "one"), (2, tmp_path / "two")):
        r = run("eval", ["experiment=vqa_vqav2_eval", *small(synth, tiny_llms["opt"], "eval"),
                         f"paths.stage2_checkpoint={export}", f"paths.output_dir={out}"], nproc=n)
        assert "is an InstructBLIP export: evaluating it as one" in r.stderr
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert one["accuracy"] == pytest.approx(two["accuracy"], abs=1e-9) and 0.0 <= one["accuracy"] <= 100.0
    p1 = json.loads((tmp_path / "one" / "vqa_predictions.json").read_text())
    assert p1 == json.loads((tmp_path / "two" / "vqa_predictions.json").read_text()) and len(p1) == 6
    run("eval", ["experiment=caption_coco_eval", *small(synth, tiny_llms["opt"], "eval"),
                 f"paths.stage2_checkpoint={export}", "model.text.prompt=A short image caption:",
                 f"paths.output_dir={tmp_path / 'cap'}"])
    assert "cider" in metrics(tmp_path / "cap")


def test_instruct_export_generates_from_the_command_line_and_the_api(chain, synth, tmp_path):
    import blip2_train
    from helpers.procs import cli, one_line

    export, images = chain["export/instruct_tune"], sorted((Path(synth["root"])).rglob("*.jpg"))[:3]
    out = tmp_path / "answers.jsonl"
    r = cli(str(export), *map(str, images), "--instruction", "what color is the circle?", "--out", str(out),
            "--num-beams", "2", "--max-new-tokens", "4", tool="generate")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["what color is the circle?"] * 3 and "3 captioned" in r.stderr
    m = blip2_train.load(export, device="cpu")
    kw = dict(num_beams=2, max_new_tokens=4)
    assert m.generate([str(i) for i in images], ["what color is the circle?"] * 3, **kw) == [row["text"] for row in rows]
    # multi-turn: the earlier turns go before the instruction in the training data's format
    turn = m.generate(str(images[0]), "and the square?", context=[("what color is the circle?", "red")], **kw)
    assert turn == m.generate(str(images[0]), "Question: what color is the circle? Answer: red Question: and the "
                                              "square? Answer:", **kw)
    line = one_line(cli(str(chain["export/stage2_pretrain"]), str(images[0]), "--instruction", "hi", tool="generate"))
    assert "--instruction needs an instruction-tuned one" in line


def test_instruct_bad_template_is_one_line_before_any_work(chain, synth, tiny_llms, tmp_path):
    from helpers.procs import cli, one_line

    line = one_line(cli("experiment=instruct_tune", *small(synth, tiny_llms["opt"]), *starts("instruct_tune", chain),
                        "data.templates.vqa=[Question without a slot]", f"paths.output_dir={tmp_path / 'run'}"))
    assert "data.templates.vqa" in line and "Question without a slot" in line, line
    assert not (tmp_path / "run" / "checkpoints").exists()
