#!/usr/bin/env bash
# The benchmark on the GPU machine (no network): install the carried wheels (.whl/) and the repo's
# packages, print the card and versions, then run bench/run.py with the given arguments.
#
#   bash bench/gpu.sh --stages step-sd15,step-sdxl --budget-s 540      # results land in $OUT
#
# .whl/ holds what the machine lacks (diffusers, pydantic, structlog, grpcio 1.85.1, sageattention,
# ...; see BENCHMARKS.md); WHEELS names another folder. A call that carries none (one call carries at
# most 64 MiB) uses what an earlier call on the same warm machine installed in $SITE. The run stops itself after BENCH_TIMEOUT_S seconds (SIGINT: results so far
# are saved), inside the device tool's 600 s limit.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
OUT=${OUT:-$PWD/out}
SITE=${SITE:-/tmp/site}  # one per concurrent run (two GPUs: SITE=/tmp/site0 and /tmp/site1)
mkdir -p "$OUT"
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl || exit 1
elif [ -d "$SITE/diffusers" ]; then
  echo "no wheels in $WHEELS: using what $SITE already holds"
else
  echo "no wheels in $WHEELS and nothing installed in $SITE" >&2; exit 1
fi
SRC=$(python3 bench/install_repo.py "$SITE") || exit 1
export PYTHONPATH=$SITE:$SRC
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
python3 -c "import torch, diffusers, triton, grpc, pydantic, structlog, sageattention; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'triton', triton.__version__, 'grpc', grpc.__version__)" || exit 1
python3 -c "import torchao; print('torchao', torchao.__version__)" || echo "torchao missing: the fp8 offer will decline"
timeout -k 10 -s INT "${BENCH_TIMEOUT_S:-575}" python3 bench/run.py --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
