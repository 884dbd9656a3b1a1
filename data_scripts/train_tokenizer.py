#!/usr/bin/env python
"""Train a small BERT-style WordPiece tokenizer on an annotation file's captions (offline; demo and tests).

    python data_scripts/train_tokenizer.py --annotations data/synthetic/annotations/coco_karpathy_train.json \
        --out data/synthetic/tokenizer --vocab-size 400

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
    a = p.parse_args()
    texts = [c for r in read_annotations(a.annotations, a.format) for c in r.captions]
    tok = train_wordpiece_tokenizer(texts, a.out, a.vocab_size)
    print(f"tokenizer with {len(tok)} tokens saved to {a.out}")


if __name__ == "__main__":
    main()
