"""The Q-Former tokenizer: bert-base-uncased WordPiece plus a `[DEC]` bos token (vocab 30522 -> 30523)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from blip2_train.utils.errors import CheckpointError

DEC_TOKEN = "[DEC]"


def load_qformer_tokenizer(path: str | os.PathLike):
    """Load a BERT tokenizer from a local directory and make sure `[DEC]` is its bos token."""
    from transformers import BertTokenizerFast

    path = str(path)
    if not os.path.isdir(path):
        raise CheckpointError(
            f"tokenizer directory not found: {path} (no model hub here: point paths.bert_dir at a local "
            "bert-base-uncased directory, e.g. one saved with save_pretrained)")
    tok = BertTokenizerFast.from_pretrained(path)
    if tok.bos_token != DEC_TOKEN:
        tok.add_special_tokens({"bos_token": DEC_TOKEN})
    return tok


def train_wordpiece_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1000):
    """Train a BERT-style uncased WordPiece tokenizer offline and save it in the bert-base-uncased layout.

    Used for the demo and the tests; a real run points at a local bert-base-uncased directory instead.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(list(texts), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece()
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]", do_lower_case=True)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast
