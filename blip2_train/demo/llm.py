"""Tiny language models of real transformers families, built offline, for tests and the demo.

A real run points `model.llm` at a local OPT / LLaMA / FlanT5 directory. Tests and `make demo` cannot
download one, so they train a tokenizer of the right kind with `tokenizers` on the captions and build a
small model of the same class from a config: the code path in blip2-train is the one a real LLM takes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

FAMILIES = ("opt", "llama", "gpt2", "t5")


def train_llm_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, family: str, vocab_size: int = 400):
    """Train a tokenizer in the style of `family` and save it (AutoTokenizer reloads it).

    opt: byte-level BPE, `</s>` prepended as BOS, `<pad>`; gpt2: byte-level BPE, `<|endoftext|>`, no pad;
    llama: metaspace BPE, `<s>` BOS, no pad (as LLaMA); t5: unigram, `</s>` appended, `<pad>`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if family in ("opt", "gpt2"):
        specials = ["<pad>", "</s>", "<unk>"] if family == "opt" else ["<|endoftext|>"]
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif family == "llama":
        specials = ["<unk>", "<s>", "</s>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials)
    elif family == "t5":
        specials = ["<pad>", "</s>", "<unk>"]
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>")
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    tok.train_from_iterator(texts, trainer)
    ids = {s: tok.token_to_id(s) for s in specials}
    if family == "opt":
        tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A $B",
                                                           special_tokens=[("</s>", ids["</s>"])])
        kw = dict(bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    elif family == "gpt2":
        kw = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    elif family == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", ids["<s>"])])
        kw = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", ids["</s>"])])
        kw = dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def tiny_llm_config(family: str, tokenizer, hidden: int = 64, layers: int = 2, heads: int = 2):
    """A small config of the family's real class, sized to the tokenizer (plus room for `<image>`)."""
    from transformers import GPT2Config, LlamaConfig, OPTConfig, T5Config

    vocab = len(tokenizer) + 8  # headroom: <image> is added later, as with a real checkpoint's padded vocab
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    if family == "opt":
        return OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=2 * hidden,
                         num_attention_heads=heads, max_position_embeddings=256, word_embed_proj_dim=hidden,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, dropout=0.1)
    if family == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=1, max_position_embeddings=256,
                           bos_token_id=bos, eos_token_id=eos, pad_token_id=None, tie_word_embeddings=False)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256,
                          bos_token_id=bos, eos_token_id=eos)
    if family == "t5":
        return T5Config(vocab_size=vocab, d_model=hidden, d_kv=hidden // heads, d_ff=2 * hidden, num_layers=layers,
                        num_heads=heads, feed_forward_proj="gated-gelu", decoder_start_token_id=pad,
                        pad_token_id=pad, eos_token_id=eos, tie_word_embeddings=False, dropout_rate=0.1)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def make_tiny_llm(family: str, tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 0,
                  **size):
    """Build a randomly initialised tiny LLM of `family` and save it with its tokenizer under `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = tiny_llm_config(family, tok, **size)
    torch.manual_seed(seed)
    model = (AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM).from_config(cfg)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return model


def make_tiny_bert(tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 0, hidden: int = 64,
                   layers: int = 2, heads: int = 2, intermediate: int = 128, max_positions: int = 64,
                   initializer_range: float = 0.07):
    """A randomly initialised tiny `BertForMaskedLM` saved with its tokenizer: the demo's stand-in for a local
    bert-base-uncased directory, so `preset=tiny` runs the real Q-Former-from-BERT initialisation."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(str(tokenizer_dir))
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, max_position_embeddings=max_positions,
                     initializer_range=initializer_range, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = BertForMaskedLM(cfg)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return model


def pretrain_on_captions(model, tokenizer, texts: list, steps: int = 300, batch_size: int = 64, lr: float = 3e-3,
                         seed: int = 0, log_every: int = 50, max_prefix: int = 24,
                         end_text: str | None = None) -> list[float]:
    """Teach a tiny causal LM the captions' language (bos + caption + end): the demo's stand-in for an LLM's
    pretraining. Plain next-token loss; returns the loss per step. `end_text` ends each caption (OPT-style
    "\n", as stage 2 trains OPT to end captions); None: the eos token.

    Each caption follows a context of some of its own words, in order (not predicted). A real LLM reads its
    context: it continues a prompt. Trained on bare captions, a tiny LM would learn to ignore whatever precedes
    them, and stage 2 could not teach it to read the visual prompt (the LLM is frozen there). The context
    makes it a reader of context, and the Q-Former then learns to write what it reads.

    An item may also be a pair (context, text): `context` (e.g. a caption before a question about it and its
    answer) is given whole: the LM learns to answer from what precedes, as a real LLM does.
    """
    import random

    import torch

    rng = random.Random(seed)
    torch.manual_seed(seed)
    end_id = tokenizer.eos_token_id
    if end_text is not None:
        ids = tokenizer(end_text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"end_text {end_text!r} is {len(ids)} tokens for this tokenizer; it must be one")
        end_id = ids[0]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    for step in range(steps):
        batch = [t if isinstance(t, (tuple, list)) else (t, t) for t in (rng.choice(texts) for _ in range(batch_size))]
        rows = [tokenizer(t)["input_ids"] + [end_id] for _, t in batch]
        prefixes = []
        for (context, text) in batch:
            # a subsequence of the caption's own words, in order; a separate context (the caption before a question
            # about it) is given whole: the answer must be readable from it
            words = [w for w in context.split() if context != text or rng.random() < 0.5]
            cap = max_prefix if context == text else 64  # a whole caption is ~30 tokens of the demo tokenizer
            prefixes.append(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][:cap]
                            if words else [])
        n = max(len(p) + len(r) for p, r in zip(prefixes, rows))
        ids = torch.full((len(rows), n), tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        labels = torch.full((len(rows), n), -100)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, (p, r) in enumerate(zip(prefixes, rows)):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            labels[i, len(p) + 1 : len(p) + len(r)] = torch.tensor(r[1:])
            mask[i, : len(p) + len(r)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"  LM step {step + 1}/{steps}: loss {sum(losses[-log_every:]) / log_every:.3f}", flush=True)
    model.eval()
    return losses
