#!/usr/bin/env bash
# Download, on a machine with network, the wheels the GPU machine lacks into .whl/ (git-excluded),
# for Python 3.12 on manylinux x86-64. bench/gpu.sh installs them there with --no-deps.
# torchao (the fp8 offer's only need) goes to .whl-fp8/: one call carries at most 64 MiB, and the tree
# (48 MB with the embedded models) plus .whl (17 MB) leave no room for it; a later call on the same
# warm machine carries .whl-fp8 with WHEELS=.whl-fp8 and adds it to the install.
# The GPU image already has torch 2.11, triton 3.6, transformers 5.17, protobuf 7.36, pillow, numpy,
# safetensors, huggingface-hub, pluggy and prometheus-client.
set -euo pipefail
cd "$(dirname "$0")/.."
for folder in /.whl/ /.whl-fp8/; do grep -qx "$folder" .git/info/exclude 2>/dev/null || echo "$folder" >> .git/info/exclude; done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  diffusers==0.42.1 importlib-metadata==10.2.0 zipp==4.1.2 lazy-importer==0.1.0 \
  structlog==26.1.0 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 \
  typing-inspection==0.4.5 annotated-types==0.8.0 python-dotenv==1.2.4 typing-extensions==4.16.0 \
  grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 grpcio-status==1.85.1 \
  googleapis-common-protos==1.76.0 sageattention==1.0.6
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .whl-fp8 torchao==0.18.0
