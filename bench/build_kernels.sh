#!/usr/bin/env bash
# Build SageAttention 2 and SpargeAttn wheels for Hopper (sm90) on the GPU machine, side by side.
#
#   bash bench/build_kernels.sh SRC_DIR WHEEL_DIR
#
# SRC_DIR holds the git-excluded source exports (never committed): SageAttention/ and SpargeAttn/
# (git archive of thu-ml's newest commits, docs/assets/examples dropped, SpargeAttn's
# instantiation .cu files pre-generated) and wheels/ (einops, ninja, setuptools, wheel: pure-Python or
# self-contained helpers the offline machine may lack). WHEEL_DIR receives
# sageattention-2.*.whl, spas_sage_attn-*.whl, einops (SpargeAttn imports it) and logs/.
#
# No network: `pip wheel --no-deps --no-build-isolation`, TORCH_CUDA_ARCH_LIST=9.0 (upstream turns
# that into -gencode arch=compute_90a,code=sm_90a). Each build runs under `timeout` (BUILD_TIMEOUT_S,
# default 420 s) with its own MAX_JOBS (SAGE_JOBS 10, SPARGE_JOBS 14: both fit 32 cores beside a
# training job). The exit status of each build is printed and written to WHEEL_DIR/logs/status.txt;
# the script exits 0 only when both wheels were built.
#
# Environment:
#   BUILD_TIMEOUT_S   per-build limit (default 420)
#   SAGE_JOBS / SPARGE_JOBS   parallel compile jobs per build (MAX_JOBS)
#   KERNELS_FULL=1    build upstream's full extension set; by default only what sm90 dispatches to is
#                     built (see trim_sources below): SageAttention's _qattn_sm90 + _fused, and
#                     SpargeAttn's sm90 kernels + _fused.
#   DRY_RUN=1         print the environment and the build commands, build nothing.
set -uo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: bash bench/build_kernels.sh SRC_DIR WHEEL_DIR" >&2
  exit 2
fi
SRC=$(realpath "$1") || exit 2
WHEELS=$(realpath -m "$2")
PY=$(command -v "${PYTHON:-python3}") || { echo "FAIL: ${PYTHON:-python3} not found" >&2; exit 2; }
PY=$(realpath -s "$PY")  # the builds run from their source folders
TIMEOUT_S=${BUILD_TIMEOUT_S:-420}
SAGE_JOBS=${SAGE_JOBS:-10}
SPARGE_JOBS=${SPARGE_JOBS:-14}
DRY_RUN=${DRY_RUN:-0}
KERNELS_FULL=${KERNELS_FULL:-0}
LOGS=$WHEELS/logs
WORK=${BUILD_WORK:-/tmp/diffstack-kernel-build}
TOOLS=$WORK/tools

for name in SageAttention SpargeAttn; do
  if [[ ! -f $SRC/$name/setup.py ]]; then
    echo "FAIL: $SRC/$name/setup.py not found (export the sources first; see plugins/sage/README.md)" >&2
    exit 2
  fi
done
mkdir -p "$WHEELS" "$LOGS" "$WORK"

