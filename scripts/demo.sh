#!/usr/bin/env bash
# The main job, end to end: install, start `diffstack serve` on the embedded default model, wait
# until grpc.health reports SERVING, generate an image through the Python client into ./out/, print
# where it went with a readable stack summary, show `diffstack status`, and stop the server with SIGTERM
# (it drains and exits 0).
#   bash scripts/demo.sh ["a prompt"]
set -euo pipefail
cd "$(dirname "$0")/.."
default_prompt="a small red circle at the top left on a blue background"  # from the model's grammar (README)
prompt="${1:-$default_prompt}"

scripts/setup.sh
mkdir -p out
free_port() { .venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port="$(free_port)"
metrics_port="$(free_port)"

.venv/bin/diffstack serve --host 127.0.0.1 --port "$port" --metrics-port "$metrics_port" >out/server.log 2>&1 &
server=$!
stop_server() {
  if kill -0 "$server" 2>/dev/null; then
    kill -TERM "$server"
    wait "$server" || { echo "the server exited with status $?; see out/server.log" >&2; return 1; }
  fi
}
trap 'stop_server || true' EXIT
echo "server starting on 127.0.0.1:$port, metrics on http://127.0.0.1:$metrics_port/metrics (log: out/server.log)"

.venv/bin/python - "$port" "$prompt" <<'PY'
import sys

from diffstack.cli import stack_summary
from diffstack_client import DiffstackClient

port, prompt = sys.argv[1], sys.argv[2]
with DiffstackClient(f"127.0.0.1:{port}", timeout=300) as client:
    client.wait_until_serving(timeout=300)
    result = client.generate(prompt, seed=1)
    (path,) = result.save("out", stem="demo")
    print(f"model {result.model}: {result.images[0].width}x{result.images[0].height}, seed {result.images[0].seed}")
    print(f"stack: {stack_summary(result.stack)}")
    print(f"wrote {path.resolve()}")
PY

.venv/bin/diffstack status --target "127.0.0.1:$port"
trap - EXIT
stop_server
echo "server stopped cleanly"
