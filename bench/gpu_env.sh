# Source on the GPU machine (bash), from the project root, with .gpu-carry/ carried
# (bench/gpu_carry.sh fills it). After it:
#   IMGPY            the image's python3 (torch, triton, transformers, numpy 2): runs pytest
#                    and the benchmarks
#   python3 on PATH  a venv for tritonserver's Python stub: numpy 1.26 first (the stub fails
#                    with numpy 2: every response empty or a shape error), then the image's
#                    packages through a .pth file (the stub ignores PYTHONPATH; it takes the
#                    site-packages of the first python3 on PATH)
#   TRITONSERVER, TRITON_BACKENDS  the carried tritonserver 2.51 (the launcher reads both)
#   PYTHONPATH       backend/, client/ and the carried wheels (/tmp/tkv-py) for IMGPY and
#                    its subprocesses; the stub venv sees /tmp/tkv-py through a .pth too
# Idempotent: a second source in the same machine reuses what the first unpacked.
_carry=$(cd .gpu-carry && pwd)
IMGPY=${IMGPY:-$(command -v python3)}
export IMGPY
if [ ! -x /tmp/tritonkv-ts/pytriton/tritonserver/bin/tritonserver ]; then
  mkdir -p /tmp/tritonkv-ts
  if [ -f "$_carry/ts.txz" ]; then
    "$IMGPY" -c "import tarfile, sys; tarfile.open(sys.argv[1], 'r:xz').extractall(sys.argv[2], filter='tar')" \
      "$_carry/ts.txz" /tmp/tritonkv-ts
  else
    tar xzf "$_carry/ts.tgz" -C /tmp/tritonkv-ts
  fi
  cp /tmp/tritonkv-ts/pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub \
     /tmp/tritonkv-ts/pytriton/tritonserver/backends/python/
fi
if [ ! -d /tmp/tkv-py ] && [ -d "$_carry/wheels" ]; then
  "$IMGPY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/tkv-py \
    "$_carry"/wheels/*.whl "$_carry"/tritonclient-*.whl "$_carry"/python_rapidjson-*.whl
fi
if [ ! -x /tmp/tritonkv-stubenv/bin/python3 ]; then
  _image_site=$("$IMGPY" -c "import site; print(site.getsitepackages()[0])")
  "$IMGPY" -m venv --without-pip /tmp/tritonkv-stubenv
  _se=$(/tmp/tritonkv-stubenv/bin/python3 -c "import site; print(site.getsitepackages()[0])")
  "$IMGPY" -m pip install -q --no-index --no-deps --no-compile --target "$_se" "$_carry"/numpy-1.26.4-*.whl
  # .pth files are read in name order: the carried wheels before the image's packages
  echo /tmp/tkv-py > "$_se/yy_tritonkv_carried.pth"
  echo "$_image_site" > "$_se/zz_image_site.pth"
fi
export PATH=/tmp/tritonkv-stubenv/bin:$PATH
export LD_LIBRARY_PATH=$("$IMGPY" -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export TRITONSERVER=/tmp/tritonkv-ts/pytriton/tritonserver/bin/tritonserver
export TRITON_BACKENDS=/tmp/tritonkv-ts/pytriton/tritonserver/backends
export PYTHONPATH=$PWD/backend:$PWD/client:/tmp/tkv-py${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
# the engine tests and benchmarks on CUDA; the CPU oracles (HF) stay where each test puts them
export TRITONKV_TEST_DEVICE=cuda
