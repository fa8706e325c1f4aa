#!/usr/bin/env bash
# The GPU check on a lent device machine whose calls each get a fresh copy of the working
# tree, carry at most 64 MiB, and last at most 600 s, while /tmp stays as long as the machine
# is warm. After tools/pack_dali.sh here, back to back (the machine goes cold when idle):
#   tools/device_check.sh stash   once per part, carrying .dali/pK (and .dali/SHA256 with one
#                                 of them): copies it out of the tree into $MVEB_DEVICE_DIR
#   tools/device_check.sh A       GPU tests, then the kernels and loader benchmarks
#   tools/device_check.sh B       the step benchmarks (batch 256 with DALI, then batch 128)
# A and B join and check the parts, install them (tools/gpu_check.sh) and merge their results
# into one folder kept on the machine; each copies that folder to $OUT/gpu-check when it ends.
# DEVICE_LIMIT is the call's limit in seconds (590): a phase stops itself MARGIN (30) s
# before it, so what it measured comes back (bench all and bench step write as they go).
set -uo pipefail
cd "$(dirname "$0")/.."
KEEP="${MVEB_DEVICE_DIR:-/tmp/mveb-device}"
mkdir -p "$KEEP/parts"
case "${1:-}" in
  stash)
    compgen -G ".dali/p*" >/dev/null || { echo "error: no .dali/p* in this tree (carry one)"; exit 1; }
    cp .dali/p* "$KEEP/parts/" && { [ ! -f .dali/SHA256 ] || cp .dali/SHA256 "$KEEP/"; }
    ls -l "$KEEP/parts"; exit 0 ;;
  A) export GPU_CHECK_TESTS=1 GPU_CHECK_PARTS=kernels,loader ;;
  B) export GPU_CHECK_TESTS=0 GPU_CHECK_PARTS=step ;;
  *) echo "usage: tools/device_check.sh stash|A|B"; exit 2 ;;
esac
wheels=()
if compgen -G "$KEEP/parts/p*" >/dev/null; then
  if [ ! -d "$KEEP/wheels" ]; then
    [ -f "$KEEP/SHA256" ] || { echo "error: $KEEP/SHA256 missing: stash the part that carries .dali/SHA256"; exit 1; }
    sum=$(cat "$KEEP"/parts/p* | sha256sum | cut -d' ' -f1)
    [ "$sum" = "$(cat "$KEEP/SHA256")" ] \
      || { echo "error: the stashed parts ($(ls "$KEEP/parts" | tr '\n' ' ')) do not join into the packed tar: stash the missing ones"; exit 1; }
    rm -rf "$KEEP/wheels.tmp" && mkdir -p "$KEEP/wheels.tmp" \
      && cat "$KEEP"/parts/p* | tar -C "$KEEP/wheels.tmp" -xf - && mv "$KEEP/wheels.tmp" "$KEEP/wheels" \
      || { echo "error: could not unpack the parts"; exit 1; }
  fi
  wheels=("$KEEP/wheels")
else
  echo "warning: no DALI parts stashed in $KEEP/parts: the DALI rows will be errors"
fi
export GPU_CHECK_OUT="$KEEP/gpu-check"
limit=$(( ${DEVICE_LIMIT:-590} - ${MARGIN:-30} ))
start=$SECONDS
timeout --signal=INT --kill-after=10 "$limit" bash tools/gpu_check.sh "${wheels[@]}"
status=$?
[ $status = 124 ] && echo "phase $1 stopped at its ${limit} s limit; what it finished is kept"
echo "phase $1: $((SECONDS - start)) s, exit $status"
[ -z "${OUT:-}" ] || cp -r "$GPU_CHECK_OUT" "$OUT/"
exit $status
