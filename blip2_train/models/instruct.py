"""InstructBLIP: the instruction-aware Q-Former. The instruction's tokens sit beside the queries in the Q-Former's
self-attention, so the visual features it extracts depend on the question; the LLM then reads
[projected queries][instruction][answer].

Built on `transformers.InstructBlipForConditionalGeneration` (vision_model, query_tokens, qformer with its own
word and position embeddings, language_projection, language_model), so an export is that class's checkpoint.
The reference's models are LAVIS `Blip2VicunaInstruct` (decoder-only) and `Blip2T5Instruct` (encoder-decoder);
docs/reference.md lists the rules followed here.

Input layout (what `InstructBlipProcessor` produces and `data.collate.InstructCollator` builds):
- Q-Former: `[CLS] instruction [SEP]` (BERT tokens, cut from the LEFT at max_txt_len) after the queries;
- decoder-only LLM: `[<image> x Q] [bos] instruction answer end [pad ...]`, labels on answer + end only;
- encoder-decoder LLM: encoder `[<image> x Q] instruction </s>`, decoder labels `answer </s>`.
"""

from __future__ import annotations

import torch

from blip2_train.models import vision
from blip2_train.models.stage2 import Blip2Stage2, Stage2Output


class InstructBlip(Blip2Stage2):
    """Stage 2's training and generation with the instruction given to the Q-Former as well."""

    def freeze(self) -> None:
        """As stage 2 (ViT and LLM frozen unless fine-tuning the ViT), the whole Q-Former trained, its word and
        position embeddings included. The last layer's text feed-forward is frozen: its output is never read
        (only the query positions leave the Q-Former), so it has no gradient; frozen, it is what it would be
        without one (no update), and DDP needs no unused-parameter search."""
        super().freeze()
        last = self.hf.qformer.encoder.layer[-1]
        for p in (*last.intermediate.parameters(), *last.output.parameters()):
            p.requires_grad_(False)

    def image_prompt(self, pixel_values: torch.Tensor, qformer_input_ids: torch.Tensor,
                     qformer_attention_mask: torch.Tensor) -> torch.Tensor:
        """Images + instructions -> projected query outputs [B, Q, D_llm] (fp32)."""
        image_embeds = vision.encode_image(self.hf.vision_model, pixel_values, self.freeze_vision)
        q = self.hf.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_mask = torch.ones(q.shape[:2], dtype=qformer_attention_mask.dtype, device=q.device)
        out = self.hf.qformer(input_ids=qformer_input_ids,
                              attention_mask=torch.cat([query_mask, qformer_attention_mask], dim=1),
                              query_embeds=q, encoder_hidden_states=image_embeds).last_hidden_state
        out = out[:, : q.shape[1]]
        return self.hf.language_projection(out.to(self.hf.language_projection.weight.dtype))

    def forward(self, pixel_values: torch.Tensor, qformer_input_ids: torch.Tensor,
                qformer_attention_mask: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor, decoder_attention_mask: torch.Tensor | None = None) -> Stage2Output:
        """The LLM's generative loss on the answer tokens."""
        prompt = self.image_prompt(pixel_values, qformer_input_ids, qformer_attention_mask)
        return self.llm_loss(self.embed_inputs(input_ids, prompt), attention_mask, labels, decoder_attention_mask)

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, qformer_input_ids: torch.Tensor,
                 qformer_attention_mask: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, **generate_kwargs) -> torch.Tensor:
        """Same return value as `InstructBlipForConditionalGeneration.generate` for the same inputs (decoder-only:
        the inputs followed by the new tokens; encoder-decoder: the decoder ids). Pass `max_new_tokens`."""
        if "max_length" in generate_kwargs:
            raise ValueError("pass max_new_tokens, not max_length: with inputs_embeds its meaning differs "
                             "across transformers versions")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prompt = self.image_prompt(pixel_values, qformer_input_ids, qformer_attention_mask)
        return self.generate_from(self.embed_inputs(input_ids, prompt), input_ids, attention_mask, **generate_kwargs)
