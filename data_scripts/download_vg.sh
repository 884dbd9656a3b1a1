#!/usr/bin/env bash
# Visual Genome images + region captions in the reference's caption layout (vg_caption.json).
#   bash data_scripts/download_vg.sh /data/vg
# Then: python data_scripts/build_shards.py --format vg --annotations /data/vg/annotations/vg_caption.json \
#   --images /data/vg/images --out /data/shards/vg_caption --workers 16
set -euo pipefail
DEST=${1:?usage: $0 DEST_DIR}
mkdir -p "$DEST/images" "$DEST/annotations"
cd "$DEST/images"
for z in images images2; do
  wget -c "https://cs.stanford.edu/people/rak248/VG_100K_2/$z.zip" && unzip -q "$z.zip" && rm "$z.zip"
done
cd "$DEST/annotations"
wget -c https://storage.googleapis.com/sfr-vision-language-research/LAVIS/datasets/visual_genome/vg_caption.json
