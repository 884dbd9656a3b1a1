"""Batch collation with tokenization in the data workers (never in the model's forward)."""

from __future__ import annotations

import torch


class CaptionCollator:
    """Stack images; tokenize captions with the Q-Former tokenizer (right truncation at `max_txt_len`)."""

    def __init__(self, tokenizer, max_txt_len: int = 32):
        self.tokenizer = tokenizer
        self.max_txt_len = max_txt_len

    def __call__(self, samples: list[dict]) -> dict:
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
