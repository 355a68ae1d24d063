"""FLUX.1 step time on one GPU and split over the GPUs of one host (context parallelism), per rank.

Launched by the ``cp-flux`` stage (bench/multigpu.py) through torchrun, one process per GPU::

    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/cp_steps.py --out steps.json

Every rank builds the full-size FLUX.1 transformer with random weights and takes rank 0's weights
(a broadcast), so all ranks hold the same model. Then, on the same seeded inputs: one GPU eager (each
rank alone: the reference), and the ``diffstack-context-parallel`` plugin's own parallel denoiser for
each mode (Ulysses, ring), timed as the median of calls made by all ranks together. Rank 0 rewrites
``--out`` after every variant, so a run stopped at its time limit keeps what it measured. ``--smoke``
runs diffstack's tiny FLUX on the CPU over gloo (Ulysses only: ring needs a CUDA attention kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist

from bench.models import WORKLOADS, build_pipeline

WARMUP = 3
REPEATS = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--modes", default="ulysses,ring")
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    cuda = torch.cuda.is_available() and not args.smoke
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    results: dict[str, Any] = {"world": dist.get_world_size(), "device": device, "rows": []}

    def save() -> None:
        if rank == 0:
            args.out.write_text(json.dumps(results, indent=1) + "\n")

    started = time.perf_counter()
    transformer = build_pipeline("flux", device, args.smoke).transformer
    for tensor in [*transformer.parameters(), *transformer.buffers()]:
        dist.broadcast(tensor.data, src=0)  # the same weights on every rank
    results["build_s"] = round(time.perf_counter() - started, 1)
    inputs = flux_inputs(transformer, args.smoke)
    save()

    reference = call(transformer, inputs)
    ms = median_ms(transformer, inputs, cuda, together=False)
    results["rows"].append({"variant": "1 GPU eager", "ms": ms, "drift": 0.0})
    save()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not cuda:
        modes = [m for m in modes if m == "ulysses"]
        results["skipped"] = "ring: needs a CUDA attention kernel that returns its log-sum-exp"
    for mode in modes:
        from diffstack_context_parallel.parallel import parallel_denoiser

        built = parallel_denoiser(transformer, mode, compile_it=False)
        output = call(built.value, inputs)
        row = {
            "variant": f"{mode}-{dist.get_world_size()} eager",
            "ms": median_ms(built.value, inputs, cuda, together=True),
            "drift": relative_error(output, reference),
            "notes": "; ".join(built.notes),
        }
        row["speedup_vs_1gpu"] = ms / row["ms"]
        results["rows"].append(row)
        save()
        del built
    dist.barrier()
    dist.destroy_process_group()


def flux_inputs(transformer: torch.nn.Module, smoke: bool) -> dict[str, Any]:
    """FLUX.1's denoiser inputs at the workload's size, seeded: the same on every rank."""
    w = WORKLOADS["flux"].for_smoke() if smoke else WORKLOADS["flux"]
    config: Any = transformer.config
    param = next(transformer.parameters())
    tokens = (w.height // 16) * (w.width // 16)
    text = 512 if not smoke else 8
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(param.device, param.dtype)

    ids = torch.zeros(tokens, 3)
    side = w.width // 16
    ids[:, 1] = torch.arange(tokens) // side
    ids[:, 2] = torch.arange(tokens) % side
    inputs: dict[str, Any] = {
        "hidden_states": rand(w.batch, tokens, config.in_channels),
        "encoder_hidden_states": rand(w.batch, text, config.joint_attention_dim),
        "pooled_projections": rand(w.batch, config.pooled_projection_dim),
        "timestep": torch.full((w.batch,), 0.5, device=param.device, dtype=param.dtype),
        "img_ids": ids.to(param.device, param.dtype),
        "txt_ids": torch.zeros(text, 3, device=param.device, dtype=param.dtype),
    }
    if config.guidance_embeds:
        inputs["guidance"] = torch.full((w.batch,), 3.5, device=param.device, dtype=param.dtype)
    return inputs


def call(module: Any, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.inference_mode():
        return module(**inputs, return_dict=False)[0]


def median_ms(module: Any, inputs: dict[str, Any], cuda: bool, *, together: bool) -> float:
    """Median wall time of one call; ``together``: every rank calls at once (a barrier before each)."""
    times = []
    for i in range(WARMUP + REPEATS):
        if together:
            dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        call(module, inputs)
        if cuda:
            torch.cuda.synchronize()
        if i >= WARMUP:
            times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    from diffstack.timing import relative_error as error

    return float(error(output, reference))


if __name__ == "__main__":
    main()