echo "== environment ($(date -u +%FT%TZ))"
echo "cores $(nproc); load $(cut -d' ' -f1-3 /proc/loadavg); memory $(free -g | awk '/Mem:/ {print $2 " GiB total, " $7 " GiB available"}')"
cat "$SRC"/*/UPSTREAM_COMMIT 2>/dev/null
NVCC=$(command -v nvcc || true)
if [[ -z $NVCC && -x ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc ]]; then
  export PATH=${CUDA_HOME:-/usr/local/cuda}/bin:$PATH
  NVCC=$(command -v nvcc)
fi
if [[ -z $NVCC ]]; then
  echo "FAIL: nvcc not found (no CUDA toolkit on PATH or in CUDA_HOME=${CUDA_HOME:-/usr/local/cuda})" >&2
  exit 3
fi
if [[ -z ${CUDA_HOME:-} ]]; then  # nvcc on PATH may be a wrapper script: find the toolkit's headers
  for home in "$(dirname "$(dirname "$(realpath "$NVCC")")")" /usr/local/cuda; do
    [[ -f $home/include/cuda_runtime.h ]] && { CUDA_HOME=$home; break; }
  done
fi
if [[ ! -f ${CUDA_HOME:-/nonexistent}/include/cuda_runtime.h || ! -x $CUDA_HOME/bin/nvcc ]]; then
  echo "FAIL: no CUDA toolkit with include/cuda_runtime.h and bin/nvcc found (set CUDA_HOME)" >&2
  exit 3
fi
export CUDA_HOME
echo "nvcc $NVCC (CUDA_HOME=$CUDA_HOME): $("$NVCC" --version | grep -o 'release [0-9.]*, V[0-9.]*')"
echo "gcc: $(gcc --version | head -1)"
"$PY" - <<'EOF' || { echo "FAIL: torch does not import" >&2; exit 3; }
import importlib.metadata as md, sys, torch
from torch.utils import cpp_extension
print("python", sys.version.split()[0], "| torch", torch.__version__, "built for CUDA", torch.version.cuda)
print("torch CUDA_HOME", cpp_extension.CUDA_HOME, "| ninja available", cpp_extension.is_ninja_available())
if torch.cuda.is_available():
    print("GPUs:", [torch.cuda.get_device_name(i) + " sm%d%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())])
for dist in ("pip", "setuptools", "wheel", "packaging", "ninja", "triton", "einops"):
    try:
        print(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist} missing")
EOF

# Build helpers the offline machine may lack go into a private folder, never into the environment.
missing=()
"$PY" -c "import setuptools" 2>/dev/null || missing+=(setuptools)
"$PY" -c "import wheel" 2>/dev/null || missing+=(wheel)
command -v ninja >/dev/null || missing+=(ninja)
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "== installing build helpers from $SRC/wheels into $TOOLS: ${missing[*]}"
  if [[ $DRY_RUN == 1 ]]; then
    echo "(dry run) $PY -m pip install --no-index --find-links $SRC/wheels --target $TOOLS ${missing[*]}"
  else
    "$PY" -m pip install -q --no-index --no-deps --find-links "$SRC/wheels" --target "$TOOLS" "${missing[@]}" \
      || { echo "FAIL: cannot install ${missing[*]} from $SRC/wheels" >&2; exit 3; }
  fi
  export PATH=$TOOLS/bin:$PATH PYTHONPATH=$TOOLS${PYTHONPATH:+:$PYTHONPATH}
  command -v ninja >/dev/null && echo "ninja $(ninja --version)"
fi
# Both link their kernels with -lcuda, which needs an unversioned libcuda.so; a driver mounted into a
# container often brings only libcuda.so.1, and a pip-assembled toolkit has no stubs/ folder.
libcuda_dir=""
for dir in $(ldconfig -p 2>/dev/null | awk '/libcuda\.so(\.1)? / {print $NF}' | xargs -r -n1 dirname) \
  /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 \
  "$CUDA_HOME/lib64/stubs" "$CUDA_HOME/targets/x86_64-linux/lib/stubs"; do
  if [[ -e $dir/libcuda.so ]]; then libcuda_dir=$dir; break; fi
  if [[ -e $dir/libcuda.so.1 ]]; then
    mkdir -p "$WORK/libcuda" && ln -sf "$dir/libcuda.so.1" "$WORK/libcuda/libcuda.so"
    libcuda_dir=$WORK/libcuda
    break
  fi
done
if [[ -n $libcuda_dir ]]; then
  export LIBRARY_PATH=$libcuda_dir${LIBRARY_PATH:+:$LIBRARY_PATH}
  echo "libcuda for -lcuda: $libcuda_dir ($(readlink -f "$libcuda_dir/libcuda.so"))"
else
  echo "warning: no libcuda.so or libcuda.so.1 found: linking with -lcuda will fail"
fi
# Both _fused extensions include torch's ATen/cuda/CUDAContext.h, which needs the math libraries'
# headers (cusparse.h, cublas_v2.h, cublasLt.h, cusolverDn.h). A toolkit without them (one assembled
# from nvcc's pip packages) can borrow those of the nvidia-* wheels torch itself depends on.
if [[ ! -f $CUDA_HOME/include/cusparse.h ]]; then
  nv_includes=$("$PY" -c '
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit
found = [d for root in nvidia.__path__ for d in sorted(glob.glob(os.path.join(root, "*", "include")))]
print(":".join(d for d in found if glob.glob(os.path.join(d, "cu*.h"))))
' 2>/dev/null)
  has_cusparse=0
  IFS=: read -ra nv_dirs <<<"$nv_includes"
  for dir in "${nv_dirs[@]}"; do [[ -f $dir/cusparse.h ]] && has_cusparse=1; done
  if [[ $has_cusparse == 1 ]]; then
    export CPATH=$nv_includes${CPATH:+:$CPATH}
    echo "math library headers from torch's nvidia wheels (CPATH): $nv_includes"
  else
    echo "warning: no cusparse.h in $CUDA_HOME/include nor in the nvidia wheels: the _fused extensions will not compile"
  fi
fi
# SpargeAttn passes `-Xcompiler -include,cassert` to nvcc; with nvcc 13.0 and GCC 12 that makes the
# host pass re-include <cassert> into already-preprocessed code ("redefinition of std::__terminate()"
# in every file). Its sources include <cassert> themselves, so where a one-line probe fails, drop it.
DROP_INCLUDE_CASSERT=0
mkdir -p "$WORK/probe"
printf '#include <cstdio>\n__global__ void k() {}\nint main() { k<<<1, 1>>>(); return 0; }\n' >"$WORK/probe/p.cu"
if ! "$CUDA_HOME/bin/nvcc" -std=c++17 -gencode arch=compute_90a,code=sm_90a -Xcompiler -include,cassert \
  -c "$WORK/probe/p.cu" -o "$WORK/probe/p.o" >"$WORK/probe/log" 2>&1; then
  DROP_INCLUDE_CASSERT=1
  echo "nvcc -Xcompiler -include,cassert fails here ($(grep -m1 error "$WORK/probe/log")): SpargeAttn builds without it"
fi
# SpargeAttn imports einops at run time: bring its wheel along with the built ones.
cp "$SRC"/wheels/einops-*.whl "$WHEELS"/ 2>/dev/null || echo "note: no einops wheel in $SRC/wheels"

trim_sources() {
  # Upstream's setup.py builds, even for TORCH_CUDA_ARCH_LIST=9.0, the sm80 and sm89 kernel families
  # (compiled for sm_90a) beside the sm90 one. On an H100/H200, SageAttention's sageattn and
  # SpargeAttn's spas_sage2_* dispatch to the sm90 kernels only; building just those keeps each build
  # well inside its time limit. Each edit must match exactly once, or the build stops with a reason.
  local tree=$1 name=$2
  "$PY" - "$tree" "$name" <<'EOF'
import pathlib, sys

tree, name = pathlib.Path(sys.argv[1]), sys.argv[2]

def edit(path, old, new):
    file = tree / path
    text = file.read_text()
    if text.count(old) != 1:
        sys.exit(f"FAIL: trimming {name}: expected one {old!r} in {path}, found {text.count(old)}")
    file.write_text(text.replace(old, new))

if name == "SageAttention":
    for cond in (
        "if HAS_SM80 or HAS_SM86 or HAS_SM89 or HAS_SM90 or HAS_SM100 or HAS_SM120 or HAS_SM121:",
        "if HAS_SM89 or HAS_SM90 or HAS_SM100 or HAS_SM120 or HAS_SM121:",
    ):
        edit("setup.py", cond, "if False:  # diffstack: sm90-only build")
else:
    edit(
        "setup.py",
        '''    "csrc/qattn/qk_int_sv_f16_cuda_sm80.cu",
    "csrc/qattn/qk_int_sv_f8_cuda_sm89.cu",
] + get_instantiations("csrc/qattn/instantiations_sm80") + get_instantiations("csrc/qattn/instantiations_sm89")''',
        "]  # diffstack: sm90-only build",
    )
    edit("setup.py", "SAGE2PP_ENABLED = True\n", "SAGE2PP_ENABLED = False  # diffstack: sm89 kernels not built\n")
    edit(
        "csrc/qattn/pybind.cpp",
        '  m.def("qk_int8_sv_f16_accum_f16_block_sparse_attn_inst_buf_with_pv_threshold"',
        '#ifndef HAS_SM90\n  m.def("qk_int8_sv_f16_accum_f16_block_sparse_attn_inst_buf_with_pv_threshold"',
    )
    edit("csrc/qattn/pybind.cpp", "#ifdef SAGE2PP_ENABLED", "#endif  // diffstack: sm90-only build\n#ifdef SAGE2PP_ENABLED")
print(f"{name}: trimmed to the sm90 kernels")
EOF
}

build_one() {
  # $1 = source folder name, $2 = MAX_JOBS; builds from a scratch copy so SRC stays pristine.
  local name=$1 jobs=$2 tree=$WORK/$1 log=$LOGS/$1.log
  rm -rf "$tree" && cp -r "$SRC/$name" "$tree" || return 90
  if [[ $KERNELS_FULL != 1 ]]; then
    trim_sources "$tree" "$name" || return 91
  fi
  if [[ $name == SpargeAttn && $DROP_INCLUDE_CASSERT == 1 ]]; then
    "$PY" - "$tree/setup.py" <<'DROP' || return 92
import pathlib, sys
setup = pathlib.Path(sys.argv[1])
text = setup.read_text()
flag = '"-Xcompiler", "-include,cassert",'
if text.count(flag) != 1:
    sys.exit(f"FAIL: expected one {flag} in {setup}")
setup.write_text(text.replace(flag, "# diffstack: -include,cassert dropped (see build_kernels.sh)"))
print("SpargeAttn: -Xcompiler -include,cassert dropped")
DROP
  fi
  local cmd=(timeout -k 15 "$TIMEOUT_S" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$jobs" EXT_PARALLEL=4
    "$PY" -m pip wheel --no-deps --no-build-isolation --no-index -v -w "$WHEELS" "$tree")
  echo "$name: ${cmd[*]}"
  [[ $DRY_RUN == 1 ]] && return 0
  local start=$SECONDS
  (cd "$tree" && "${cmd[@]}") >"$log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s$([[ $rc == 124 ]] && echo ' (timed out)')" | tee -a "$log"
  return $rc
}

echo "== building (timeout ${TIMEOUT_S} s each; logs in $LOGS)"
build_one SageAttention "$SAGE_JOBS" &
sage_pid=$!
build_one SpargeAttn "$SPARGE_JOBS" &
sparge_pid=$!
wait $sage_pid
sage_rc=$?
wait $sparge_pid
sparge_rc=$?

{
  echo "SageAttention $sage_rc"
  echo "SpargeAttn $sparge_rc"
} >"$LOGS/status.txt"
echo "== result"
for name in SageAttention SpargeAttn; do
  rc=$(awk -v n="$name" '$1 == n {print $2}' "$LOGS/status.txt")
  if [[ $rc == 0 ]]; then
    echo "$name: OK"
  else
    echo "$name: FAILED (exit $rc); last lines of $LOGS/$name.log:"
    tail -n 25 "$LOGS/$name.log" 2>/dev/null | sed 's/^/    /'
    grep -m 5 -E ' error|Error:|error:' "$LOGS/$name.log" 2>/dev/null | sed 's/^/    first error: /'
  fi
done
ls -la "$WHEELS"
[[ $DRY_RUN == 1 ]] && exit 0

# A first check that the wheels import and compute on this GPU (reported; the builds' status decides
# the exit code): install into a private folder, one call each against float32 SDPA.
SITE=$WORK/site
rm -rf "$SITE"
echo "== check (one GPU call of each wheel)"
if compgen -G "$WHEELS/*.whl" >/dev/null \
  && "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl >"$LOGS/check.log" 2>&1; then
  PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} timeout 120 "$PY" - >>"$LOGS/check.log" 2>&1 <<'CHECK'
import importlib.metadata as md, torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    raise SystemExit("no GPU: nothing to check")
# FLUX's joint attention at 1024² (4096 image + 512 text tokens, 24 heads of 128), bf16.
q, k, v = (torch.randn(1, 24, 4608, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())

def median_ms(fn):
    for _ in range(3):
        fn()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(); fn(); end.record(); end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[10]

print(f"sdpa (default backend): {median_ms(lambda: F.scaled_dot_product_attention(q, k, v)):.3f} ms")
calls = (
    ("sageattention", lambda m: m.sageattn(q, k, v, tensor_layout="HND")),
    ("spas_sage_attn", lambda m: m.spas_sage2_attn_meansim_topk_cuda(q, k, v, topk=0.5)),
)
for name, call in calls:
    try:
        module = __import__(name)
        out = call(module).float()
        error = ((out - ref).norm() / ref.norm()).item()
        print(f"{name} {md.version(name)} ({module.__file__}): relative error vs fp32 SDPA {error:.2e}, "
              f"{median_ms(lambda: call(module)):.3f} ms")
    except Exception as exc:
        print(f"{name}: FAILED {type(exc).__name__}: {exc}")
CHECK
fi
cat "$LOGS/check.log" 2>/dev/null
[[ $sage_rc == 0 && $sparge_rc == 0 ]]
