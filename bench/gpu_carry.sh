#!/usr/bin/env bash
# Run here (the CPU machine), in the project root, before a device call. Fills .gpu-carry/
# (git-ignored) with what the lent GPU machine lacks, inside the device tool's 64 MiB limit
# (repo included):
#   ts.txz     tritonserver 2.51 + python backend + the 3.12 stub (from ../shared's
#              prepare_carry.sh, recompressed with xz: 39 -> 25 MB)
#   np.txz     numpy 1.26 for the stub (it fails with numpy 2), unpacked wheel, tests dropped
#   wheels/    cp312 wheels the image lacks: tritonclient, rapidjson, pyzmq, msgspec,
#              setproctitle, the OpenAI frontend's (fastapi, uvicorn, orjson, pydantic) and
#              the openai SDK the e2e tests drive
#   commit     the commit the tree was sent from (the device gets no .git)
#   device_env.sh  `source` it on the device (bench/gpu_device_env.sh)
# The image already has torch, triton, transformers, pytest, pytest-xdist, pytest-timeout,
# httpx, jinja2, prometheus-client, safetensors, tokenizers, onnx, onnxruntime.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.gpu-carry
shared=${SHARED:-../shared}
if [ ! -f "$out/ts.txz" ]; then
  bash "$shared/gpu/prepare_carry.sh" >/dev/null
  tmp=$(mktemp -d)
  mkdir "$tmp/ts" "$tmp/np"
  tar xzf "$out/ts.tgz" -C "$tmp/ts"
  (cd "$tmp/ts" && tar cf - . | xz -9 -T2 > "$OLDPWD/$out/ts.txz")
  (cd "$tmp/np" && unzip -q "$OLDPWD"/$out/numpy-1.26.4-*.whl && rm -rf numpy/*/tests numpy/tests \
     && tar cf - . | xz -9 -T2 > "$OLDPWD/$out/np.txz")
  mkdir -p "$out/wheels"
  mv "$out"/tritonclient-*.whl "$out"/python_rapidjson-*.whl "$out/wheels/"
  rm -rf "$tmp" "$out/ts.tgz" "$out"/numpy-*.whl "$out/device_env.sh"
fi
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$out/wheels" \
  pyzmq msgspec setproctitle fastapi starlette pydantic pydantic-core uvicorn orjson httpx-sse \
  openai distro jiter sniffio annotated-types typing-inspection 2>&1 | grep -v '^WARNING' || true
cp bench/gpu_device_env.sh "$out/device_env.sh"
git rev-parse HEAD > "$out/commit"
git diff --quiet HEAD -- backend tests bench || echo "dirty" >> "$out/commit"
du -sh "$out"
echo "device run: carry [\"$out\"], command: source $out/device_env.sh && ..."
