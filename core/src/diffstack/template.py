"""``diffstack plugin new NAME --hook HOOK``: a complete minimal plugin distribution for one hook.

Each hook's plugin below is small but real (it passes the host's checks on every tiny model that the
hook serves), and the plugin guides in ``docs/plugins/`` show exactly these sources (a test keeps
them equal). The written folder holds a pyproject with the entry point, a README, the plugin and a
test that runs it through the host with :func:`diffstack.testing.assert_offer_passes`.
"""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

NAME_RULE = re.compile(r"^[a-z][a-z0-9_]{1,39}$")
"""Plugin names: lower case letters, digits and ``_``, starting with a letter, 2-40 characters. The
name is the entry point's, the one allow/deny lists and ``[plugins.options.<name>]`` use."""

PLUGINS: dict[str, str] = {
    "select_attention": '''"""$name: attention as softmax(q k^T / sqrt(d)) v, written out in plain torch."""

from __future__ import annotations

from diffstack import AttentionFn, AttentionOffer, AttentionShape, Availability, ModelInfo, hookimpl


def _supports(shape: AttentionShape) -> Availability:
    if shape.head_dim > 256:
        return Availability.no(f"head dim {shape.head_dim} is above 256")
    return Availability.yes()


def _build(model: ModelInfo) -> AttentionFn:
    import torch  # heavy imports belong inside build, which runs only once the host considers the offer

    def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        scores = query @ key.transpose(-2, -1) * query.shape[-1] ** -0.5
        return scores.softmax(dim=-1) @ value

    return attention


@hookimpl
def select_attention(model: ModelInfo) -> list[AttentionOffer]:
    return [AttentionOffer(name="$name", priority=0, build=_build, supports=_supports)]
''',
    "build_sigmas": '''"""$name: sigmas spaced evenly in log space between the model's trained sigma range."""

from __future__ import annotations

from typing import Any

from diffstack import Family, ModelInfo, SigmasOffer, hookimpl


def _sigmas(steps: int, scheduler: Any) -> list[float]:
    import torch

    alphas = scheduler.alphas_cumprod.to(torch.float64)
    trained = ((1 - alphas) / alphas) ** 0.5
    log_sigmas = torch.linspace(float(trained.max().log()), float(trained.min().log()), steps)
    return [*log_sigmas.exp().tolist(), 0.0]  # steps + 1 values, strictly descending, ending in 0


@hookimpl
def build_sigmas(model: ModelInfo) -> list[SigmasOffer]:
    return [
        SigmasOffer(
            name="$name",
            priority=0,
            description="log-linear sigmas over the trained range",
            families=frozenset({Family.SD1, Family.SD2, Family.SDXL}),  # discrete-time models only
            build=_sigmas,
        )
    ]
''',
    "select_sampler": '''"""$name: Euler with ordinary classifier-free guidance, from both halves."""

from __future__ import annotations

from typing import Any

from diffstack import GuidanceRule, ModelInfo, SamplerOffer, SamplerStep, hookimpl


def _start() -> SamplerStep:
    def step(x: Any, sigma: float, sigma_next: float, eps_uncond: Any, eps_cond: Any, guidance: float) -> Any:
        guided = eps_uncond + guidance * (eps_cond - eps_uncond)  # the guided noise prediction
        return x + (sigma_next - sigma) * guided  # one Euler step of the probability-flow ODE

    return step  # a multistep sampler would keep its history in here, one trajectory per start()


@hookimpl
def select_sampler(model: ModelInfo) -> list[SamplerOffer]:
    return [SamplerOffer(name="$name", priority=0, guidance=GuidanceRule.CFG, start=_start)]
''',
    "encode_prompt": '''"""$name: counts prompt encodings, passing each to the pipeline's encoder."""

from __future__ import annotations

from diffstack import EncoderOffer, ModelInfo, PromptEmbeddings, PromptEncoder, PromptSpec, hookimpl


class CountingEncoder:
    """Calls ``inner`` and counts; ``stats()`` reaches GetStats and the logs."""

    def __init__(self, inner: PromptEncoder) -> None:
        self.inner = inner
        self.calls = 0

    def __call__(self, spec: PromptSpec) -> PromptEmbeddings:
        self.calls += 1
        return self.inner(spec)

    def stats(self) -> dict[str, float]:
        return {"${name}_calls": float(self.calls)}


def _wrap(inner: PromptEncoder, model: ModelInfo) -> PromptEncoder:
    return CountingEncoder(inner)


@hookimpl
def encode_prompt(model: ModelInfo) -> list[EncoderOffer]:
    return [EncoderOffer(name="$name", priority=0, wrap=_wrap)]
''',
    "wrap_denoiser": '''"""$name: counts the denoiser's calls in one generation (a forward hook)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffstack import DenoiserWrapper, DenoiserWrapperOffer, ModelInfo, hookimpl


class CallCounter:
    """Attached for one generation: ``reset_state`` forgets, ``remove`` leaves the denoiser as it was."""

    def __init__(self, denoiser: Any, options: Mapping[str, Any]) -> None:
        self.calls = 0
        self.every = int(options.get("every", 1))
        self._handle = denoiser.register_forward_hook(self._count)

    def _count(self, module: Any, args: Any, output: Any) -> None:
        self.calls += 1

    def reset_state(self) -> None:
        self.calls = 0

    def remove(self) -> None:
        self._handle.remove()


def _apply(denoiser: Any, options: Mapping[str, Any]) -> DenoiserWrapper:
    return CallCounter(denoiser, options)


@hookimpl
def wrap_denoiser(model: ModelInfo) -> list[DenoiserWrapperOffer]:
    return [DenoiserWrapperOffer(name="$name", priority=0, apply=_apply)]
''',
    "compile_model": '''"""$name: the denoiser in channels-last memory format (faster convolutions)."""

from __future__ import annotations

from typing import Any

from diffstack import Availability, CompileOffer, DenoiserKind, ModelInfo, hookimpl


def _probe(model: ModelInfo) -> Availability:
    if model.denoiser_kind is not DenoiserKind.UNET:
        return Availability.no("needs a UNet denoiser (channels-last helps convolutions only)")
    return Availability.yes()


def _build(denoiser: Any, model: ModelInfo) -> Any:
    import torch

    return denoiser.to(memory_format=torch.channels_last)


@hookimpl
def compile_model(model: ModelInfo) -> list[CompileOffer]:
    return [CompileOffer(name="$name", priority=0, probe=_probe, build=_build)]
''',
}
"""Each hook's minimal plugin, ``$name`` standing for the plugin's name."""

