#!/usr/bin/env python
"""Print the demo's summary table and write outputs/demo/metrics.json (figures against chance)."""

import json
import sys
from pathlib import Path

out = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/demo")
ev = json.loads((out / "eval_retrieval" / "metrics.json").read_text())
train = json.loads((out / "stage1" / "metrics.json").read_text())
n_test = len(json.loads(Path("data/synthetic/annotations/coco_karpathy_test.json").read_text()))
chance_r1 = 100.0 / n_test
rows = [("text->image R@1", ev["img_r1"], chance_r1), ("text->image R@5", ev["img_r5"], 5 * chance_r1),
        ("image->text R@1", ev["txt_r1"], None)]
print(f"\nblip2-train demo: stage 1 on {n_test} held-out synthetic images")
print(f"{'metric':<20}{'value':>10}{'chance':>10}{'x chance':>10}")
for name, v, c in rows:
    print(f"{name:<20}{v:>10.1f}{(c if c else float('nan')):>10.2f}{(v / c if c else float('nan')):>10.1f}")
summary = {"stage1_train": train, "retrieval": ev, "chance_text_to_image_r1": chance_r1}
(out / "metrics.json").write_text(json.dumps(summary, indent=1))
ok = ev["img_r1"] >= 10 * chance_r1
print(f"learning bar (text->image R@1 >= 10x chance): {'PASS' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
