"""LoRAs per request: the catalogue in the models directory's ``loras/`` folder and one hot-swap slot
per model, so changing LoRAs between requests never recompiles a compiled (CUDA-graphed) denoiser.

A model loaded while a LoRA is installed gets a slot: diffusers' own LoRA loading puts one zero
adapter of rank ``engine.lora_rank`` on every attention projection (``to_q``, ``to_k``, ``to_v``,
``to_out.0``) after ``enable_lora_hotswap`` prepared it (scalings as tensors, ranks padded), before
the stack is composed and compiled. A request's LoRAs are then merged into that one adapter (their
low-rank factors side by side, each ``B`` scaled by its request scale and its own ``alpha / r``) and
hot-swapped in with ``load_lora_adapter(..., hotswap=True)``: an in-place copy into the same tensors,
which a compiled graph and its CUDA graphs keep reading. A request without LoRAs swaps zeros in.

Only safetensors are read (pickle can run code), only denoiser LoRAs in diffusers' formats (peft keys
as ``save_lora_weights`` writes them, or the older and Kohya forms diffusers converts), and only
LoRAs on the slot's modules. Names are one entry of the folder, checked like model names.
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import structlog
import torch

from diffstack.engine.loading import DEFAULT_MODEL_DIR, resolve_entry, without_dirs
from diffstack.engine.requests import LoraSpec
from diffstack.errors import FieldViolation, InvalidRequest, shown

log = structlog.get_logger(__name__)

LORA_FOLDER = "loras"
"""The folder of LoRA files inside the models directory (and beside the embedded default model)."""
SUFFIX = ".safetensors"
SLOT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""The modules a slot covers: every attention projection, what LoRA trainers target by default."""
ADAPTER = "diffstack"
MAX_SCALE = 4.0
"""The largest |scale| a request may give a LoRA (beyond ~2 pictures fall apart anyway)."""
METADATA_KEY = "lora_adapter_metadata"
"""Where diffusers' ``save_lora_weights`` keeps the adapter config (alpha, rslora) in the header."""


@dataclass(frozen=True)
class LoraModule:
    """One module a LoRA changes: its rank and the projection's input and output sizes."""

    rank: int
    in_features: int
    out_features: int


@dataclass(frozen=True)
class LoraFile:
    """What a LoRA file holds, read once per version of the file."""

    name: str
    size_bytes: int
    prefix: str
    """The denoiser component the weights are for (``unet``, ``transformer``)."""
    modules: Mapping[str, LoraModule]
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    """Per module ``(A, B)``, with ``B`` already scaled by the LoRA's own ``alpha / r``; empty in
    the catalogue's cache, which keeps only what a listing needs."""
    version: tuple[int, int] = (0, 0)
    """The file's size and modification time when it was read."""

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def target_modules(self) -> tuple[str, ...]:
        """The kinds of module it changes (``to_q``, ...), as peft names ``target_modules``."""
        return tuple(sorted({_kind(name) for name in self.modules}))


