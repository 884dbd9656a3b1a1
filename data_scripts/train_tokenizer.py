#!/usr/bin/env python
"""Train a small BERT-style WordPiece tokenizer on an annotation file's captions (offline; demo and tests), and
with --tiny-bert save a randomly initialised tiny BertForMaskedLM beside it: the DEMO STAND-IN for a local
bert-base-uncased directory (its sizes match conf/arch/tiny.yaml's Q-Former).

    python data_scripts/train_tokenizer.py --annotations data/synthetic/coco/annotations/coco_karpathy_train.json \
        --out data/synthetic/bert --vocab-size 400 --tiny-bert

Real runs use a local bert-base-uncased directory instead.
"""

import argparse

from blip2_train.data.annotations import read_annotations
from blip2_train.models.tokenizer import train_wordpiece_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", required=True)
    p.add_argument("--format", default="karpathy")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=400)
    p.add_argument("--tiny-bert", action="store_true", help="also save a random tiny BERT (demo stand-in)")
    a = p.parse_args()
    texts = [c for r in read_annotations(a.annotations, a.format) for c in r.captions]
    tok = train_wordpiece_tokenizer(texts, a.out, a.vocab_size)
    print(f"tokenizer with {len(tok)} tokens saved to {a.out}")
    if a.tiny_bert:
        from blip2_train.demo.llm import make_tiny_bert

        make_tiny_bert(a.out, a.out)
        print(f"tiny random BERT (demo stand-in for bert-base-uncased) saved to {a.out}")


if __name__ == "__main__":
    main()
