#!/usr/bin/env bash
# Packs DALI (the cuda130 build) and its dependencies for a GPU host that reaches no package
# registry and takes at most 64 MiB per transfer: one tar of the wheels, split into parts of
# $PART_MIB MiB (56) under the git-ignored .dali/, plus .dali/SHA256 of the whole tar, so
# tools/device_check.sh can check the join on the other side.
#   usage: tools/pack_dali.sh        (GPU_PYTHON=3.12 DALI_VERSION=2.4.0 PART_MIB=56 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"; [ -x "$PY" ] || PY=python3
DEST=.dali
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
# Wheels for the GPU host's Python, not this machine's: DALI is py3-none, but libcst, optree
# and nvtx are compiled per CPython version.
"$PY" -m pip download -q --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$wheels" "nvidia-dali-cuda130==${DALI_VERSION:-2.4.0}" \
  || { echo "error: could not download DALI and its dependencies"; exit 1; }
# The host's own numpy is the one its torch was built against: a second one on the path would shadow it.
rm -f "$wheels"/numpy-*.whl "$wheels"/wheel-*.whl
rm -rf "$DEST" && mkdir -p "$DEST"
tar -C "$wheels" -cf - . | split -b "${PART_MIB:-56}m" -d -a 1 - "$DEST/p"
cat "$DEST"/p* | sha256sum | cut -d' ' -f1 > "$DEST/SHA256"
echo "packed $(ls "$wheels" | wc -l) wheels ($(du -sh "$wheels" | cut -f1)) into $(ls "$DEST"/p* | wc -l) parts:"
ls -l "$DEST"