_PYPROJECT = """[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "diffstack-$dist"
version = "0.1.0"
description = "diffstack plugin $name ($hook)"
requires-python = ">=3.11"
dependencies = ["diffstack"]

[project.entry-points.diffstack]
$name = "diffstack_$name"

[tool.setuptools.packages.find]
where = ["src"]
"""

_README = """# diffstack-$dist

A diffstack plugin for the `$hook` hook. Install it into the environment diffstack runs in, then
check what the host made of it:

```bash
.venv/bin/python -m pip install -e plugins/$dist
.venv/bin/diffstack plugins --hook $hook     # loaded, or failed with why
.venv/bin/diffstack stack                     # the host's decision about its offer, with the reason
.venv/bin/python -m pytest plugins/$dist/tests
```
"""

_TEST = '''"""$name passes the host's checks on a tiny model, alone in the host."""

import diffstack_$name

from diffstack.testing import assert_offer_passes


def test_the_host_accepts_the_offer() -> None:
    assert assert_offer_passes(diffstack_$name, offer="$name")
'''


def check_name(name: str) -> None:
    """Raise ValueError unless ``name`` follows :data:`NAME_RULE`."""
    if not NAME_RULE.match(name):
        raise ValueError(
            f"plugin name {name!r}: use 2-40 lower case letters, digits and _, starting with a letter"
        )


def plugin_source(name: str, hook: str) -> str:
    """The plugin module for ``hook``, named ``name``."""
    return Template(PLUGINS[hook]).substitute(name=name)


def write_plugin(name: str, hook: str, folder: Path) -> Path:
    """Write the distribution ``diffstack-<name>`` into ``folder`` (which must not exist); ``folder``."""
    check_name(name)
    if folder.exists():
        raise FileExistsError(f"{folder} exists already")
    fields = {"name": name, "dist": name.replace("_", "-"), "hook": hook}
    files = {
        "pyproject.toml": Template(_PYPROJECT).substitute(fields),
        "README.md": Template(_README).substitute(fields),
        f"src/diffstack_{name}/__init__.py": plugin_source(name, hook),
        f"tests/test_{name}.py": Template(_TEST).substitute(fields),
    }
    for relative, text in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder
