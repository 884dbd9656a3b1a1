"""Batch collation with tokenization in the data workers (never in the model's forward)."""

from __future__ import annotations

import torch


class CaptionCollator:
    """Stack images; tokenize captions with the Q-Former tokenizer (right truncation at `max_txt_len`)."""

    def __init__(self, tokenizer, max_txt_len: int = 32):
        self.tokenizer = tokenizer
        self.max_txt_len = max_txt_len

    def __call__(self, samples: list[dict], key: tuple = ()) -> dict:
        captions = [s["caption"] for s in samples]
        tok = self.tokenizer(captions, padding="longest", truncation=True, max_length=self.max_txt_len,
                             return_tensors="pt")
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "input_ids": tok["input_ids"],
            "attention_mask": tok["attention_mask"],
            "image_id": torch.tensor([s["image_id"] for s in samples], dtype=torch.long),
            "caption": captions,
        }


class Stage2Collator:
    """Images + LLM inputs with image tokens, labels and masks for stage 2 (built in the data workers).

    Decoder-only (OPT, LLaMA, GPT-2): `[<image> x Q] tok(prompt + " " + caption) end [pad...]`, right padded;
    labels are the caption tokens and the end token, -100 on image tokens, on the prompt (BOS included) and
    on padding. Padding is read from the attention mask, never from the pad id: LLaMA-family tokenizers pad
    with unk or eos, and an eos that ends a caption must stay a label.

    Encoder-decoder (T5/FlanT5): encoder `[<image> x Q] tok(prefix)`, decoder labels `tok(target)`. With
    `prefix_lm` (pretraining) each caption is split at a random token, uniform from 1 to the middle: the head
    goes to the encoder, the rest is the target. Otherwise the encoder gets the prompt ("a photo of") and the
    target is the whole caption.
    """

    def __init__(self, tokenizer, num_query_tokens: int, image_token_id: int, end_token_id: int, prompt: str = "",
                 max_txt_len: int = 32, encoder_decoder: bool = False, prefix_lm: bool = False, seed: int = 0):
        self.tok = tokenizer
        self.nq, self.image_id, self.end_id = num_query_tokens, image_token_id, end_token_id
        self.prompt = prompt.strip()
        self.max_txt_len = max_txt_len
        self.encoder_decoder, self.prefix_lm = encoder_decoder, prefix_lm
        self.seed = seed
        self.prompt_ids = self.tok(self.prompt)["input_ids"]

    def _ids(self, text: str, special: bool = True) -> list[int]:
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def decoder_only_row(self, caption: str) -> tuple[list[int], list[int]]:
        full = self._ids(f"{self.prompt} {caption}" if self.prompt else caption)
        n_prompt = len(self.prompt_ids)
        if full[:n_prompt] != self.prompt_ids:
            raise ValueError(f"prompt {self.prompt!r} tokenizes differently inside {caption!r}: end the prompt at a "
                             "word boundary without trailing space")
        full = full[: self.max_txt_len - 1] + [self.end_id]
        ids = [self.image_id] * self.nq + full
        labels = [-100] * (self.nq + n_prompt) + full[n_prompt:]
        return ids, labels

    def encoder_decoder_row(self, caption: str, rng) -> tuple[list[int], list[int]]:
        if self.prefix_lm:
            cap = self._ids(caption, special=False)[: self.max_txt_len - 1]
            k = rng.randint(1, max(1, len(cap) // 2))
            enc, target = cap[:k] + [self.end_id], cap[k:] + [self.end_id]
        else:
            enc = self.prompt_ids
            target = self._ids(caption, special=False)[: self.max_txt_len - 1] + [self.end_id]
        return [self.image_id] * self.nq + enc, target

    @staticmethod
    def _pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(len(r) for r in rows)
        out = torch.full((len(rows), n), value, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return out, mask

    def __call__(self, samples: list[dict], key: tuple = ()) -> dict:
        """`key` names the batch in its stream (epoch, rank, batch index): the prefix-LM split points are drawn
        from it and each sample, so they do not depend on which process or in what order batches are built."""
        import random

        from blip2_train.data.stream import stable_hash

        captions = [s["caption"] for s in samples]
        pad = self.tok.pad_token_id
        batch = {"image": torch.stack([s["image"] for s in samples]),
                 "image_id": torch.tensor([s["image_id"] for s in samples], dtype=torch.long),
                 "caption": captions}
        if self.encoder_decoder:
            rows = [self.encoder_decoder_row(c, random.Random(stable_hash(self.seed, *key, s["image_id"], c)))
                    for c, s in zip(captions, samples)]
            batch["input_ids"], batch["attention_mask"] = self._pad([r[0] for r in rows], pad)
            labels, batch["decoder_attention_mask"] = self._pad([r[1] for r in rows], -100)
            batch["labels"] = labels
        else:
            rows = [self.decoder_only_row(c) for c in captions]
            batch["input_ids"], batch["attention_mask"] = self._pad([r[0] for r in rows], pad)
            labels, _ = self._pad([r[1] for r in rows], -100)
            batch["labels"] = labels
        from blip2_train.models.stage2 import check_image_tokens

        check_image_tokens(batch["input_ids"], self.image_id, self.nq)
        return batch

    def generation_inputs(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`[<image> x Q] tok(prompt)` for every row: what `Blip2Processor(images, text=prompt)` gives."""
        ids = torch.tensor([[self.image_id] * self.nq + self.prompt_ids] * batch_size, dtype=torch.long)
        return ids, torch.ones_like(ids)
