"""SageAttention offered to the host for every attention shape with a head dim it can serve."""

from __future__ import annotations

from diffstack import AttentionOffer, ModelInfo, OptionsError, hookimpl
from diffstack_sage.support import build, config_of, diffusers_backend, probe, supports


@hookimpl
def select_attention(model: ModelInfo) -> list[AttentionOffer]:
    try:
        backend = diffusers_backend(config_of(model))
    except OptionsError:
        backend = None  # the probe says what is wrong with the options
    return [
        AttentionOffer(
            name="sage",
            # Lossy (INT8 QK): on a measured tie the exact SDPA (priority 0) should win.
            priority=-10,
            description="SageAttention: INT8 Q·K, FP16/FP8 P·V; head dims up to 128 (padded to 64/96/128)",
            probe=probe,
            build=build,
            supports=supports,
            diffusers_backend=backend,
        )
    ]
