#!/usr/bin/env bash
# Run on the CPU machine, in the project root, before the GPU calls of bench/gpu_run.sh.
# Fills .gpu-carry/ (git-ignored) with what the registry-less GPU machine lacks:
#   ts.txz         tritonserver 2.51 + Python backend + the 3.12 stub (prepare_carry.sh's
#                  ts.tgz recompressed with xz: 38 -> 24 MiB, so the extra wheels fit the
#                  device tool's 64 MiB with the repository)
#   numpy 1.26, tritonclient, python-rapidjson (the stub's env, from prepare_carry.sh)
#   wheels/        the project's dependencies missing from the image
#                  (bench/device_image_packages.txt lists what the image has)
#   commit         `git rev-parse HEAD` (+ "-dirty" with uncommitted changes): the device gets
#                  the tree without .git, so gpu_run.sh records this as the commit
# Then: device run, carry [".gpu-carry"], command `bash bench/gpu_run.sh check` (or serving).
# PREPARE_CARRY: path of the shared prepare_carry.sh (default ../shared/gpu or /work/shared/gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
out=.gpu-carry
prep=${PREPARE_CARRY:-}
for cand in ../shared/gpu/prepare_carry.sh /work/shared/gpu/prepare_carry.sh; do
  [ -z "$prep" ] && [ -f "$cand" ] && prep=$cand
done
[ -n "$prep" ] || { echo "prepare_carry.sh not found: set PREPARE_CARRY" >&2; exit 1; }
if [ ! -f "$out/ts.txz" ]; then
  bash "$prep"
  echo "recompressing ts.tgz with xz (a few minutes on 2 cores)"
  gzip -dc "$out/ts.tgz" | xz -9 -T2 > "$out/ts.txz.tmp" && mv "$out/ts.txz.tmp" "$out/ts.txz"
fi
rm -f "$out/ts.tgz" "$out/device_env.sh"  # bench/gpu_env.sh replaces device_env.sh
# Runtime and test dependencies the tests import on the device (aiperf is left out: it pulls
# dash, plotly, sqlalchemy and datasets, ~40 MiB; its one test is skipped there by name).
# Versions: the CPU venv's, so both machines run the same code.
pins=(fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 orjson==3.11.9 httpx-sse==0.4.3
      openai==3.63.0 pyzmq==26.4.0 msgspec==0.23.0 setproctitle==1.3.8 locust==2.47.0
      prometheus_client==0.23.1 jinja2)
plat=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
tmp=$(mktemp -d)
python3 -m pip download -q "${plat[@]}" -d "$tmp" "${pins[@]}" 2>&1 | grep -v "is ignored" || true
rm -rf "$out/wheels" && mkdir -p "$out/wheels"
for w in "$tmp"/*.whl; do
  name=$(basename "$w" | cut -d- -f1 | tr '_.' '--' | tr 'A-Z' 'a-z')
  grep -qxi "$name" bench/device_image_packages.txt || cp "$w" "$out/wheels/"
done
rm -rf "$tmp"
commit=$(git rev-parse HEAD)
git diff --quiet HEAD -- . ':!.gpu-carry' 2>/dev/null || commit="$commit-dirty"
echo "$commit" > "$out/commit"
ls "$out/wheels" | sed 's/-py.*//; s/-cp.*//' | tr '\n' ' '; echo
du -sh "$out"
tracked=$(git ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
carried=$(du -sb "$out" | cut -f1)
echo "tree $((tracked / 1048576)) MiB + carry $((carried / 1048576)) MiB (device tool limit 64 MiB)"
[ $((tracked + carried)) -lt $((63 * 1048576)) ] || { echo "over the device tool's 64 MiB" >&2; exit 1; }
