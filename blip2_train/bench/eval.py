"""`blip2-bench eval`: retrieval evaluation, the batched protocol against the reference's one-image-at-a-time ITM
on the same model and images (identical metrics required)."""

from __future__ import annotations

from blip2_train.bench.doc import machine, write_section

def bench_eval(a) -> None:
    """Retrieval evaluation: our batched top-k/ITM protocol vs the reference's one-image-at-a-time ITM."""
    import torch
    from hydra.utils import instantiate

    from blip2_train.config.compose import compose
    from blip2_train.data.datamodule import Blip2DataModule
    from blip2_train.bench.retrieval_baseline import evaluate_retrieval_one_at_a_time
    from blip2_train.eval.retrieval import evaluate_retrieval

    torch.manual_seed(0)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = compose("train", [f"arch={a.arch}", "model=stage1_vitg", f"paths.bert_dir={a.tokenizer}",
                            "paths.vision_checkpoint=null", "model.bert_checkpoint=null",
                            f"data.image_size={a.image_size}", *a.override])
    model = instantiate(cfg.model)
    if a.checkpoint:
        from blip2_train.models.build_stage1 import load_stage1_weights

        load_stage1_weights(model, a.checkpoint)
    device = torch.device(a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()
    dm = Blip2DataModule(a.tokenizer, eval_set={"annotation": a.annotation, "image_root": a.image_root,
                                          "limit": a.images},
                         eval_batch_size=64, num_workers=2, image_size=a.image_size)
    data = dm.eval_data()
    runs = {}
    for name in ("fast", "baseline", "fast"):  # fast twice: the first run pays warm-up costs
        loader = dm.eval_image_loader(0, 1)
        if name == "fast":
            runs[name] = evaluate_retrieval(model, data, loader, dm.tokenizer, (0, len(data)), a.k_test,
                                            a.pair_batch_size)
        else:
            runs[name] = evaluate_retrieval_one_at_a_time(model, data, loader, dm.tokenizer, a.k_test)
    fast, base = runs["fast"], runs["baseline"]
    keys = [k for k in fast if k.startswith(("txt_r", "img_r", "r_mean"))]
    same = all(abs(fast[k] - base[k]) < 1e-9 for k in keys)
    ratio = base["eval_seconds"] / fast["eval_seconds"]
    body = ["## Retrieval evaluation (`blip2-bench eval`)\n",
            f"Command: `blip2-bench eval --arch {a.arch} --annotation {a.annotation} --images {a.images} "
            f"--k-test {a.k_test} --image-size {a.image_size}`  ",
            f"Machine: {machine()}, device {device}, {torch.get_num_threads()} threads; {len(data)} images x "
            f"{len(data.texts)} texts, k_test {a.k_test}, arch `{a.arch}`.\n",
            "| protocol | seconds (encode + ITC + ITM re-rank) | txt_r1 | img_r1 | r_mean |", "| --- | ---: | ---: | ---: | ---: |",
            f"| reference: one ITM forward per image, then per text (dense -100 matrices) | {base['eval_seconds']:.2f} | "
            f"{base['txt_r1']:.2f} | {base['img_r1']:.2f} | {base['r_mean']:.2f} |",
            f"| blip2-train: unique candidate pairs, batches of {a.pair_batch_size}, no dense matrix | "
            f"{fast['eval_seconds']:.2f} | {fast['txt_r1']:.2f} | {fast['img_r1']:.2f} | {fast['r_mean']:.2f} |",
            f"\n**Speed-up {ratio:.1f}x; metrics {'identical' if same else 'DIFFERENT'}.**"]
    text = "\n".join(body)
    print(text)
    write_section(f"eval-{a.arch}", text)
    if not same:
        raise SystemExit("metrics differ between the two protocols")
