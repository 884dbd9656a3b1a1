#!/usr/bin/env bash
# COCO 2014 images + the Karpathy-split caption annotations used by the reference (LAVIS layout).
#   bash data_scripts/download_coco.sh /data/coco
# Then: python data_scripts/build_shards.py --format karpathy \
#   --annotations /data/coco/annotations/coco_karpathy_train.json --images /data/coco/images \
#   --out /data/shards/coco_karpathy_train --workers 16
set -euo pipefail
DEST=${1:?usage: $0 DEST_DIR}
mkdir -p "$DEST/images" "$DEST/annotations"
cd "$DEST/images"
for z in train2014 val2014; do
  [ -d "$z" ] || { wget -c "http://images.cocodataset.org/zips/$z.zip" && unzip -q "$z.zip" && rm "$z.zip"; }
done
cd "$DEST/annotations"
BASE=https://storage.googleapis.com/sfr-vision-language-research/datasets
for s in train val test; do wget -c "$BASE/coco_karpathy_$s.json"; done
