#!/usr/bin/env bash
# Ray Serve on the GPU machine, whose calls carry at most 64 MiB (the tree is 48 MB of it): ray 2.60.0
# (a 76 MiB wheel) travels as an xz tarball of the wheel's files without ray/jars (Java workers) and
# the dashboard's web build, split into numbered chunks, and with the 36 wheels of ray[serve]'s needs
# that the machine's image lacks, in four folders of at most 16 MB: .whl-ray/part1 .. part4, one
# carried by each call while the machine stays warm (a carried git-ignored folder stays there for
# the next call). Once every part is there, this joins the chunks, checks them and installs
# everything into TARGET (default /tmp/site, where bench/gpu.sh installs .whl/):
#
#   bash bench/join_wheels.sh [DIR=.whl-ray] [TARGET=/tmp/site] && export PYTHONPATH=/tmp/site:$PYTHONPATH
set -euo pipefail
DIR=${1:-.whl-ray}
TARGET=${2:-/tmp/site}
mkdir -p "$TARGET"
joined=$(mktemp)
chunks=$(find "$DIR" -name 'ray-2.60.0-serve.tar.xz.[0-9]*' | awk -F. '{print $NF "\t" $0}' | sort -n | cut -f2)
cat $chunks > "$joined"
sums=$(find "$DIR" -name 'ray-2.60.0-serve.tar.xz.sha256' | head -1)
{ [ -n "$sums" ] && echo "$(cat "$sums")  $joined" | sha256sum -c --quiet -; } || { echo "join_wheels: the parts in $DIR do not make ray's tarball (a part missing?)" >&2; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TARGET" "$DIR"/part*/*.whl
xz -d -T0 < "$joined" | tar -x -C "$TARGET"
rm -f "$joined"
PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}" python3 -c "import ray, ray.serve; print('join_wheels: ray', ray.__version__, 'with serve')"
