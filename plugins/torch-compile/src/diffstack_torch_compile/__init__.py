"""torch.compile offered as a way to execute the denoiser and the VAE decode, plus an fp8-GEMM variant
of the denoiser's; the host checks each against eager and times it."""

from __future__ import annotations

from diffstack import CompileOffer, CompileTarget, ModelInfo, hookimpl
from diffstack_torch_compile.support import build, build_fp8, build_vae, probe, probe_fp8, probe_vae


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
        ),
        CompileOffer(
            name="torch_compile_fp8",
            # Lossy and a second compile: on a measured tie the exact offers win.
            priority=-20,
            description="torch_compile with torchao fp8 GEMMs (dynamic activation x weight scales), "
            "on its own copy of the denoiser; transformers compile per repeated block",
            probe=probe_fp8,
            build=build_fp8,
            lossy=True,
        ),
        CompileOffer(
            name="torch_compile_vae",
            priority=-10,
            description="torch.compile of the VAE decode (channels_last; CUDA graphs on CUDA)",
            probe=probe_vae,
            build=build_vae,
            target=CompileTarget.VAE_DECODE,
        ),
    ]
