# Source on the lent GPU machine (bash), from the project root, after carrying .gpu-carry/
# (filled by bench/gpu_carry.sh). Sets TRITONSERVER and TRITON_BACKENDS, puts first on PATH a
# venv for the stub and a venv for the tests (below), and installs the tritonkv backend.
_carry=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ ! -x /tmp/tritonkv-ts/pytriton/tritonserver/bin/tritonserver ]; then
  mkdir -p /tmp/tritonkv-ts && tar xJf "$_carry/ts.txz" -C /tmp/tritonkv-ts
  cp /tmp/tritonkv-ts/pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub \
     /tmp/tritonkv-ts/pytriton/tritonserver/backends/python/
fi
# the wheel's layout (site-packages/pytriton/tritonserver beside nvidia_pytriton.libs): with
# /tmp/tritonkv-ts on the venvs' path (below), `import pytriton` finds the server as an installed
# nvidia-pytriton would (the plugin test runs `install-backend` and the binary that way)
touch /tmp/tritonkv-ts/pytriton/__init__.py
# Two venvs over the image's packages (torch, triton, transformers, ...):
# - /tmp/tritonkv-stubenv: numpy 1.26 first (the Python stub fails with numpy 2) + the carried
#   wheels; first on PATH, so the stub and the engine cores it starts run in it;
# - /tmp/tritonkv-testenv: the carried wheels and the image's numpy 2 (the image's scipy /
#   sklearn, which transformers' generation imports, fail with numpy 1.26): pytest, the HF
#   oracles and the launcher run in it (TRITONKV_TEST_PYTHON).
# Both see this tree's backend/ and client/ through a .pth file, as an editable install would
# (a test that starts a plain tritonserver with no PYTHONPATH still finds tritonkv).
_image_site=$(python3 -c "import site; print(site.getsitepackages()[0])")
for _env in stubenv testenv; do
  if [ ! -x /tmp/tritonkv-$_env/bin/python3 ]; then
    python3 -m venv --without-pip /tmp/tritonkv-$_env
    _se=$(/tmp/tritonkv-$_env/bin/python3 -c "import site; print(site.getsitepackages()[0])")
    [ $_env = stubenv ] && tar xJf "$_carry/np.txz" -C "$_se"
    if ! python3 -m pip install -q --no-index --no-deps --no-compile --target "$_se" "$_carry"/wheels/*.whl; then
      # no half-made venv stays behind for the next call to take as ready
      rm -rf /tmp/tritonkv-$_env
      echo "device env: installing the carried wheels into $_env failed (above)" >&2
      return 1
    fi
    echo "$_image_site" > "$_se/zz_image_site.pth"
    printf '%s\n%s\n' "$(dirname "$_carry")/backend" "$(dirname "$_carry")/client" > "$_se/tritonkv_src.pth"
    echo /tmp/tritonkv-ts > "$_se/tritonkv_pytriton.pth"
  fi
done
export TRITONKV_TEST_PYTHON=/tmp/tritonkv-testenv/bin/python3
export TRITONKV_STUB_PYTHON=/tmp/tritonkv-stubenv/bin/python3  # tests that start a stub by hand
export PATH=/tmp/tritonkv-stubenv/bin:$PATH
export LD_LIBRARY_PATH=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export TRITONSERVER=/tmp/tritonkv-ts/pytriton/tritonserver/bin/tritonserver
export TRITON_BACKENDS=/tmp/tritonkv-ts/pytriton/tritonserver/backends
export TRITONKV_COMMIT=$(head -c 40 "$_carry/commit" 2>/dev/null)
python3 -c "import numpy, torch, zmq, msgspec; print('device env (stub): numpy', numpy.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
  || { echo "device env: the stub's venv lacks a package (above)" >&2; return 1; }
"$TRITONKV_TEST_PYTHON" -c "import numpy, transformers; print('device env (tests): numpy', numpy.__version__, 'transformers', transformers.__version__)"
# the tritonkv backend (model.py) beside the carried Python backend: models say backend: "tritonkv"
"$TRITONKV_TEST_PYTHON" -m tritonkv.server.cli install-backend "$TRITON_BACKENDS" > /dev/null
