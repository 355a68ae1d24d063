"""stable-fast offered as a way to execute a UNet; the host checks it against eager and times it."""

from __future__ import annotations

from diffstack import CompileOffer, ModelInfo, hookimpl
from diffstack_stable_fast.support import build, probe


@hookimpl
def compile_model(model: ModelInfo) -> list[CompileOffer]:
    return [
        CompileOffer(
            name="stable_fast",
            # Upstream development is paused: on a measured tie, eager (0) and torch.compile (-10) win.
            priority=-20,
            description="stable-fast: TorchScript trace with fused kernels and CUDA graphs (UNets)",
            probe=probe,
            build=build,
        )
    ]
