#!/usr/bin/env bash
# Flickr30k Karpathy-split annotations (LAVIS layout). The images require accepting the dataset's terms:
# request them at https://shannon.cs.illinois.edu/DenotationGraph/ and unpack to DEST/images.
#   bash data_scripts/download_flickr30k.sh /data/flickr30k
set -euo pipefail
DEST=${1:?usage: $0 DEST_DIR}
mkdir -p "$DEST/images" "$DEST/annotations"
cd "$DEST/annotations"
BASE=https://storage.googleapis.com/sfr-vision-language-research/datasets
for s in train val test; do wget -c "$BASE/flickr30k_$s.json" -O "$s.json"; done
echo "annotations in $DEST/annotations; put the 31,783 images in $DEST/images"
