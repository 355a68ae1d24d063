"""DeepCache (Ma et al., 2023) through diffusers' model hooks.

A UNet's skip connections are numbered in the order the down path produces them: 0 is the output of
``conv_in``, then one per down-block layer (resnet plus attention) and one per downsampler. For a
chosen ``branch``, a *full* step runs the whole UNet and remembers what every module deeper than
that skip connection returned. A *cached* step then runs only the shallow path: ``conv_in``, the
down path until skip connection ``branch`` is produced, and the up path from the resnet that
consumes it. Every deeper module (the rest of the down path, the mid block, the deep up blocks, and
the up layers before that resnet) returns what it returned on the last full step, so the resnet
sees the fresh shallow feature beside the cached deep one, exactly as in the paper's reference
implementation (``DeepCacheSDHelper``, whose ``cache_branch_id`` is this ``branch``).

Everything runs through diffusers' own ``HookRegistry``: the UNet's and its blocks' forward code is
untouched and nothing is copied from it. Whole blocks are hooked where a whole block is deep, single
layers only inside the one down block and the one up block that the branch cuts through.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from diffstack_deepcache.config import DeepCacheConfig

HOOK_NAME = "deepcache"
"""The name of our hooks in every registry they join (one per hooked module)."""


class StepSchedule:
    """Decides, once per UNet call, whether this step is full or cached (plain Python, per request)."""

    def __init__(self, config: DeepCacheConfig) -> None:
        self.interval = int(config.interval)
        self.start, self.end = config.window()
        self.calls = 0
        self.signature: tuple[Any, ...] | None = None

    def next_is_cached(self, sample: torch.Tensor) -> bool:
        signature = (sample.shape, sample.dtype, sample.device)
        step = self.calls
        self.calls += 1
        in_window = step >= self.start and (self.end is None or step < self.end)
        # A change of shape (another batch or size) makes the cached features useless: run in full.
        cached = in_window and (step - self.start) % self.interval != 0 and signature == self.signature
        if not cached:
            self.signature = signature
        return cached

    def reset(self) -> None:
        self.calls = 0
        self.signature = None


@dataclass
class SharedState:
    """What the skip hooks of one UNet share: this step's decision and the last full step's deep outputs."""

    skipping: bool = False
    outputs: dict[str, Any] = field(default_factory=dict)

    def reset(self) -> None:
        self.skipping = False
        self.outputs.clear()


class _StepHook(ModelHook):
    """On the UNet: decides, once per call, whether this step is full or cached."""

    _is_stateful = True

    def __init__(self, state: SharedState, config: DeepCacheConfig) -> None:
        super().__init__()
        self.state = state
        self.schedule = StepSchedule(config)

    def pre_forward(
        self, module: torch.nn.Module, *args: Any, **kwargs: Any
    ) -> tuple[tuple[Any], dict[str, Any]]:
        self.state.skipping = self.schedule.next_is_cached(args[0] if args else kwargs["sample"])
        return args, kwargs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.schedule.reset()
        self.state.reset()
        return module


class SkipHook(ModelHook):
    """On a deep module: runs it and remembers its output on full steps, replays it on cached ones."""

    def __init__(self, state: SharedState, key: str) -> None:
        super().__init__()
        self.state = state
        self.key = key

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.state.skipping:
            return self.state.outputs[self.key]
        output = self.fn_ref.original_forward(*args, **kwargs)  # type: ignore[misc]  # set on registration
        self.state.outputs[self.key] = output
        return output


def _layers(block: Any, name: str, indices: range) -> list[tuple[str, torch.nn.Module]]:
    """A block's resnets (and attentions, where it has them) at ``indices``."""
    layers: list[tuple[str, torch.nn.Module]] = []
    for i in indices:
        layers.append((f"{name}.resnets.{i}", block.resnets[i]))
        if getattr(block, "attentions", None) is not None:
            layers.append((f"{name}.attentions.{i}", block.attentions[i]))
    return layers


