#!/usr/bin/env bash
# `make demo`: build a small collection from real photos, then convert -> extract -> query -> eval with `lite`.
set -euo pipefail
DEMO=${DEMO_DIR:-demo}
export VISEARCH_DATA_DIR="$DEMO/data"
python benchmarks/make_demo.py "$DEMO"
set -x
visearch convert "$DEMO/photos" --name demo --ground-truth "$DEMO/ground_truth.json"
visearch extract demo --model lite
visearch query "$DEMO/photos/queries/coffee-crop.jpg" "$DEMO/photos/queries/rocket-small.jpg" --dataset demo --top-k 3
visearch query "$DEMO/photos/queries/chelsea-small.jpg" --dataset demo --top-k 3 --json
ls "$DEMO"/photos/queries/*-crop.jpg | visearch query - --dataset demo --top-k 1 --paths
visearch eval demo --model lite
