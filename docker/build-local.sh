#!/usr/bin/env bash
# Build the four stage images without a Docker daemon or a registry, then run each one as the cluster would:
# uid 1000, read-only root filesystem, a writable /tmp. Debian's buildah (vfs storage, chroot isolation); the
# Python base is made with debootstrap from Debian's own packages when python:3.11-slim cannot be pulled.
#
#   sudo apt-get install -y buildah debootstrap
#   sudo bash docker/build-local.sh [STAGE ...]        # default: all four; writes build/images/report.txt
#
# Environment: SKIP_BUILD=1 (reuse images already built), BASE_IMAGE (default: a debootstrap bookworm base built here), ACCELERATOR (finetune/benchmark
# JAX backend, default cpu), TORCH_INDEX (default: a local index over pip's find-links wheels when one has
# torch, else PyTorch's CPU index), TAG (default dev).
set -euo pipefail
cd "$(dirname "$0")/.."
STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || STAGES=(preprocess finetune benchmark convert)
TAG=${TAG:-dev}
OUT=build/images
BUILDAH=(buildah --storage-driver vfs)
mkdir -p "$OUT"
REPORT=$OUT/report.txt
: > "$REPORT"
say() { echo "$*" | tee -a "$REPORT"; }

base=${BASE_IMAGE:-localhost/gemma-pipeline/python-base:bookworm}
if [ -z "${BASE_IMAGE:-}" ] && ! "${BUILDAH[@]}" inspect --type image "$base" >/dev/null 2>&1; then
  rootfs=$OUT/rootfs
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$rootfs" http://deb.debian.org/debian
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  ctr=$("${BUILDAH[@]}" from scratch)
  mnt=$("${BUILDAH[@]}" mount "$ctr")
  cp -a "$rootfs"/. "$mnt"/
  "${BUILDAH[@]}" umount "$ctr"
  "${BUILDAH[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd python "$ctr"
  "${BUILDAH[@]}" commit --rm "$ctr" "$base"
  rm -rf "$rootfs"
fi