def _kind(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


class LoraError(ValueError):
    """A LoRA file that cannot be served; the message says why, in words an admin can act on."""


# -------------------------------------------------------------------------------------------------
# The catalogue
# -------------------------------------------------------------------------------------------------


class LoraCatalogue:
    """The LoRA files of ``folders`` (the first folder wins a name), read lazily and cached by the
    file's size and modification time, so a replaced file is read again."""

    def __init__(self, folders: Sequence[Path]) -> None:
        self.folders = tuple(folders)
        self._files: dict[Path, tuple[tuple[int, int], LoraFile]] = {}

    @classmethod
    def for_models_dir(cls, models_dir: Path | None) -> LoraCatalogue:
        """``<models_dir>/loras`` first, then the LoRAs trained for the embedded default model."""
        folders = [] if models_dir is None else [models_dir / LORA_FOLDER]
        return cls([*folders, DEFAULT_MODEL_DIR / LORA_FOLDER])

    def names(self) -> list[str]:
        found: set[str] = set()
        for folder in self.folders:
            if folder.is_dir():
                found.update(p.name.removesuffix(SUFFIX) for p in folder.iterdir() if p.name.endswith(SUFFIX))
        valid = []
        for name in sorted(found):
            try:
                self.path(name)
            except InvalidRequest:
                continue  # a hidden file or a link out of the folder is no LoRA of ours
            valid.append(name)
        return valid

    def path(self, name: str, field: str = "loras.name") -> Path:
        """The file of LoRA ``name``, contained in one of the folders; InvalidRequest on ``field``."""
        last: InvalidRequest | None = None
        for folder in self.folders:
            try:
                return resolve_entry(name, folder, field=field, what="LoRA", suffix=SUFFIX)
            except InvalidRequest as error:
                last = error
                if "unknown" not in str(error):
                    raise
        if last is None:
            raise InvalidRequest(FieldViolation(field, f"unknown LoRA {shown(name)}"))
        raise last

    def read(self, name: str, field: str = "loras.name") -> LoraFile:
        """What LoRA ``name`` is (modules, ranks), without its weights: cached per version of the
        file, so listing and validating many LoRAs holds no tensors. LoraError when it cannot serve."""
        path = self.path(name, field)
        stat = path.stat()
        cached = self._files.get(path)
        if cached is not None and cached[0] == (stat.st_size, stat.st_mtime_ns):
            return cached[1]
        lora = self.load(name, field)
        described = replace(lora, factors={})
        self._files[path] = (lora.version, described)
        return described

    def load(self, name: str, field: str = "loras.name") -> LoraFile:
        """LoRA ``name`` with its weights, read from the file now (slots keep their own bounded cache)."""
        return read_lora(name, self.path(name, field))


def read_lora(name: str, path: Path) -> LoraFile:
    """Read ``path`` (safetensors only) into per-module factors; LoraError says why it cannot serve."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.name.endswith(SUFFIX):
        raise LoraError(f"{path.name}: LoRAs are read from .safetensors files only")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(str(path))
    except Exception as exc:
        raise LoraError(
            f"{path.name} is not a readable safetensors file: {without_dirs(str(exc), path)}"
        ) from exc
    stat = path.stat()
    return replace(_factors(name, stat.st_size, state, metadata), version=(stat.st_size, stat.st_mtime_ns))


def _factors(name: str, size: int, state: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> LoraFile:
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_unet_state_dict_to_peft

    try:  # diffusers' own conversion of the older and Kohya key forms
        state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(state)
    except Exception as exc:
        raise LoraError(f"not a LoRA diffusers can read: {exc}") from exc
    prefixes = {key.split(".", 1)[0] for key in state}
    if len(prefixes) != 1 or not prefixes <= {"unet", "transformer"}:
        raise LoraError(
            f"holds weights for {sorted(prefixes)}: only denoiser LoRAs (unet or transformer) are served"
        )
    (prefix,) = prefixes
    state = {key.removeprefix(f"{prefix}."): value for key, value in state.items()}
    if not any("lora_A" in key for key in state):
        state = convert_unet_state_dict_to_peft(state)
    config = _adapter_config(metadata, prefix)
    modules: dict[str, LoraModule] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, down in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        up = state.get(f"{module}.lora_B.weight")
        if up is None or down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise LoraError(f"module {module} is not a linear LoRA pair (conv and bias LoRAs are not served)")
        rank = down.shape[0]
        alpha = _alpha(module, prefix, rank, config, alphas or {})
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        modules[module] = LoraModule(rank, down.shape[1], up.shape[0])
        factors[module] = (down.float(), up.float() * scaling)
    if not modules:
        raise LoraError("holds no LoRA weights (lora_A/lora_B pairs)")
    return LoraFile(name, size, prefix, modules, factors)


def _adapter_config(metadata: Mapping[str, str], prefix: str) -> dict[str, object]:
    """The adapter config diffusers stored in the header (keys under ``<prefix>.``), or {}."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except ValueError as exc:
        raise LoraError(f"its {METADATA_KEY} header is not JSON") from exc
    return {k.removeprefix(f"{prefix}."): v for k, v in packed.items()} if isinstance(packed, dict) else {}


def _alpha(
    module: str, prefix: str, rank: int, config: Mapping[str, object], alphas: Mapping[str, object]
) -> float:
    """The module's alpha: the stored pattern or config value, a Kohya network alpha, else its rank."""
    pattern = config.get("alpha_pattern")
    if isinstance(pattern, dict):
        for key, value in pattern.items():
            if module == key or module.endswith(f".{key}"):
                return float(value)
    for key in (f"{prefix}.{module}.alpha", f"{module}.alpha"):
        if key in alphas:
            return float(alphas[key])  # type: ignore[arg-type]
    value = config.get("lora_alpha")
    return float(value) if isinstance(value, int | float) else float(rank)


# -------------------------------------------------------------------------------------------------
# The slot on a model
# -------------------------------------------------------------------------------------------------


def slot_targets(denoiser: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """The modules a slot on ``denoiser`` covers, with their (input, output) sizes (a projection that
    carries adapters already counts by its base layer)."""
    found = {}
    for name, module in denoiser.named_modules():
        base = getattr(module, "base_layer", module)
        if isinstance(base, torch.nn.Linear) and _kind(name) in SLOT_TARGETS:
            found[name] = (base.in_features, base.out_features)
    return found


def misfit(lora: LoraFile, targets: Mapping[str, tuple[int, int]], rank: int) -> str | None:
    """Why ``lora`` cannot go into a slot of ``rank`` on ``targets``, or None when it fits."""
    outside = [m for m in lora.modules if m not in targets]
    if outside:
        return (
            f"changes {len(outside)} modules this model's slot does not cover (its attention projections "
            f"{', '.join(SLOT_TARGETS)}), e.g. {outside[0]}: made for another model, or beyond the slot"
        )
    for module, shape in lora.modules.items():
        if (shape.in_features, shape.out_features) != targets[module]:
            return (
                f"was made for another base model: its {module} is {shape.in_features}->{shape.out_features}"
            )
    if lora.rank > rank:
        return f"has rank {lora.rank}, above the slot's {rank} (set at load; at most engine.lora_rank)"
    return None


class LoraSlot:
    """One model's hot-swap slot: a fixed-rank adapter whose weights each request's LoRAs replace."""

    def __init__(self, denoiser: torch.nn.Module, rank: int, catalogue: LoraCatalogue, cache: int) -> None:
        self.denoiser = denoiser
        self.rank = rank
        self.catalogue = catalogue
        self._cache_size = cache
        self._cache: OrderedDict[
            str, tuple[tuple[int, int], dict[str, tuple[torch.Tensor, torch.Tensor]]]
        ] = OrderedDict()
        parameter = next(denoiser.parameters())
        self._device, self._dtype = parameter.device, parameter.dtype
        self.targets = slot_targets(denoiser)
        self.active: tuple[LoraSpec, ...] = ()
        self.eager_only = False
        """Set once the stack is known not to compile: then a request without LoRAs switches the
        adapter off instead of swapping zeros in (its matmuls cost an eager SD1.5 step 48% on an
        H200; a compiled stack keeps the zeros, since switching would change Dynamo's guards)."""
        denoiser.enable_lora_hotswap(target_rank=rank)  # type: ignore[operator]
        denoiser.load_lora_adapter(self._merged([]), prefix=None, adapter_name=ADAPTER)  # type: ignore[operator]

    @classmethod
    def prepare(
        cls, denoiser: torch.nn.Module, rank: int, catalogue: LoraCatalogue, cache: int
    ) -> LoraSlot | None:
        """A slot on ``denoiser`` when LoRAs are on (rank > 0) and an installed LoRA fits it, of the
        smaller of ``rank`` and the fitting LoRAs' ranks summed: a slot's zero adapter still costs its
        matmuls on every call, so a model pays only for what its installed LoRAs can use (none: no slot).
        """
        if rank <= 0:
            return None
        targets = slot_targets(denoiser)
        fitting = 0
        for name in catalogue.names():
            try:
                lora = catalogue.read(name)
            except (LoraError, InvalidRequest):
                continue
            if misfit(lora, targets, rank) is None:
                fitting += lora.rank
        return cls(denoiser, min(rank, fitting), catalogue, cache) if fitting else None

    def settle(self, compiled: bool) -> None:
        """Called once the stack is composed: an eager stack switches the (zero) adapter off until a
        request brings LoRAs (see :attr:`eager_only`)."""
        self.eager_only = not compiled
        if self.eager_only and not self.active:
            self.denoiser.disable_adapters()  # type: ignore[operator]

    def problem(self, lora: LoraFile) -> str | None:
        """Why ``lora`` cannot go into this slot, or None."""
        return misfit(lora, self.targets, self.rank)

    def violations(self, specs: Sequence[LoraSpec]) -> Iterator[FieldViolation]:
        """Every problem with a request's LoRAs for this model, each on its field."""
        ranks: dict[str, int] = {}
        for index, spec in enumerate(specs):
            field = f"loras[{index}].name"
            try:
                lora = self._file(spec.name, field)
            except InvalidRequest as error:
                yield from error.violations
                continue
            except LoraError as error:
                yield FieldViolation(field, f"LoRA {shown(spec.name)} cannot be used: {error}")
                continue
            problem = self.problem(lora)
            if problem is not None:
                yield FieldViolation(field, f"LoRA {shown(spec.name)} {problem}")
            for module, shape in lora.modules.items():
                ranks[module] = ranks.get(module, 0) + shape.rank
        if ranks and max(ranks.values()) > self.rank:
            yield FieldViolation(
                "loras",
                f"these LoRAs together need rank {max(ranks.values())} on one module; "
                f"the slot takes {self.rank} (set at load; at most engine.lora_rank)",
            )

    # -- swapping ------------------------------------------------------------------------------------

    def activate(self, specs: Sequence[LoraSpec]) -> float:
        """Swap ``specs`` in (zeros for none); the seconds it took, 0 when they are in already.
        Call it on the device thread, under the model's lock."""
        wanted = tuple(specs)
        if wanted == self.active:
            return 0.0
        started = time.perf_counter()
        if self.eager_only and not wanted:
            self.denoiser.disable_adapters()  # type: ignore[operator]
        else:
            loaded = [(self._device_factors(spec.name), spec.scale) for spec in wanted]
            self.denoiser.load_lora_adapter(  # type: ignore[operator]
                self._merged(loaded), prefix=None, adapter_name=ADAPTER, hotswap=True
            )
            if self.eager_only and not self.active:
                self.denoiser.enable_adapters()  # type: ignore[operator]
        self.active = wanted
        seconds = time.perf_counter() - started
        log.debug("loras_swapped", loras=[(s.name, s.scale) for s in wanted], seconds=round(seconds, 4))
        return seconds

    def _file(self, name: str, field: str = "loras.name") -> LoraFile:
        return self.catalogue.read(name, field)

    def _device_factors(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """LoRA ``name``'s factors on the model's device and dtype, from a bounded LRU cache."""
        version = self._file(name).version
        cached = self._cache.get(name)
        if cached is not None and cached[0] == version:
            self._cache.move_to_end(name)
            return cached[1]
        lora = self.catalogue.load(name)
        factors = {
            module: (a.to(self._device, self._dtype), b.to(self._device, self._dtype))
            for module, (a, b) in lora.factors.items()
        }
        self._cache[name] = (lora.version, factors)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return factors

    def _merged(
        self, loaded: Sequence[tuple[Mapping[str, tuple[torch.Tensor, torch.Tensor]], float]]
    ) -> dict[str, torch.Tensor]:
        """One adapter of the slot's rank: the LoRAs' factors side by side (a sum of their updates),
        each ``B`` times its request scale, zeros elsewhere; every slot module present."""
        state: dict[str, torch.Tensor] = {}
        for module, (fan_in, fan_out) in self.targets.items():
            down = torch.zeros(self.rank, fan_in, device=self._device, dtype=self._dtype)
            up = torch.zeros(fan_out, self.rank, device=self._device, dtype=self._dtype)
            start = 0
            for factors, scale in loaded:
                pair = factors.get(module)
                if pair is None:
                    continue
                a, b = pair
                down[start : start + a.shape[0]] = a
                up[:, start : start + a.shape[0]] = b * scale
                start += a.shape[0]
            state[f"{module}.lora_A.weight"] = down
            state[f"{module}.lora_B.weight"] = up
        return state
