#!/usr/bin/env python
"""Caption held-out images with plain transformers from a stage-2 export (no blip2-train code involved).

    python run_scripts/demo_transformers_caption.py outputs/demo/export_caption data/synthetic 4
"""

import json
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor

export, data = Path(sys.argv[1]), Path(sys.argv[2])
n = int(sys.argv[3]) if len(sys.argv) > 3 else 4
meta = json.loads((export / "blip2_train.json").read_text())  # the prompt and decoding the model was trained for
model = Blip2ForConditionalGeneration.from_pretrained(str(export)).eval()
processor = Blip2Processor.from_pretrained(str(export))
test = json.loads((data / "coco" / "annotations" / "coco_karpathy_test.json").read_text())[:n]
images = [Image.open(data / "coco" / "images" / t["image"]).convert("RGB") for t in test]
inputs = processor(images=images, text=[meta["prompt"]] * n, return_tensors="pt")
kw = {k: v for k, v in meta["generate_kwargs"].items() if k in ("num_beams", "max_new_tokens", "min_new_tokens")}
with torch.no_grad():
    out = model.generate(**inputs, **kw)
texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
lines = [f"{t['image']}: {c.strip()}    (reference: {t['caption'][0]})" for t, c in zip(test, texts)]
print("\n".join(lines))
(export.parent / "transformers_caption.txt").write_text("\n".join(lines) + "\n")