volumes=()
# A network behind a TLS-inspecting proxy: give the build's pip the host's CA bundle (never part of the image).
if [ -n "${BUILD_CA_BUNDLE:-}" ] || [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  printf '[global]\ncert = /etc/ssl/certs/build-ca.crt\n' > "$OUT/pip.conf"
  volumes+=(--volume "${BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}:/etc/ssl/certs/build-ca.crt:ro"
            --volume "$PWD/$OUT/pip.conf:/etc/pip.conf:ro")
fi
torch_index=${TORCH_INDEX:-}
if [ -z "$torch_index" ]; then
  wheel=$(ls /opt/wheels/torch-*+cpu-*.whl 2>/dev/null | head -1 || true)
  if [ -n "$wheel" ]; then  # a closed network: serve the machine's CPU torch wheel as a one-package index
    index=$PWD/$OUT/torch-index
    mkdir -p "$index/torch"
    cp -f "$wheel" "$index/torch/"
    printf '<a href="%s">%s</a>\n' "$(basename "$wheel")" "$(basename "$wheel")" > "$index/torch/index.html"
    volumes+=(--volume "$index:/torch-index:ro")
    torch_index=file:///torch-index
  else
    torch_index=https://download.pytorch.org/whl/cpu
  fi
fi

for stage in "${STAGES[@]}"; do
  image=localhost/gemma-pipeline/$stage:$TAG
  if [ -n "${SKIP_BUILD:-}" ] && "${BUILDAH[@]}" inspect --type image "$image" >/dev/null 2>&1; then
    say "$stage: reusing $image (SKIP_BUILD), size $("${BUILDAH[@]}" images --format '{{.Size}}' "$image")"
    continue
  fi
  start=$(date +%s)
  "${BUILDAH[@]}" bud --isolation chroot --layers=false "${volumes[@]}" \
    --build-arg PYTHON_IMAGE="$base" --build-arg TORCH_INDEX="$torch_index" \
    --build-arg ACCELERATOR="${ACCELERATOR:-cpu}" -f "docker/$stage.Dockerfile" -t "$image" . > "$OUT/$stage.build.log" 2>&1 \
    || { say "$stage: BUILD FAILED, see $OUT/$stage.build.log"; tail -20 "$OUT/$stage.build.log"; exit 1; }
  size=$("${BUILDAH[@]}" images --format '{{.Size}}' "$image" 2>/dev/null || echo "?")
  say "$stage: built $image in $(( $(date +%s) - start )) s, size $(numfmt --to=iec-i --suffix=B "$size" 2>/dev/null || echo "$size")"
done

# Run as the Job would: read-only root, uid 1000, /tmp an emptyDir (here a host folder shared by the stages, so
# one stage's output is the next one's input). `buildah run` has no read-only root, so the image's filesystem is
# mounted, bound read-only and entered with chroot.
WORK=$PWD/$OUT/work
rm -rf "$WORK" && mkdir -p "$WORK" && chown 1000:1000 "$WORK"
run_in() {  # stage, then the command
  local image=localhost/gemma-pipeline/$1:$TAG; shift
  local ctr mnt root rc=0 env_args=()
  ctr=$("${BUILDAH[@]}" from --pull-never "$image")
  mnt=$("${BUILDAH[@]}" mount "$ctr")
  root=$(mktemp -d)
  mount --bind "$mnt" "$root" && mount -o remount,bind,ro "$root"
  mount --bind "$WORK" "$root/tmp"
  mount -t proc proc "$root/proc"
  mapfile -t env_args < <("${BUILDAH[@]}" inspect --type image --format '{{range .OCIv1.Config.Env}}{{println .}}{{end}}' "$image" | sed '/^$/d')
  (cd / && env -i "${env_args[@]}" chroot --userspec=1000:1000 "$root" sh -c 'cd /tmp && exec "$@"' sh "$@") || rc=$?
  umount "$root/proc" "$root/tmp" "$root"
  rmdir "$root"
  "${BUILDAH[@]}" umount "$ctr" >/dev/null
  "${BUILDAH[@]}" rm "$ctr" >/dev/null
  return $rc
}
check() {  # stage, what, then the command
  local stage=$1 what=$2; shift 2
  if run_in "$stage" "$@" > "$OUT/$stage.$what.txt" 2>&1; then
    say "$stage: $what ran as uid 1000 on a read-only root: ${SUMMARY:-$(tail -1 "$OUT/$stage.$what.txt" | cut -c1-120)}"
  else
    say "$stage: $what FAILED (exit $?)"; tail -30 "$OUT/$stage.$what.txt"; exit 1
  fi
}
declare -A MODULE=([preprocess]=jobs.preprocessing [finetune]=jobs.finetuning [benchmark]=jobs.benchmark [convert]=jobs.convert)
for stage in "${STAGES[@]}"; do
  check "$stage" help python -m "${MODULE[$stage]}" --help
done

if [ ${#STAGES[@]} -eq 4 ]; then
  # One tiny real pipeline through the four images: a 2-layer random-weight Gemma 3 made on the host (the
  # tests' tiny model), the demo dataset, a few steps; every stage reads the previous one's output.
  chown -R 1000:1000 "$WORK"
  .venv/bin/python -c "import sys; sys.path.insert(0, '.'); from pathlib import Path; from tests.tiny_models import save_tiny_preset; save_tiny_preset(Path('$WORK/tiny'))"
  chown -R 1000:1000 "$WORK"
  check preprocess run python -m jobs.preprocessing --output /tmp/pre --base-model /tmp/tiny --max-tokens 64
  check finetune run python -m jobs.finetuning --data /tmp/pre --output /tmp/ft --base-model /tmp/tiny \
    --max-steps 2 --batch-size 2 --sequence-length 64 --checkpoint-every 1
  check benchmark run python -m jobs.benchmark --data /tmp/pre --finetune /tmp/ft --output /tmp/bench \
    --base-model /tmp/tiny --bootstrap 0 --max-examples 4
  check convert run python -m jobs.convert --finetune /tmp/ft --data /tmp/pre --output /tmp/hf --answers 1
fi
say "images:"; "${BUILDAH[@]}" images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep gemma-pipeline | tee -a "$REPORT"
