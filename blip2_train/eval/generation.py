"""Prompted generation from a stage-2 model: one prompt per image, batched, the inputs `Blip2Processor` builds,
and the loop that generates on every rank and merges the outputs.

Shared by captioning (one prompt for all images), VQA (a question per image), `blip2-generate` and the Python API,
so that all four give the same text for the same image and prompt.
"""

from __future__ import annotations

import torch

from blip2_train.distributed.collectives import is_dist


# An instruction-tuned model's open-ended decoding where nothing else is given (conf/eval_protocol's
# instruct_generate, which an export records): the reference's InstructBLIP generate defaults.
INSTRUCT_GENERATION = {"num_beams": 5, "max_new_tokens": 256, "min_new_tokens": 1, "repetition_penalty": 1.5,
                       "length_penalty": 1.0}


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def prompt_inputs(model, tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `[<image> x Q] tokens(prompt)`, padded to the longest: on the left for decoder-only LLMs (generation
    continues every row from its last real token), on the right for encoder-decoder ones. -> (ids, mask)."""
    rows = [[model.image_token_id] * model.num_query_tokens + tokenizer(p.strip())["input_ids"] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), model.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if not model.is_encoder_decoder else slice(0, len(r))
        ids[i, span] = torch.tensor(r)
        mask[i, span] = 1
    return ids, mask


@torch.no_grad()
def generate_texts(model, tokenizer, pixel_values: torch.Tensor, prompts: list[str], generate_kwargs: dict) -> list[str]:
    """Images [B, 3, H, W] and B prompts -> B generated texts (the new tokens only, stripped)."""
    from blip2_train.models.stage2 import Blip2Stage2

    if not isinstance(model, Blip2Stage2):
        raise TypeError("generation needs a stage-2 model (an LLM to generate with)")
    from blip2_train.models.instruct import InstructBlip

    device = next(model.parameters()).device
    if isinstance(model, InstructBlip):  # the prompt is the instruction, for the Q-Former and the LLM
        from blip2_train.data.collate import instruct_generation_inputs

        inputs = instruct_generation_inputs(tokenizer, model.qformer_tokenizer, model.num_query_tokens,
                                            model.image_token_id, model.max_txt_len, model.is_encoder_decoder,
                                            [p.strip() for p in prompts])
        inputs = {k: v.to(device) for k, v in inputs.items()}
        ids = inputs["input_ids"]
        with autocast(device):
            gen = model.generate(pixel_values.to(device), **inputs, **generate_kwargs)
        return [t.strip() for t in tokenizer.batch_decode(model.new_tokens(gen, ids), skip_special_tokens=True)]
    ids, mask = prompt_inputs(model, tokenizer, prompts)
    ids, mask = ids.to(device), mask.to(device)
    with autocast(device):
        gen = model.generate(pixel_values.to(device), ids, mask, **generate_kwargs)
    return [t.strip() for t in tokenizer.batch_decode(model.new_tokens(gen, ids), skip_special_tokens=True)]


def gather_objects(local: list) -> list:
    if not is_dist():
        return list(local)
    import torch.distributed as dist

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [x for p in parts for x in p]


def generate_on_every_rank(model, produce) -> dict:
    """In eval mode, this rank's `(index, output)` pairs from `produce()`, gathered from every rank and
    de-duplicated (padded shards repeat items); the model's training modes are restored after."""
    was_training = model.training
    model.eval()
    try:
        merged: dict = {}
        for i, out in gather_objects(list(produce())):
            merged.setdefault(i, out)
        return merged
    finally:
        if was_training and hasattr(model, "set_train_modes"):
            model.set_train_modes(True)
