#!/usr/bin/env bash
# NoCaps val (4500 Open Images validation images, 10 captions each, in/near/out-domain) in the layout
# conf/data/nocaps_eval.yaml reads:
#   DEST/annotations/nocaps_val_4500_captions.json   (the official COCO-format file, `domain` per image)
#   DEST/images/<file_name>                           (each image from the `coco_url` the file lists)
#   bash data_scripts/download_nocaps.sh /data/nocaps
# Offline / air-gapped: NOCAPS_ANNOTATION=<a local copy of the annotation file> skips its download, and
# DRY_RUN=1 only writes DEST/image_urls.tsv (url <TAB> path) for another machine to fetch. Idempotent: images
# already present are not fetched again; images that fail are listed in DEST/failed.txt (exit 1).
set -euo pipefail
DEST=${1:?usage: $0 DEST_DIR}
PY=${PY:-python}
ANN="$DEST/annotations/nocaps_val_4500_captions.json"
mkdir -p "$DEST/images" "$DEST/annotations"
if [ -n "${NOCAPS_ANNOTATION:-}" ]; then
  cp "$NOCAPS_ANNOTATION" "$ANN"
elif [ ! -s "$ANN" ]; then
  wget -c "https://s3.amazonaws.com/nocaps/nocaps_val_4500_captions.json" -O "$ANN"
fi
# Check the file (COCO caption format, a domain and a URL per image) and list the images still missing.
"$PY" - "$ANN" "$DEST" <<'PYEOF'
import json, os, sys
ann, dest = sys.argv[1], sys.argv[2]
d = json.load(open(ann))
for key in ("images", "annotations"):
    if key not in d:
        sys.exit(f"error: {ann}: no '{key}' list (not a COCO caption file)")
todo = []
for n, im in enumerate(d["images"]):
    for field in ("id", "file_name", "domain", "coco_url"):
        if field not in im:
            sys.exit(f"error: {ann}: images[{n}] has no '{field}'")
    path = os.path.join(dest, "images", im["file_name"])
    if not os.path.exists(path):
        todo.append(f"{im['coco_url']}\t{path}\n")
with_caption = {a["image_id"] for a in d["annotations"]}
missing = [im["id"] for im in d["images"] if im["id"] not in with_caption]
if missing:
    sys.exit(f"error: {ann}: {len(missing)} image(s) without a caption, e.g. id {missing[0]}")
open(os.path.join(dest, "image_urls.tsv"), "w").writelines(todo)
print(f"{len(d['images'])} images, {len(d['annotations'])} captions; {len(todo)} image(s) to fetch")
PYEOF
[ "${DRY_RUN:-0}" = 1 ] && { echo "DRY_RUN: urls in $DEST/image_urls.tsv"; exit 0; }
: > "$DEST/failed.txt"
# 16 parallel downloads; a failed one is recorded, never silently dropped
tr '\t' ' ' < "$DEST/image_urls.tsv" | xargs -P 16 -n 2 sh -c \
  'wget -q -O "$1.part" "$0" && mv "$1.part" "$1" || { rm -f "$1.part"; echo "$0" >> "'"$DEST"'/failed.txt"; }'
if [ -s "$DEST/failed.txt" ]; then
  echo "error: $(wc -l < "$DEST/failed.txt") image(s) failed, listed in $DEST/failed.txt (run again to retry)" >&2
  exit 1
fi
echo "NoCaps val in $DEST: blip2-eval experiment=caption_nocaps_eval paths.data_dir=$(dirname "$DEST")"
