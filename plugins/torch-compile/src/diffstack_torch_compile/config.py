"""The options of ``[plugins.options.torch_compile]``, checked before anything compiles."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

Mode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
MODES: tuple[str, ...] = get_args(Mode)
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
DEFAULT_CACHE_DIR = "~/.cache/diffstack/compile"


@dataclass(frozen=True)
class CompileConfig:
    """How to compile. ``mode=None``: ``reduce-overhead`` (CUDA graphs) on CUDA, ``default`` elsewhere."""

    mode: Mode | None = None
    """A ``torch.compile`` mode; the max-autotune ones also need ``allow_max_autotune``."""
    fullgraph: bool = False
    """Fail instead of graph-breaking; kernels that Dynamo cannot trace (SpargeAttn) then fail the offer."""
    dynamic_batch: bool = True
    """Compile the batch dimension as dynamic: one compile serves every batch size (CUDA graphs are
    still recorded per size). Off: each new batch size compiles anew."""
    channels_last: bool = True
    """UNets only: convolutions in NHWC, the layout tensor cores prefer."""
    fuse_qkv: bool = True
    """Fuse the Q/K/V projections into one matmul where that keeps the host's attention kernels."""
    cache_dir: str = DEFAULT_CACHE_DIR
    """Inductor's cache and the portable artifact files; survives restarts (``/tmp`` may not)."""
    allow_max_autotune: bool = False
    """max-autotune compiled the SD1.5 UNet for more than 8 minutes on an H100: opt in explicitly."""
    fp8: bool = False
    """Offer the fp8-GEMM variant (``torch_compile_fp8``) where the GPU and torchao allow it; the host
    accepts it only within ``compose.lossy_tolerance`` of eager. Opt-in: on an H200 (2026-12-01) a
    server start with it offered on SD1.5 was still compiling the fp8 UNet after 6 minutes, and its
    compile time has not been measured and bounded yet."""
    fp8_min_features: int = 1024
    """Linear layers with fewer input or output features stay in 16-bit (fp8 would not pay for the
    activation scaling)."""
    compile_vae: bool = True
    """Offer ``torch_compile_vae``: the VAE decode compiled, in the host's ``compile_vae`` slot."""
    allow_cpu: bool = False
    """Compile on the CPU too. Off by default: inductor's C++ build costs a minute or more at every
    cold start there, and the engine's CPU use (tests, the tiny default model) is not launch-bound."""

    def resolved_mode(self, device: str) -> str:
        return self.mode or ("reduce-overhead" if device.startswith("cuda") else "default")

    def uses_cuda_graphs(self, device: str) -> bool:
        return device.startswith("cuda") and self.resolved_mode(device) in CUDAGRAPH_MODES

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser()
