"""Stage-1 BLIP-2: the Q-Former learns from a frozen image encoder with ITC, ITM and LM losses.

Built on `transformers.Blip2ForImageTextRetrieval` (vision_model, query_tokens, embeddings, qformer,
vision_projection, text_projection, itm_head) so an export is that class's checkpoint; the two stage-1
pieces transformers lacks sit beside it: the Q-Former LM head (`lm_head`, BERT's MLM head tied to the word
embeddings; the reference's `Qformer.cls`) and the ITC temperature `temp`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2QFormerConfig, Blip2VisionConfig
from transformers.models.bert.modeling_bert import BertOnlyMLMHead

from blip2_train.models import losses, vision
from blip2_train.distributed.collectives import fetch_rows, gather_padded, pad_to
from blip2_train.utils.errors import ConfigError

TEMP_MIN, TEMP_MAX = 0.001, 0.5


def build_stage1_config(vision: dict, qformer: dict, num_query_tokens: int = 32, embed_dim: int = 256,
                        attn_implementation: str | None = None) -> Blip2Config:
    """A Blip2Config for stage 1: text-capable Q-Former (`use_qformer_text_input`), no image token."""
    vcfg = Blip2VisionConfig(**dict(vision))
    qcfg = Blip2QFormerConfig(**{**dict(qformer), "use_qformer_text_input": True,
                                 "encoder_hidden_size": vcfg.hidden_size})
    cfg = Blip2Config(vision_config=vcfg.to_dict(), qformer_config=qcfg.to_dict(), num_query_tokens=num_query_tokens,
                      image_text_hidden_size=embed_dim, image_token_index=None)
    if attn_implementation:
        from blip2_train.models.vision import set_attention

        set_attention(cfg, attn_implementation)
    return cfg


@dataclass
class Stage1Output:
    loss: torch.Tensor
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    loss_lm: torch.Tensor
    sim_i2t: torch.Tensor
    itm_logits: torch.Tensor
    pos_mask: torch.Tensor | None = None  # [B, G] the ITC positives (also never drawn as ITM negatives)
    neg_idx: tuple[torch.Tensor, torch.Tensor] | None = None  # the ITM negatives drawn (image per text, text per image)
    temp: torch.Tensor | None = None  # the ITC temperature used (a plain tensor also where the parameter is sharded)


class Blip2Stage1(nn.Module):
    """Image encoder (frozen but for `post_layernorm` = the reference's ln_vision) + Q-Former + heads."""

    def __init__(self, config: Blip2Config, bos_token_id: int, pad_token_id: int = 0, temp: float = 0.07,
                 freeze_vision: bool = True, vision_dtype: torch.dtype = torch.float32,
                 ln_vision_eps: float | None = None, itc_label_smoothing: float = 0.1,
                 lm_label_smoothing: float = 0.1, false_negatives: str = "caption",
                 loss_weights: dict | None = None):
        super().__init__()
        if false_negatives not in losses.FALSE_NEGATIVES:
            raise ConfigError(f"model.false_negatives={false_negatives!r} is not one of {list(losses.FALSE_NEGATIVES)}")
        self.false_negatives = false_negatives
        self.loss_weights = stage1_loss_weights(loss_weights)
        self.config = config
        self.hf = Blip2ForImageTextRetrieval(config)
        # The reference initialises the queries N(0, 0.02); transformers' init zeros them.
        nn.init.normal_(self.hf.query_tokens, std=config.qformer_config.initializer_range)
        if ln_vision_eps is not None:
            self.hf.vision_model.post_layernorm.eps = ln_vision_eps
        self.lm_head = BertOnlyMLMHead(config.qformer_config)
        self.lm_head.apply(self.hf._init_weights)
        self.tie_lm_head()
        # shape [1], not a 0-d scalar: DeepSpeed broadcasts parameters as bytes and cannot view a 0-d tensor
        self.temp = nn.Parameter(torch.tensor([float(temp)]))
        # a checkpoint loaded without `temp` (build.load_stage1_weights) names itself here until training learns it
        self.temp_missing_from: str | None = None
        self.bos_token_id, self.pad_token_id = bos_token_id, pad_token_id
        self.itc_label_smoothing, self.lm_label_smoothing = itc_label_smoothing, lm_label_smoothing
        self.freeze_vision = freeze_vision
        self.vision_dtype = vision_dtype
        if freeze_vision:
            self.freeze_vision_tower()

    # -- structure ------------------------------------------------------------------------------------

    @property
    def vision_model(self):
        return self.hf.vision_model

    @property
    def qformer(self):
        return self.hf.qformer

    @property
    def num_query_tokens(self) -> int:
        return self.hf.query_tokens.shape[1]

    def tie_lm_head(self) -> None:
        """The MLM decoder shares the word embeddings; its bias is `predictions.bias` (BERT's layout)."""
        self.lm_head.predictions.decoder.weight = self.hf.embeddings.word_embeddings.weight
        self.lm_head.predictions.decoder.bias = self.lm_head.predictions.bias

    def freeze_vision_tower(self) -> None:
        vision.freeze_vision_tower(self.hf.vision_model, self.vision_dtype)

    def set_train_modes(self, training: bool = True) -> None:
        """Trainable parts follow `training`; the frozen ViT always stays in eval mode (no dropout)."""
        self.train(training)
        if self.freeze_vision:
            self.hf.vision_model.embeddings.eval()
            self.hf.vision_model.encoder.eval()

    # -- encoders ---------------------------------------------------------------------------------------

    def encode_image(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """[B, 3, H, W] -> image tokens [B, N, Dv] in fp32, after the trainable ln_vision."""
        return vision.encode_image(self.hf.vision_model, pixel_values, self.freeze_vision, interpolate_pos_encoding)

    def query_tokens(self, batch_size: int) -> torch.Tensor:
        return self.hf.query_tokens.expand(batch_size, -1, -1)

    def image_query_forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Query-only pass cross-attending the image: [B, Q, H]."""
        q = self.query_tokens(image_embeds.shape[0])
        return self.qformer(query_embeds=q, query_length=q.shape[1], encoder_hidden_states=image_embeds).last_hidden_state

    def text_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text-only pass (bidirectional, no image): [B, T, H]; its [CLS] row feeds ITC."""
        emb = self.hf.embeddings(input_ids=input_ids)
        mask = losses.padding_attention_mask(attention_mask, emb.dtype)
        return self.qformer(query_embeds=emb, query_length=0, attention_mask=mask).last_hidden_state

    def joint_lm_forward(self, image_embeds: torch.Tensor, dec_input_ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One [queries; text] pass with the generation mask -> (query outputs [B,Q,H], text logits [B,T,V]).

        The query rows equal a query-only pass (queries never see text), so they also serve as the ITC
        image features: the reference runs that query pass once and reuses its keys/values for the LM.
        """
        q = self.query_tokens(image_embeds.shape[0])
        emb = self.hf.embeddings(input_ids=dec_input_ids, query_embeds=q)
        nq = q.shape[1]
        mask = losses.lm_attention_mask(nq, attention_mask, emb.dtype)
        hidden = self.qformer(query_embeds=emb, query_length=nq, attention_mask=mask,
                              encoder_hidden_states=image_embeds).last_hidden_state
        return hidden[:, :nq], self.lm_head(hidden[:, nq:])

    def itm_forward(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
        """Bidirectional [queries; text] pass over the image -> match logits [N, 2], averaged over queries."""
        q = self.query_tokens(image_embeds.shape[0])
        emb = self.hf.embeddings(input_ids=input_ids, query_embeds=q)
        mask = losses.padding_attention_mask(torch.cat([torch.ones(q.shape[:2], dtype=attention_mask.dtype,
                                                                   device=attention_mask.device), attention_mask],
                                                        dim=1), emb.dtype)
        hidden = self.qformer(query_embeds=emb, query_length=q.shape[1], attention_mask=mask,
                              encoder_hidden_states=image_embeds).last_hidden_state
        return self.hf.itm_head(hidden[:, : q.shape[1]]).mean(dim=1)

    def image_feats(self, query_hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.hf.vision_projection(query_hidden), dim=-1)

    def text_feat(self, text_hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.hf.text_projection(text_hidden[:, 0, :]), dim=-1)

    def clamped_temp(self) -> torch.Tensor:
        """BLIP-1 clamps the temperature in place; the BLIP-2 reference forgot to (it can collapse)."""
        with torch.no_grad():
            self.temp.clamp_(TEMP_MIN, TEMP_MAX)
        self.temp_missing_from = None  # training learns it from here (a checkpoint without it started at init)
        return self.temp

    # -- the stage-1 objective -------------------------------------------------------------------------

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_ids: torch.Tensor | None = None, neg_idx: tuple[torch.Tensor, torch.Tensor] | None = None,
                generator: torch.Generator | None = None) -> Stage1Output:
        """ITC + ITM + LM on a batch. `neg_idx` fixes the hard negatives (tests); otherwise they are sampled."""
        tokens = vision.vision_tokens(self.hf.vision_model, pixel_values, self.freeze_vision)
        image_embeds = vision.ln_vision(self.hf.vision_model, tokens)

        # ITC image side and LM in one pass; ITC text side in a text-only pass.
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = self.bos_token_id
        query_hidden, lm_logits = self.joint_lm_forward(image_embeds, dec_ids, attention_mask)
        image_feats = self.image_feats(query_hidden)
        text_feat = self.text_feat(self.text_forward(input_ids, attention_mask))
        ids_all, t_max = gather_padded(input_ids, self.pad_token_id)
        mask_all, _ = gather_padded(attention_mask, 0)
        ids_local, mask_local = pad_to(input_ids, t_max, self.pad_token_id), pad_to(attention_mask, t_max, 0)
        same_text = losses.same_text_mask(ids_local, ids_all) if self.false_negatives == "caption" else None
        temp = self.clamped_temp()
        itc = losses.itc_loss(image_feats, text_feat, temp, image_ids, self.itc_label_smoothing,
                              extra_pos=same_text)

        # ITM with hard negatives from the global batch.
        if neg_idx is None:
            neg_idx = losses.sample_hard_negatives(itc.sim_i2t.detach(), itc.sim_t2i.detach(), itc.pos_mask, generator)
        neg_image_idx, neg_text_idx = neg_idx
        neg_image_embeds = self.negative_image_embeds(tokens, neg_image_idx)
        pair_ids = torch.cat([ids_local, ids_local, ids_all[neg_text_idx]], dim=0)
        pair_mask = torch.cat([mask_local, mask_local, mask_all[neg_text_idx]], dim=0)
        pair_images = torch.cat([image_embeds, neg_image_embeds, image_embeds], dim=0)
        itm_logits = self.itm_forward(pair_images, pair_ids, pair_mask)
        loss_itm = losses.itm_loss(itm_logits)

        loss_lm = losses.lm_loss(lm_logits, losses.lm_labels(dec_ids, self.pad_token_id), self.lm_label_smoothing)
        w = self.loss_weights
        loss = w["itc"] * itc.loss + w["itm"] * loss_itm + w["lm"] * loss_lm
        return Stage1Output(loss, itc.loss.detach(), loss_itm.detach(), loss_lm.detach(), itc.sim_i2t.detach(),
                            itm_logits.detach(), itc.pos_mask, (neg_image_idx, neg_text_idx),
                            temp.detach().reshape(()).clone())  # FSDP2 frees the gathered storage after forward

    def negative_image_embeds(self, tokens: torch.Tensor, neg_image_idx: torch.Tensor) -> torch.Tensor:
        """ITM negative images [B, N, Dv] (fp32, after ln_vision) at `neg_image_idx` of the global batch.

        They may live on other ranks: fetch just those rows BEFORE ln_vision (`tokens`, tower dtype, no gradient
        when the tower is frozen) and apply ln_vision here. LayerNorm is per token, so every gradient equals
        that of gathering every rank's fp32 output of ln_vision with gradient, for 1/W of the rows moved.
        """
        return vision.ln_vision(self.hf.vision_model, fetch_rows(tokens, neg_image_idx))

    # -- retrieval scoring (evaluation) -----------------------------------------------------------------

    @torch.no_grad()
    def retrieval_image_embeds(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (image tokens for ITM [B, N, Dv], normalised query features for ITC [B, Q, D])."""
        image_embeds = self.encode_image(pixel_values)
        return image_embeds, self.image_feats(self.image_query_forward(image_embeds))

    @torch.no_grad()
    def retrieval_text_feat(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_feat(self.text_forward(input_ids, attention_mask))


def stage1_loss_weights(weights: dict | None) -> dict[str, float]:
    """{itc, itm, lm} -> float weights of the summed stage-1 loss; the reference sums them unweighted (1, 1, 1)."""
    out = {"itc": 1.0, "itm": 1.0, "lm": 1.0}
    for k, v in dict(weights or {}).items():
        if k not in out:
            raise ConfigError(f"loss_weights.{k}: no such stage-1 loss (itc, itm, lm)")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"loss_weights.{k}={v!r} must be a number >= 0")
        out[k] = float(v)
    return out


def trainable_parameter_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


