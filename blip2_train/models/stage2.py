"""Stage-2 BLIP-2: the Q-Former's query outputs, projected, are a soft visual prompt for a frozen LLM.

Built on `transformers.Blip2ForConditionalGeneration` (vision_model, query_tokens, qformer,
language_projection, language_model) so that an export is that class's checkpoint. What this module adds:
the frozen-ViT/ln_vision handling of the reference (`vision.encode_image`), a check of the image-token count
(transformers has none), the loss in fp32 (decoder-only: the LM head only at labelled positions, chunked), and
generation that returns exactly what `Blip2ForConditionalGeneration.generate` returns for the same inputs.

Input layout (what `Blip2Processor` produces and `data.collate.Stage2Collator` builds):
- decoder-only: `[<image> x Q] [bos] prompt caption end [pad ...]`, labels on caption + end only;
- encoder-decoder: encoder `[<image> x Q] prefix </s>`, decoder labels `target </s>`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from blip2_train.models import losses, vision
from blip2_train.utils.errors import DataError

# config fields of LLM families whose forward transforms the head's output (Gemma, Cohere, Granite)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class Stage2Output:
    loss: torch.Tensor
    logits: torch.Tensor | None = None


def check_image_tokens(input_ids: torch.Tensor, image_token_id: int, num_query_tokens: int) -> None:
    """Every row must hold exactly `num_query_tokens` image tokens.

    transformers scatters the queries into the image-token positions without checking: zero tokens silently
    ignore the image, and an uneven count puts one sample's visual features into another sample.
    """
    counts = (input_ids == image_token_id).sum(dim=1)
    bad = (counts != num_query_tokens).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise DataError(f"input_ids row {i} has {int(counts[i])} image tokens (id {image_token_id}); expected "
                        f"{num_query_tokens} (= num_query_tokens) in every row ({bad.numel()} bad row(s))")


class Blip2Stage2(nn.Module):
    def __init__(self, hf, image_token_id: int, end_token_id: int, pad_token_id: int, freeze_vision: bool = True,
                 vision_dtype: torch.dtype = torch.float32, llm_dropout: bool = False, freeze_llm: bool = True):
        super().__init__()
        # freeze_llm=False trains the whole LLM; with a LoRA adapter (models/adapters.py) only the adapter trains
        self.freeze_llm = freeze_llm
        # The reference trains with the frozen LLM in train mode (its dropout on: model.train() reaches it);
        # False keeps it in eval mode (no dropout) while the trainable parts train.
        self.llm_dropout = llm_dropout
        self.hf = hf  # transformers.Blip2ForConditionalGeneration
        self.config = hf.config
        self.image_token_id, self.end_token_id, self.pad_token_id = image_token_id, end_token_id, pad_token_id
        self.freeze_vision, self.vision_dtype = freeze_vision, vision_dtype
        self.logits_chunk_bytes = losses.LOGITS_CHUNK_BYTES
        self.freeze()

    # -- structure ------------------------------------------------------------------------------------

    @property
    def llm(self):
        return self.hf.language_model

    @property
    def is_encoder_decoder(self) -> bool:
        return not self.config.use_decoder_only_language_model

    @property
    def num_query_tokens(self) -> int:
        return self.hf.query_tokens.shape[1]

    @property
    def plain_lm_head(self) -> bool:
        """Decoder-only logits = output embeddings(last hidden state), so the loss may apply the head itself
        (`losses.lm_loss_from_hidden`); families that scale or soft-cap their logits go through forward."""
        cfg = self.llm.config
        return not self.is_encoder_decoder and all(getattr(cfg, k, None) in (None, 1.0)
                                                   for k in LOGIT_TRANSFORMS)

    def freeze(self) -> None:
        """The LLM frozen (its LoRA adapter, if any, trains) unless freeze_llm=False; the ViT frozen unless
        fine-tuning; Q-Former, queries and projection train."""
        from blip2_train.models.adapters import is_adapter_param

        for n, p in self.llm.named_parameters():
            trainable = is_adapter_param(n) or not self.freeze_llm
            if p.is_floating_point():  # a quantised weight is stored as integers and never trains
                p.requires_grad_(trainable)
        if self.freeze_vision:
            vision.freeze_vision_tower(self.hf.vision_model, self.vision_dtype)
        else:
            for p in self.hf.vision_model.parameters():
                p.requires_grad_(True)
        for p in (*self.hf.qformer.parameters(), self.hf.query_tokens, *self.hf.language_projection.parameters()):
            p.requires_grad_(True)

    def set_train_modes(self, training: bool = True) -> None:
        """Trainable parts follow `training`; a frozen ViT stays in eval mode, and so does the frozen LLM
        unless `llm_dropout` (the reference's behaviour: its dropout on during training)."""
        self.train(training)
        if not (training and (self.llm_dropout or not self.freeze_llm)):
            self.llm.eval()
            for name, m in self.llm.named_modules():  # an adapter trains with its own dropout
                if ".lora_dropout" in name or name.startswith("lora_dropout"):
                    m.train(training)
        if self.freeze_vision:
            self.hf.vision_model.embeddings.eval()
            self.hf.vision_model.encoder.eval()

    # -- the visual prompt ----------------------------------------------------------------------------

    def image_prompt(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images -> projected query outputs [B, Q, D_llm] (fp32; cast to the LLM's dtype on insertion)."""
        image_embeds = vision.encode_image(self.hf.vision_model, pixel_values, self.freeze_vision)
        q = self.hf.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = self.hf.qformer(query_embeds=q, query_length=q.shape[1],
                              encoder_hidden_states=image_embeds).last_hidden_state
        return self.hf.language_projection(out.to(self.hf.language_projection.weight.dtype))

    def embed_inputs(self, input_ids: torch.Tensor, image_prompt: torch.Tensor) -> torch.Tensor:
        """LLM input embeddings with the visual prompt scattered into the `<image>` positions."""
        check_image_tokens(input_ids, self.image_token_id, self.num_query_tokens)
        emb = self.llm.get_input_embeddings()(input_ids)
        where = (input_ids == self.image_token_id).unsqueeze(-1)
        return emb.masked_scatter(where, image_prompt.to(emb.dtype))

    # -- the stage-2 objective ------------------------------------------------------------------------

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor, decoder_attention_mask: torch.Tensor | None = None) -> Stage2Output:
        """The LLM's generative loss on the caption tokens (decoder-only: next-token; T5: decoder targets)."""
        emb = self.embed_inputs(input_ids, self.image_prompt(pixel_values))
        return self.llm_loss(emb, attention_mask, labels, decoder_attention_mask)

    def llm_loss(self, emb: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                 decoder_attention_mask: torch.Tensor | None = None) -> Stage2Output:
        """The LLM's loss on input embeddings that already hold the visual prompt."""
        if self.is_encoder_decoder:
            dec_in = self.llm.prepare_decoder_input_ids_from_labels(labels=labels)
            out = self.llm(inputs_embeds=emb, attention_mask=attention_mask, decoder_input_ids=dec_in,
                           decoder_attention_mask=decoder_attention_mask, use_cache=False)
            loss = losses.token_ce(out.logits, labels)
        elif self.plain_lm_head:
            hidden = self.llm.base_model(inputs_embeds=emb, attention_mask=attention_mask,
                                         use_cache=False).last_hidden_state
            loss = losses.lm_loss_from_hidden(hidden, labels, self.llm.get_output_embeddings(),
                                              self.llm.config.vocab_size, self.logits_chunk_bytes)
            return Stage2Output(loss)  # the reference: no label smoothing
        else:
            out = self.llm(inputs_embeds=emb, attention_mask=attention_mask, use_cache=False)
            loss = losses.lm_loss(out.logits, labels, label_smoothing=0.0)
        return Stage2Output(loss, out.logits)

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **generate_kwargs) -> torch.Tensor:
        """Same return value as `Blip2ForConditionalGeneration.generate`: decoder-only models give the input ids
        followed by the new tokens, encoder-decoder models the decoder ids. Always pass `max_new_tokens`."""
        if "max_length" in generate_kwargs:
            raise ValueError("pass max_new_tokens, not max_length: with inputs_embeds its meaning differs "
                             "across transformers versions")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        emb = self.embed_inputs(input_ids, self.image_prompt(pixel_values))
        return self.generate_from(emb, input_ids, attention_mask, **generate_kwargs)

    def generate_from(self, emb: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      **generate_kwargs) -> torch.Tensor:
        """The LLM's `generate` on input embeddings that already hold the visual prompt."""
        generate_kwargs.setdefault("eos_token_id", self.end_token_id)
        generate_kwargs.setdefault("pad_token_id", self.pad_token_id)
        inputs = {"inputs_embeds": emb, "attention_mask": attention_mask}
        if not self.is_encoder_decoder:
            inputs["input_ids"] = input_ids
        return self.llm.generate(**inputs, **generate_kwargs)

    def new_tokens(self, generated: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The generated caption ids only (drop the echoed inputs, or T5's decoder start token)."""
        return generated[:, 1:] if self.is_encoder_decoder else generated[:, input_ids.shape[1]:]
