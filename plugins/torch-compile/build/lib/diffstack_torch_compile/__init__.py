"""torch.compile offered as a way to execute the denoiser; the host checks it against eager and times it."""

from __future__ import annotations

from diffstack import CompileOffer, ModelInfo, hookimpl
from diffstack_torch_compile.support import build, probe


@hookimpl
def compile_model(model: ModelInfo) -> list[CompileOffer]:
    return [
        CompileOffer(
            name="torch_compile",
            # Costs a compile (tens of seconds, cached on disk): on a measured tie eager (0) wins.
            priority=-10,
            description="torch.compile (inductor; CUDA graphs on CUDA), channels_last UNets, fused QKV",
            probe=probe,
            build=build,
        )
    ]