def deep_modules(unet: torch.nn.Module, branch: int) -> list[tuple[str, torch.nn.Module]]:
    """The modules that a cached step skips for ``branch``, with their names in ``unet``."""
    layout: Any = unet  # read duck-typed: diffusers' UNet2DConditionModel layout (SD1, SD2, SDXL)
    # Skip connection k > 0 is produced by producers[k - 1]: (down block, layer), where the layer
    # index len(resnets) stands for the block's downsampler.
    producers: list[tuple[int, int]] = []
    for i, block in enumerate(layout.down_blocks):
        producers += [(i, j) for j in range(len(block.resnets))]
        if block.downsamplers is not None:
            producers.append((i, len(block.resnets)))
    count = 1 + len(producers)
    if count != sum(len(block.resnets) for block in layout.up_blocks):
        raise TypeError(f"{type(unet).__name__} does not pair its down and up blocks the way DeepCache needs")
    if not 0 <= branch < count:
        raise ValueError(f"deepcache branch must be in [0, {count - 1}] for this UNet, got {branch}")

    deep: list[tuple[str, torch.nn.Module]] = []
    first_deep_block = 0
    if branch > 0:
        i, j = producers[branch - 1]
        block = layout.down_blocks[i]
        deep += _layers(block, f"down_blocks.{i}", range(j + 1, len(block.resnets)))
        if block.downsamplers is not None and j < len(block.resnets):
            deep.append((f"down_blocks.{i}.downsamplers", block.downsamplers))
        first_deep_block = i + 1
    deep += [
        (f"down_blocks.{i}", layout.down_blocks[i]) for i in range(first_deep_block, len(layout.down_blocks))
    ]
    if layout.mid_block is not None:
        deep.append(("mid_block", layout.mid_block))

    # The up path consumes skip connections last first: the resnet at flat position count - 1 - branch
    # takes skip connection ``branch``; everything before it in the up path is deep.
    position = count - 1 - branch
    for u, block in enumerate(layout.up_blocks):
        if position < len(block.resnets):
            return deep + _layers(block, f"up_blocks.{u}", range(position))
        deep.append((f"up_blocks.{u}", block))
        position -= len(block.resnets)
    raise AssertionError("unreachable: the branch was checked against the up path's length")


class DeepCacheHandle:
    """DeepCache on one UNet for one request: ``reset_state()`` per generation, ``remove()`` after."""

    def __init__(self, unet: torch.nn.Module, config: DeepCacheConfig) -> None:
        state = SharedState()
        self._step_hook = _StepHook(state, config)
        self._unet = unet
        self._hooked: list[tuple[torch.nn.Module, ModelHook]] = [(unet, self._step_hook)]
        self._hooked += [
            (module, SkipHook(state, name)) for name, module in deep_modules(unet, int(config.branch))
        ]
        if any(_registry(module).get_hook(HOOK_NAME) is not None for module, _ in self._hooked):
            raise RuntimeError("DeepCache is already attached to this UNet: remove() that handle first")
        for module, hook in self._hooked:
            _registry(module).register_hook(hook, HOOK_NAME)
        _registry(unet).invalidate_child_registries_cache()

    def reset_state(self) -> None:
        """Forget the cached features and the step count: the next call is a full step."""
        self._step_hook.reset_state(self._unet)

    def remove(self) -> None:
        """Detach every hook, restoring the UNet's own forward code (and dropping the cache)."""
        for module, _ in self._hooked:
            _registry(module).remove_hook(HOOK_NAME, recurse=False)
        _registry(self._unet).invalidate_child_registries_cache()
        self.reset_state()


def _registry(module: torch.nn.Module) -> HookRegistry:
    return HookRegistry.check_if_exists_or_initialize(module)


def apply_deep_cache(unet: torch.nn.Module, config: DeepCacheConfig) -> DeepCacheHandle:
    """Attach DeepCache to a diffusers UNet (``UNet2DConditionModel`` layout); returns the handle."""
    return DeepCacheHandle(unet, config)
