#!/usr/bin/env bash
# Run here (the CPU machine), in the project root, before a device call. Fills .gpu-carry/
# (git-ignored) with what the lent GPU machine lacks, inside the device tool's 64 MiB limit
# (repo included):
#   ts.txz     tritonserver 2.51 + python backend + the 3.12 stub (from ../shared's
#              prepare_carry.sh, recompressed with xz: 39 -> 25 MB)
#   np.txz     numpy 1.26 for the stub (it fails with numpy 2), unpacked wheel, tests dropped
#   wheels/    cp312 wheels the image lacks, dependencies resolved: tritonclient, rapidjson,
#              pyzmq, msgspec, setproctitle, the OpenAI frontend's (fastapi, uvicorn, orjson,
#              pydantic, ...), the openai SDK the e2e tests drive, locust
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
# The packages the tests and the server import, with their dependencies resolved (fastapi
# imports opentelemetry, openai imports httpx2: a list without them fails on the device);
# versions as in the CPU venv; what the image already has (bench/device_image_packages.txt)
# stays behind. aiperf is left out (dash, plotly, sqlalchemy, datasets: ~40 MiB): its one test
# is skipped there by name (tests/conftest.py).
pins=(tritonclient==2.73.0 python-rapidjson pyzmq==26.4.0 msgspec==0.23.0 setproctitle==1.3.8
      fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 orjson==3.11.9 httpx-sse==0.4.3
      openai==3.63.0 locust==2.47.0 jsonschema==4.26.0)
# xgrammar's own dependencies (torch, transformers, triton) are the image's: no resolving
nodeps=(xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2)
tmp=$(mktemp -d)
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$tmp" "${pins[@]}" 2>&1 | grep -v -i 'warning' || true
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 -d "$tmp" "${nodeps[@]}" 2>&1 | grep -v -i 'warning' || true
# rebuilt each time: an unpinned dependency that moved on (configargparse 1.9.0 -> 1.10.2) would
# otherwise leave both versions, and pip on the device refuses to install the folder
rm -rf "$out/wheels"
mkdir -p "$out/wheels"
for w in "$tmp"/*.whl; do
  name=$(basename "$w" | cut -d- -f1 | tr '_.' '--' | tr 'A-Z' 'a-z')
  grep -qxi "$name" bench/device_image_packages.txt || cp "$w" "$out/wheels/"
done
rm -rf "$tmp"
twice=$(ls "$out/wheels" | cut -d- -f1 | tr 'A-Z_.' 'a-z--' | sort | uniq -d)
[ -z "$twice" ] || { echo "two versions of: $twice (keep one: the device's pip refuses both)" >&2; exit 1; }
cp bench/gpu_device_env.sh "$out/device_env.sh"
git rev-parse HEAD > "$out/commit"
git diff --quiet HEAD -- backend tests bench || echo "dirty" >> "$out/commit"
du -sh "$out"
tracked=$(git ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
carried=$(du -sb "$out" | cut -f1)
echo "tree $((tracked / 1048576)) MiB + carry $((carried / 1048576)) MiB (device tool limit 64 MiB)"
[ $((tracked + carried)) -lt $((63 * 1048576)) ] || { echo "over the device tool's 64 MiB" >&2; exit 1; }
echo "device run: carry [\"$out\"], command: source $out/device_env.sh && ..."
