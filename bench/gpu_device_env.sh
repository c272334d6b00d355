# Source on the lent GPU machine (bash), from the project root, after carrying .gpu-carry/
# (filled by bench/gpu_carry.sh). Sets TRITONSERVER and TRITON_BACKENDS, puts first on PATH a
# venv whose site-packages hold numpy 1.26 (the Python stub fails with numpy 2) and the carried
# wheels, then the image's own packages (torch, triton, ...) through a .pth file. The test
# process itself runs in that venv too, so it sees the same packages as the stub.
_carry=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ ! -x /tmp/tritonkv-ts/pytriton/tritonserver/bin/tritonserver ]; then
  mkdir -p /tmp/tritonkv-ts && tar xJf "$_carry/ts.txz" -C /tmp/tritonkv-ts
  cp /tmp/tritonkv-ts/pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub \
     /tmp/tritonkv-ts/pytriton/tritonserver/backends/python/
fi
if [ ! -x /tmp/tritonkv-stubenv/bin/python3 ]; then
  _image_site=$(python3 -c "import site; print(site.getsitepackages()[0])")
  python3 -m venv --without-pip /tmp/tritonkv-stubenv
  _se=$(/tmp/tritonkv-stubenv/bin/python3 -c "import site; print(site.getsitepackages()[0])")
  tar xJf "$_carry/np.txz" -C "$_se"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$_se" "$_carry"/wheels/*.whl
  echo "$_image_site" > "$_se/zz_image_site.pth"
fi
export PATH=/tmp/tritonkv-stubenv/bin:$PATH
export LD_LIBRARY_PATH=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export TRITONSERVER=/tmp/tritonkv-ts/pytriton/tritonserver/bin/tritonserver
export TRITON_BACKENDS=/tmp/tritonkv-ts/pytriton/tritonserver/backends
export TRITONKV_COMMIT=$(head -c 40 "$_carry/commit" 2>/dev/null)
python3 -c "import numpy, torch, zmq, msgspec; print('device env: numpy', numpy.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
