"""torch.compile for a denoiser, with its compiled artifacts kept on disk across restarts.

Two caches, both under ``cache_dir``:

- ``inductor/``: inductor's own local caches (FX graphs, AOTAutograd, Triton kernels, autotuning),
  used for every compile in the process. On the same machine this is what makes a restart cheap.
- ``artifacts/<model>-<key>.bin``: PyTorch's portable "mega-cache" (``save_cache_artifacts``),
  one file per model, torch version, device and compile setting. It is loaded before compiling and
  rewritten whenever a call compiled something new (a new input shape), so it can be copied to a
  fresh machine or container whose inductor cache is empty.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils._pytree import tree_leaves, tree_map

from diffstack import Built, DenoiserKind, ModelInfo
from diffstack_torch_compile.config import CompileConfig


def compile_denoiser(
    denoiser: torch.nn.Module,
    model: ModelInfo,
    config: CompileConfig,
    quantize: Callable[[torch.nn.Module], str] | None = None,
) -> Built[torch.nn.Module]:
    """``torch.compile(denoiser)`` after layout and projection changes that keep eager results exact.

    The denoiser is changed in place (memory format, fused projections): both keep its numbers, so
    it stays a valid eager model if this offer loses. Compilation itself happens on the first call.
    ``quantize`` (the fp8 variant, on its own copy) changes the GEMMs after those changes and before
    the compile, and says what it did.
    """
    notes: list[str] = []
    if config.channels_last and model.denoiser_kind is DenoiserKind.UNET:
        denoiser.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs lack memory_format
        notes.append("channels_last")
    if config.fuse_qkv:
        notes.append(fuse_projections(denoiser, model.denoiser_kind))
    if quantize is not None:
        notes.append(quantize(denoiser))
    mode = config.resolved_mode(model.device)
    use_cache_dir(config.cache_path / "inductor")
    allow_recompiles(RECOMPILE_LIMIT)
    setting = f"{mode} fullgraph={config.fullgraph}: {'; '.join(notes)}"
    artifacts = ArtifactFile(config.cache_path / "artifacts", model, denoiser, setting)
    notes.append(artifacts.load())
    if quantize is not None and model.denoiser_kind is DenoiserKind.TRANSFORMER:
        notes.append(compile_regions(denoiser, config))
        _watch_calls(denoiser, artifacts, clone_outputs=False)
        object.__setattr__(denoiser, "diffstack_compile_seconds", None)
        return Built(denoiser, notes=tuple(notes))
    # dynamic=None honours the batch dimension marked dynamic by the normalizer and keeps every
    # other dimension static; False would specialise on each batch size.
    dynamic = None if config.dynamic_batch else False

    def compile_like(module: torch.nn.Module) -> torch.nn.Module:
        return cast(
            torch.nn.Module, torch.compile(module, mode=mode, fullgraph=config.fullgraph, dynamic=dynamic)
        )

    compiled = compile_like(denoiser)
    compiled.register_forward_pre_hook(_call_normalizer(denoiser, config.dynamic_batch), with_kwargs=True)
    _watch_calls(compiled, artifacts, clone_outputs=config.uses_cuda_graphs(model.device))
    # Set on the wrapper itself: OptimizedModule forwards plain setattr to the shared denoiser.
    object.__setattr__(compiled, "diffstack_compile_seconds", None)
    # Wrappers that run their own variant of the denoiser (DeepCache's cached step) compile it alike.
    object.__setattr__(compiled, "diffstack_compile_like", compile_like)
    return Built(compiled, notes=tuple(notes))


def compile_regions(denoiser: torch.nn.Module, config: CompileConfig) -> str:
    """Compile each repeated block (diffusers' ``_repeated_blocks``) in place, not the whole model.

    Identical blocks share one compiled graph, so FLUX's 57 blocks compile as two: this bounds the
    fp8 variant's compile (a whole-model fp8 compile of FLUX ran past 8 minutes on an H200). Mode
    ``default``: no CUDA graphs per block (FLUX is compute-bound; the graphs would cost memory).
    """
    names = set(getattr(denoiser, "_repeated_blocks", ()) or ())
    blocks = [m for m in denoiser.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(denoiser).__name__} names no repeated blocks to compile regionally")
    for block in blocks:
        block.compile(mode="default", fullgraph=config.fullgraph, dynamic=False)
    return f"regional compile: {len(blocks)} blocks of {len(names)} kinds (mode default)"


def compile_vae_decode(
    vae: torch.nn.Module, model: ModelInfo, config: CompileConfig
) -> Built[torch.nn.Module]:
    """``torch.compile`` of the VAE decode (channels_last; CUDA graphs where the mode records them).

    The batch dimension is marked dynamic from batch 2 up, so a batch the server forms records a new
    graph instead of compiling anew; every other dimension is fixed per image size.
    """
    from diffstack import VaeDecode

    notes: list[str] = []
    if config.channels_last:
        vae.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs lack memory_format
        notes.append("channels_last")
    mode = config.resolved_mode(model.device)
    use_cache_dir(config.cache_path / "inductor")
    allow_recompiles(RECOMPILE_LIMIT)
    artifacts = ArtifactFile(config.cache_path / "artifacts", model, vae, f"vae decode {mode}")
    notes.append(artifacts.load())
    compiled = cast(torch.nn.Module, torch.compile(VaeDecode(vae), mode=mode, fullgraph=config.fullgraph))

    def mark_batch(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if config.dynamic_batch and args and args[0].shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(args[0], 0)

    compiled.register_forward_pre_hook(mark_batch)
    _watch_calls(compiled, artifacts, clone_outputs=config.uses_cuda_graphs(model.device))
    object.__setattr__(compiled, "diffstack_compile_seconds", None)
    return Built(compiled, notes=(f"VAE decode, mode {mode}", *notes))


RECOMPILE_LIMIT = 64
"""Compiled entries allowed per Python frame. Every UNet in the process shares diffusers' forward
wrapper frame, and each model, input shape and DeepCache step kind (full, cached) is one entry on
it: torch's default of 8 would silently run the ninth eager."""


def allow_recompiles(limit: int) -> None:
    """Raise Dynamo's per-frame entry limit to at least ``limit`` (process-wide; never lowers it)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, limit)


def fuse_projections(denoiser: torch.nn.Module, kind: DenoiserKind) -> str:
    """Fuse Q/K/V (self-attention) and K/V (cross-attention) projections into single matmuls.

    Transformers (FLUX) fuse without touching their attention backend. A UNet's
    ``fuse_qkv_projections`` replaces every attention processor with diffusers' fused SDPA one, so it
    runs only while the UNet still has diffusers' own SDPA processors: it never undoes a kernel the
    host installed. A denoiser carrying LoRA adapters (the engine's hot-swap slot) is not fused.
    """
    fuse: Callable[[], None] | None = getattr(denoiser, "fuse_qkv_projections", None)
    if getattr(denoiser, "peft_config", None):
        # Fused modules are read from the base weights: the LoRA slot on to_q/to_k/to_v would be bypassed.
        return "no fused QKV (LoRA adapters sit on the projections)"
    if fuse is None:
        return f"no fused QKV ({type(denoiser).__name__} cannot fuse projections)"
    if kind is DenoiserKind.UNET:
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0

        processors = cast("dict[str, object]", denoiser.attn_processors).values()
        if all(getattr(p, "handles_fused_projections", False) for p in processors):
            # The host's processors read fused weights themselves: fuse the modules, keep them.
            for module in denoiser.modules():
                if isinstance(module, Attention):
                    module.fuse_projections(fuse=True)
            return "fused QKV projections (host attention processors kept)"
        kept = {type(p).__name__ for p in processors if type(p) is not AttnProcessor2_0}
        if kept:
            return f"no fused QKV (it would replace the installed {', '.join(sorted(kept))})"
    fuse()
    return "fused QKV projections"


def use_cache_dir(path: Path) -> None:
    """Point inductor's local caches at ``path`` (process-wide; content-addressed, so safe to share)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") != str(path):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
        from torch._inductor.utils import clear_caches

        clear_caches()  # forget paths memoised under the previous directory, as torch's own switch does


class ArtifactFile:
    """One model's portable compiled artifacts (torch's mega-cache) in one file."""

    def __init__(self, folder: Path, model: ModelInfo, denoiser: torch.nn.Module, setting: str) -> None:
        identity = {
            "model": model.name,
            "class": type(denoiser).__qualname__,
            # Private keys (``_use_default_values``, ``_name_or_path``) vary between identical models.
            "config": {k: v for k, v in getattr(denoiser, "config", {}).items() if not k.startswith("_")},
            "dtype": str(model.dtype),
            "device": torch.cuda.get_device_name(model.device) if model.is_cuda else model.device,
            "torch": torch.__version__,
            "setting": setting,
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model.name).strip("-")[:48] or "model"
        self.path = folder / f"{slug}-{digest}.bin"

    def load(self) -> str:
        """Hot-load earlier artifacts into inductor's caches; a note says what happened."""
        if not self.path.exists():
            return f"no compiled artifacts yet at {self.path}"
        try:
            info = torch.compiler.load_cache_artifacts(self.path.read_bytes())
        except Exception as exc:  # a truncated or foreign file must not stop the compile
            return f"ignored unreadable artifacts {self.path}: {exc}"
        count = sum(len(keys) for keys in info.artifacts.values()) if info else 0
        return f"loaded {count} compiled artifacts from {self.path}"

    def save(self) -> None:
        """Write every artifact this process compiled or loaded, atomically."""
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(saved[0])
        partial.replace(self.path)


def _call_normalizer(
    denoiser: torch.nn.Module, dynamic_batch: bool = False
) -> Callable[..., tuple[tuple[()], dict[str, Any]]]:
    """One call form for every caller, so one compiled graph serves them all.

    Dynamo guards on how a function is called: positional or keyword arguments, which keywords, the
    timestep's dtype. Pipelines call ``unet(latents, t, encoder_hidden_states=..., timestep_cond=None)``
    with ``t`` an int or float tensor depending on the sampler, while the host's check calls by
    keyword. Without this, each form compiles anew (tens of seconds on the first request).
    """
    parameters = list(inspect.signature(denoiser.forward).parameters)

    def normalize(
        module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[()], dict[str, Any]]:
        named = {**dict(zip(parameters, args, strict=False)), **kwargs}
        named = {key: value for key, value in named.items() if value is not None}
        timestep, sample = named.get("timestep"), named.get("sample")
        if sample is not None and (not isinstance(timestep, torch.Tensor) or timestep.ndim == 0):
            named["timestep"] = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device)
        if dynamic_batch:
            _mark_batch_dynamic(named)
        return (), named

    return normalize


def _mark_batch_dynamic(named: dict[str, Any]) -> None:
    """Mark the batch dimension dynamic, so one graph serves every batch the server's batcher forms.

    With CUDA graphs each new batch size still records a graph, in milliseconds, instead of
    compiling for tens of seconds while a client waits. Batch 1 stays static (Dynamo specialises it).
    """
    first = named.get("sample", named.get("hidden_states"))
    if not isinstance(first, torch.Tensor) or first.shape[0] < 2:
        return
    for value in tree_leaves(named):
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == first.shape[0]:
            torch._dynamo.maybe_mark_dynamic(value, 0)


def _watch_calls(compiled: torch.nn.Module, artifacts: ArtifactFile, clone_outputs: bool) -> None:
    """Hooks on the compiled module: time first calls, save new artifacts, detach CUDA-graph outputs.

    A call with input shapes not seen before may compile; its wall time is recorded as
    ``diffstack_compile_seconds`` (the first one) and, if Dynamo compiled a graph since the last
    write, the artifact file is rewritten (with a dynamic batch dimension, a new batch size records
    CUDA graphs but compiles nothing: writing the whole cache again would only cost time). With CUDA
    graphs the outputs live in the graph's memory pool and are overwritten by the next replay;
    cloning them (a latent-sized copy) lets callers keep outputs like any module's.
    """
    seen: set[tuple[Any, ...]] = set()
    started: dict[str, float] = {}
    saved_after = [-1]
    """Dynamo's count of graphs compiled in this process when the artifacts were last written: a
    new shape that compiled nothing (another batch size of a dynamic graph) does not rewrite them."""

    def signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        leaves = tree_leaves((args, kwargs))
        return tuple((tuple(t.shape), t.dtype) for t in leaves if isinstance(t, torch.Tensor))

    def before(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        started["at"] = time.perf_counter()

    def after(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        key = signature(args, kwargs)
        if key not in seen:
            seen.add(key)
            if module.diffstack_compile_seconds is None:
                object.__setattr__(module, "diffstack_compile_seconds", time.perf_counter() - started["at"])
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            if graphs != saved_after[0]:
                saved_after[0] = graphs
                artifacts.save()
        if clone_outputs:
            return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, output)
        return None

    compiled.register_forward_pre_hook(before, with_kwargs=True)
    compiled.register_forward_hook(after, with_kwargs=True)
