"""Batch collation with tokenization in the data workers (never in the model's forward)."""

from __future__ import annotations

import torch

from blip2_train.utils.errors import ConfigError


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
    """Images + LLM inputs with image tokens, labels and masks for stage 2 (built in the data workers), by the
    reference's rules (LAVIS `Blip2OPT.forward` / `Blip2T5.forward`).

    Decoder-only (OPT, LLaMA, GPT-2): `[<image> x Q] tok(prompt + " " + caption) end [pad...]`, right padded,
    truncated at `max_txt_len` tokens (BOS and end included): an over-long caption loses its end token, as the
    reference's truncation of `caption + "\n"` does (`keep_end_token` keeps it). Labels: -100 on image tokens
    and padding; the prompt (BOS included) is masked when there is one, while with an empty prompt the BOS
    after the queries is a target, as in the reference (`if self.prompt:`; `mask_bos_without_prompt` masks it
    too). Padding is read from the attention mask, never from the pad id: LLaMA-family tokenizers pad with unk
    or eos, and an eos that ends a caption must stay a label.

    Encoder-decoder (T5/FlanT5): encoder `[<image> x Q] tok(text_input)`, decoder labels `tok(text_output)`,
    each tokenised as the reference does (its `</s>` appended, truncated at `max_txt_len` with `</s>` kept).
    With `prefix_lm` (pretraining) each caption is split at a random word, uniform from the first word to half
    of them: the head is text_input, the rest text_output. Otherwise text_input is the prompt ("a photo of")
    and text_output the whole caption.
    """

    def __init__(self, tokenizer, num_query_tokens: int, image_token_id: int, end_token_id: int, prompt: str = "",
                 max_txt_len: int = 32, encoder_decoder: bool = False, prefix_lm: bool = False, seed: int = 0,
                 mask_bos_without_prompt: bool = False, keep_end_token: bool = False):
        self.tok = tokenizer
        self.nq, self.image_id, self.end_id = num_query_tokens, image_token_id, end_token_id
        self.prompt = prompt.strip()
        self.max_txt_len = max_txt_len
        self.encoder_decoder, self.prefix_lm = encoder_decoder, prefix_lm
        self.seed = seed
        self.mask_bos_without_prompt, self.keep_end_token = mask_bos_without_prompt, keep_end_token
        self.prompt_ids = self.tok(self.prompt)["input_ids"]
        if encoder_decoder and end_token_id != self.tok.eos_token_id:  # T5 texts end with the tokenizer's own
            raise ConfigError(f"an encoder-decoder LLM ends its texts with its eos ({self.tok.eos_token_id}), not "
                              f"{end_token_id}: set model.end_text=null")

    def _ids(self, text: str, special: bool = True) -> list[int]:
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def decoder_only_row(self, caption: str) -> tuple[list[int], list[int]]:
        full = self._ids(f"{self.prompt} {caption}" if self.prompt else caption)
        n_prompt = len(self.prompt_ids)
        if full[:n_prompt] != self.prompt_ids:
            raise ValueError(f"prompt {self.prompt!r} tokenizes differently inside {caption!r}: end the prompt at a "
                             "word boundary without trailing space")
        if self.keep_end_token:
            full = full[: self.max_txt_len - 1] + [self.end_id]
        else:
            full = (full + [self.end_id])[: self.max_txt_len]
        n_masked = n_prompt if self.prompt or self.mask_bos_without_prompt else 0
        ids = [self.image_id] * self.nq + full
        labels = [-100] * (self.nq + n_masked) + full[n_masked:]
        return ids, labels

    def prefix_split(self, caption: str, rng) -> tuple[str, str]:
        """(text_input, text_output) of prefix-LM pretraining. The reference's released code takes the two
        texts as given; a split at a word keeps each part's tokens what the tokenizer makes of that text."""
        words = caption.split()
        k = rng.randint(1, max(1, len(words) // 2))
        return " ".join(words[:k]), " ".join(words[k:])

    def encoder_decoder_row(self, caption: str, rng) -> tuple[list[int], list[int]]:
        text_input, text_output = self.prefix_split(caption, rng) if self.prefix_lm else (self.prompt, caption)
        enc, target = (self.tok(t, truncation=True, max_length=self.max_txt_len)["input_ids"]
                       for t in (text_input, text_output))
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

        from blip2_train.utils.hashing import stable_hash

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


class InstructCollator:
    """Images + the instruction for the Q-Former + LLM inputs, labels and masks for instruction tuning, by the
    reference's rules (LAVIS `Blip2VicunaInstruct.forward` / `Blip2T5Instruct.forward`).

    Q-Former: `[CLS] instruction [SEP]` after the queries, cut from the LEFT at `max_txt_len` (BERT tokens).
    Decoder-only: `[<image> x Q] tok(instruction) tok(answer) end [pad...]`: the instruction with its BOS, cut
    from the left at `max_txt_len` tokens; the answer and its end token cut from the right at
    `max_output_txt_len` tokens counting a BOS (so an over-long answer loses its end token, as the reference's).
    Labels: the answer and its end token only. Encoder-decoder: encoder `[<image> x Q] tok(instruction)` (cut from the left, its
    `</s>` kept), decoder labels `tok(answer)` (cut from the right, `</s>` kept).
    `instructions_truncated` counts the rows whose instruction was cut (Q-Former or LLM side).
    """

    def __init__(self, tokenizer, qformer_tokenizer, num_query_tokens: int, image_token_id: int,
                 max_txt_len: int = 128, max_output_txt_len: int = 256, encoder_decoder: bool = False,
                 end_token_id: int | None = None, answer_separator: str = ""):
        import copy

        self.tok_in, self.tok_out = copy.deepcopy(tokenizer), copy.deepcopy(tokenizer)
        self.tok_in.truncation_side, self.tok_out.truncation_side = "left", "right"
        self.qtok = copy.deepcopy(qformer_tokenizer)
        self.qtok.truncation_side = "left"
        self.nq, self.image_id = num_query_tokens, image_token_id
        self.max_txt_len, self.max_output_txt_len = max_txt_len, max_output_txt_len
        self.encoder_decoder = encoder_decoder
        from blip2_train.models.llm import special_prefix

        self.n_prefix = special_prefix(tokenizer)
        # decoder-only: the answer's end token (the tokenizer's eos, as the reference; OPT: "\n", as its captions
        # end) and what separates it from the instruction ("": sentencepiece starts every text with a word
        # boundary; " " for byte-level BPE, which would otherwise glue the answer to the instruction's last word)
        self.end_id = tokenizer.eos_token_id if end_token_id is None else end_token_id
        self.answer_separator = answer_separator

    def _input_ids(self, instruction: str) -> tuple[list[int], bool]:
        ids = self.tok_in(instruction, truncation=True, max_length=self.max_txt_len)["input_ids"]
        return ids, len(self.tok_in(instruction)["input_ids"]) > len(ids)

    def row(self, instruction: str, answer: str) -> tuple[list[int], list[int], bool]:
        """-> (LLM input ids, labels: decoder-only aligned with the ids, encoder-decoder the decoder targets,
        whether the instruction was cut)."""
        inp, cut = self._input_ids(instruction)
        if self.encoder_decoder:
            target = self.tok_out(answer, truncation=True, max_length=self.max_output_txt_len)["input_ids"]
            return [self.image_id] * self.nq + inp, target, cut
        # the reference tokenises `answer + eos` cut at max_output_txt_len tokens, its BOS included, then drops
        # the BOS: the same tokens, and an answer cut there loses its end token
        content = self.tok_out(self.answer_separator + answer, add_special_tokens=False)["input_ids"]
        out = (content + [self.end_id])[: self.max_output_txt_len - self.n_prefix]
        return [self.image_id] * self.nq + inp + out, [-100] * (self.nq + len(inp)) + out, cut

    def qformer_inputs(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        q = self.qtok(instructions, padding="longest", truncation=True, max_length=self.max_txt_len,
                      return_tensors="pt")
        full = [len(ids) for ids in self.qtok(instructions)["input_ids"]]
        return q["input_ids"], q["attention_mask"], [n > self.max_txt_len for n in full]

    def __call__(self, samples: list[dict], key: tuple = ()) -> dict:
        from blip2_train.models.stage2 import check_image_tokens

        instructions, answers = [s["instruction"] for s in samples], [s["answer"] for s in samples]
        pad = self.tok_in.pad_token_id
        batch = {"image": torch.stack([s["image"] for s in samples]),
                 "image_id": torch.tensor([s["image_id"] for s in samples], dtype=torch.long),
                 "instruction": instructions, "answer": answers}
        batch["qformer_input_ids"], batch["qformer_attention_mask"], q_cut = self.qformer_inputs(instructions)
        rows = [self.row(i, a) for i, a in zip(instructions, answers)]
        batch["input_ids"], batch["attention_mask"] = Stage2Collator._pad([r[0] for r in rows], pad)
        if self.encoder_decoder:
            batch["labels"], batch["decoder_attention_mask"] = Stage2Collator._pad([r[1] for r in rows], -100)
        else:
            batch["labels"], _ = Stage2Collator._pad([r[1] for r in rows], -100)
        batch["instructions_truncated"] = sum(bool(r[2] or c) for r, c in zip(rows, q_cut))  # an int: no device sync
        check_image_tokens(batch["input_ids"], self.image_id, self.nq)
        return batch

    def generation_inputs(self, instructions: list[str]) -> dict[str, torch.Tensor]:
        return instruct_generation_inputs(self.tok_in, self.qtok, self.nq, self.image_id, self.max_txt_len,
                                          self.encoder_decoder, instructions)


def instruct_generation_inputs(tokenizer, qformer_tokenizer, num_query_tokens: int, image_token_id: int,
                               max_txt_len: int, encoder_decoder: bool, instructions: list[str]) -> dict:
    """What `InstructBlipProcessor(images, text=instructions)` gives with the exported tokenizers: Q-Former tokens
    (`qformer_tokenizer` cuts from the left at max_txt_len, as the reference's generate), LLM tokens uncut (the
    reference's generate does not cut them), padded on the left for decoder-only LLMs after the image tokens."""
    q = qformer_tokenizer(instructions, padding="longest", truncation=True, max_length=max_txt_len,
                          return_tensors="pt")
    rows = [tokenizer(i)["input_ids"] for i in instructions]
    n, pad, nq = max(len(r) for r in rows), tokenizer.pad_token_id, num_query_tokens
    ids, att = [], []
    for r in rows:
        k = n - len(r)
        if encoder_decoder:  # T5's tokenizer pads on the right
            ids.append([image_token_id] * nq + r + [pad] * k)
            att.append([1] * (nq + len(r)) + [0] * k)
        else:
            ids.append([image_token_id] * nq + [pad] * k + r)
            att.append([1] * nq + [0] * k + [1] * len(r))
    return {"qformer_input_ids": q["input_ids"], "qformer_attention_mask": q["attention_mask"],
            "input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(att, dtype=torch.long)}
