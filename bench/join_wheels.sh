#!/usr/bin/env bash
# Ray Serve on the GPU machine, whose calls carry at most 64 MiB: ray 2.60.0 (a 76 MiB wheel) travels
# as an xz tarball of the wheel's files without ray/jars (Java workers) and the dashboard's web build
# (29 MiB), split in two: .whl-ray/part1/ (19 MiB, carried by one call) and .whl-ray/part2/ (the
# rest, with the 36 wheels of ray[serve]'s needs that the machine's image lacks, carried by the next
# call while the machine is still warm). This joins the parts, checks them and installs everything
# into TARGET (default /tmp/site, where bench/gpu.sh installs .whl/):
#
#   bash bench/join_wheels.sh [DIR=.whl-ray] [TARGET=/tmp/site] && export PYTHONPATH=/tmp/site:$PYTHONPATH
set -euo pipefail
DIR=${1:-.whl-ray}
TARGET=${2:-/tmp/site}
mkdir -p "$TARGET"
joined=$(mktemp)
cat "$DIR"/part1/ray-2.60.0-serve.tar.xz.* "$DIR"/part2/ray-2.60.0-serve.tar.xz.[0-9]* > "$joined"
echo "$(cat "$DIR"/part2/ray-2.60.0-serve.tar.xz.sha256)  $joined" | sha256sum -c --quiet - || { echo "join_wheels: the parts do not make ray's tarball (a part missing?)" >&2; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TARGET" "$DIR"/part2/*.whl
xz -d -T0 < "$joined" | tar -x -C "$TARGET"
rm -f "$joined"
PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}" python3 -c "import ray, ray.serve; print('join_wheels: ray', ray.__version__, 'with serve')"
