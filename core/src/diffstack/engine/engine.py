"""The engine: models by their resolved name, request validation, and batched generation.

Every spelling of a model (``m``, a symlink to ``m``) resolves to one key, the model's path inside the
models directory, and is loaded once under it; a model shipped inside the package
(``synthetic-shapes-flux``, the default's own name ``synthetic-shapes-64``) is its own key unless the
models directory has an entry of that name. Loaded models are capped (``engine.max_loaded_models``
and ``engine.max_models_bytes``): loading one more unloads the least recently used model that no
request holds; the default model is never unloaded. Loading and generating touch the device and belong
on one thread (:class:`diffstack.engine.worker.EngineWorker` owns it); resolving a name, finding a
loaded model and preparing a request are cheap and run on any thread without waiting for a load.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import replace
from pathlib import Path

import structlog
import torch
from PIL import Image as PILImage

from diffstack.config import Settings, cpu_threads
from diffstack.engine.loading import (
    DEFAULT_MODEL_DIR,
    DEFAULT_MODEL_NAME,
    MODEL_NAME,
    detect_family,
    embedded_model_names,
    embedded_model_path,
    model_key,
    resolve_model_path,
    without_dirs,
)
from diffstack.engine.loras import LORA_FOLDER, LoraCatalogue, LoraError
from diffstack.engine.model import LoadedModel, load_model
from diffstack.engine.requests import (
    GenerationJob,
    GenerationRequest,
    GenerationResult,
    LoraListing,
    ModelListing,
    ModelMemory,
)
from diffstack.engine.run import PendingBatch, launch_batch, run_batch
from diffstack.engine.validation import prepare_request
from diffstack.errors import DiffstackError, FieldViolation, InvalidRequest, ModelError, Overloaded
from diffstack.plugins import PluginHost, load_plugins
from diffstack.types import PluginRecord, StackReport

log = structlog.get_logger(__name__)


class Engine:
    """Serves generation for every model it can find.

    Build it with :meth:`start`, which loads the plugins, the default model and ``engine.preload``
    and composes their stacks before returning, so a server can report SERVING only once this is done.
    """

    def __init__(self, settings: Settings, host: PluginHost) -> None:
        self.settings = settings
        self.host = host
        torch.set_num_threads(cpu_threads(settings.engine))
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()  # least recently used first
        self._pins: dict[str, int] = {}
        self._memory: dict[str, ModelMemory] = {}
        self._lock = threading.Lock()
        """Guards the three tables above; held for lookups only, never while a model loads."""
        self._load_lock = threading.Lock()
        """Serialises loads; a request for a loaded model never takes it."""
        self.plugins_s = 0.0
        """Seconds loading the plugins took (their imports included), when :meth:`start` or the
        engine's worker loaded them."""

    @classmethod
    def start(cls, settings: Settings, host: PluginHost | None = None) -> Engine:
        started = time.perf_counter()
        engine = cls(settings, host if host is not None else load_plugins(settings.plugins))
        engine.plugins_s = time.perf_counter() - started if host is None else 0.0
        engine.model("")
        for name in settings.engine.preload:
            engine.model(name)
        return engine

    @property
    def plugins(self) -> tuple[PluginRecord, ...]:
        return self.host.records

    # -- names -------------------------------------------------------------------------------------

    @functools.cached_property
    def default_model_name(self) -> str:
        """The default model's key."""
        configured = self.settings.engine.default_model
        return self.resolve(configured) if configured else DEFAULT_MODEL_NAME

    def _default_key(self) -> str | None:
        """The default model's key, or None when the configured default does not resolve."""
        try:
            return self.default_model_name
        except InvalidRequest:
            return None

    def resolve(self, name: str) -> str:
        """The key of model ``name`` ("" for the default): its path inside the models directory.

        Cheap (a name check and a file-system lookup), so unknown names are refused at once on any
        thread. Raises InvalidRequest naming the field ``model``.
        """
        if not name:
            return self.default_model_name
        configured_default = bool(self.settings.engine.default_model)
        if name == DEFAULT_MODEL_NAME and not configured_default:
            return DEFAULT_MODEL_NAME
        models_dir = self.settings.engine.models_dir
        embedded = embedded_model_path(name)
        if embedded is not None and not self._in_models_dir(name):
            return DEFAULT_MODEL_NAME if embedded == DEFAULT_MODEL_DIR and not configured_default else name
        return model_key(resolve_model_path(name, models_dir), models_dir)

    def _in_models_dir(self, name: str) -> bool:
        """Whether the models directory has an entry ``name`` (which wins over an embedded model)."""
        models_dir = self.settings.engine.models_dir
        return models_dir is not None and os.path.lexists(models_dir / name)

    def _path_of(self, key: str) -> Path:
        if key == DEFAULT_MODEL_NAME and not self.settings.engine.default_model:
            return DEFAULT_MODEL_DIR
        embedded = embedded_model_path(key)
        if embedded is not None and not self._in_models_dir(key):
            return embedded
        models_dir = self.settings.engine.models_dir
        assert models_dir is not None, "a key other than an embedded model comes from the models dir"
        return models_dir.resolve() / key

    # -- loaded models -----------------------------------------------------------------------------

    def pin(self, key: str) -> LoadedModel | None:
        """The loaded model ``key``, held against unloading until :meth:`unpin`; None if not loaded."""
        with self._lock:
            model = self._models.get(key)
            if model is not None:
                self._models.move_to_end(key)
                self._pins[key] = self._pins.get(key, 0) + 1
            return model

    def unpin(self, model: LoadedModel) -> None:
        """Release a hold taken by :meth:`pin` or :meth:`load`."""
        with self._lock:
            left = self._pins.get(model.name, 0) - 1
            if left > 0:
                self._pins[model.name] = left
            else:
                self._pins.pop(model.name, None)

    def load(self, key: str) -> LoadedModel:
        """The model ``key``, loaded (and composed and warmed) if need be, pinned; call :meth:`unpin`.

        Loading touches the device: call it on the engine's device thread. Raises Overloaded when every
        loaded model is held by a request and there is no room for one more.
        """
        with self._load_lock:
            model = self.pin(key)
            if model is not None:
                return model
            is_default = key == self._default_key()
            self._make_room(key, models=self.settings.engine.max_loaded_models - 1, must_load=is_default)
            model = self._load(key)
            memory = _model_memory(model)
            with self._lock:
                self._models[key] = model
                self._memory[key] = memory
                self._pins[key] = self._pins.get(key, 0) + 1
            budget = self.settings.engine.max_models_bytes
            if budget is not None and not is_default:
                self._make_room(key, models=None, budget=budget, must_load=False)
            return model

    def _load(self, key: str) -> LoadedModel:
        path = self._path_of(key)
        try:
            model = load_model(key, path, self.host, self.settings)
        except ModelError as error:
            raise ModelError(f"model {key!r} cannot be loaded: {without_dirs(str(error), path)}") from error
        warming = time.perf_counter()
        self._warm_up(model)
        model.startup["warmup_s"] = time.perf_counter() - warming
        log.info("model_loaded", model=key, loaded=len(self._models) + 1, **_rounded(model.startup))
        return model

    def _make_room(self, key: str, *, models: int | None, budget: int | None = None, must_load: bool) -> None:
        """Unload least recently used models nobody holds until at most ``models`` others are loaded
        and all loaded models fit ``budget`` bytes. ``key`` itself and the default are never unloaded;
        when the rest cannot go, the load is refused (and ``key`` unloaded again if it just loaded)
        unless it ``must_load`` (the default model always loads)."""
        default = self._default_key()
        with self._lock:

            def over() -> bool:
                others = sum(1 for k in self._models if k != key)
                return (models is not None and others > models) or (
                    budget is not None and sum(m.total_bytes for m in self._memory.values()) > budget
                )

            dropped = 0
            for victim in [k for k in self._models if k not in (key, default) and not self._pins.get(k)]:
                if not over():
                    break
                self._drop(victim)
                dropped += 1
            full = over()
            if full and not must_load and key in self._models:
                self._pins.pop(key, None)
                self._drop(key)
                dropped += 1
        if dropped:
            _release_memory()
        if full and not must_load:
            why = (
                f"{self.settings.engine.max_models_bytes} bytes (engine.max_models_bytes)"
                if budget is not None
                else f"{self.settings.engine.max_loaded_models} models (engine.max_loaded_models)"
            )
            raise Overloaded(
                f"no room to load model {key!r}: the loaded models fill {why} and are in use; retry later"
            )

    def _drop(self, key: str) -> None:
        """Forget a loaded model (caller holds ``_lock``); its memory goes with the last reference."""
        del self._models[key]
        self._memory.pop(key, None)
        log.info("model_unloaded", model=key)

    def unload(self, key: str) -> bool:
        """Unload model ``key`` at an admin's request; False when it was not loaded. The default model
        stays (InvalidRequest), and a model that requests hold now is refused with Overloaded."""
        if key == self._default_key():
            raise InvalidRequest(FieldViolation("model", f"{key!r} is the default model; it stays loaded"))
        with self._lock:
            if key not in self._models:
                return False
            holds = self._pins.get(key, 0)
            if not holds:
                self._drop(key)
        if holds:
            raise Overloaded(f"model {key!r} is in use by {holds} request(s); retry when they finish")
        _release_memory()
        return True

    def free_memory(self) -> list[str]:
        """Unload every loaded model that no request holds except the default, and give the
        allocator's cached memory back; returns the unloaded models' keys."""
        default = self._default_key()
        with self._lock:
            idle = [k for k in self._models if k != default and not self._pins.get(k)]
            for key in idle:
                self._drop(key)
        _release_memory()
        return idle

    def model(self, name: str = "") -> LoadedModel:
        """The loaded model ``name`` ("" for the default), loading and composing it on first use
        (for single-threaded callers such as the CLI and tests; a server pins what it uses)."""
        return self._loaded(self.resolve(name))

    def _loaded(self, key: str) -> LoadedModel:
        model = self.load(key)
        self.unpin(model)
        return model

    def _warm_up(self, model: LoadedModel) -> None:
        """One short generation through the real pipeline call, as clients will make it.

        Wrappers that run on the compiled denoiser (DeepCache, the first-block cache) compile graphs
        of their own, and clients enable them per request; warming them here took 77 s of an H200's
        cold start (DeepCache on SD1.5), paid whether or not any client asks for one. So they are
        only listed in :attr:`LoadedModel.unwarmed_wrappers`: the server warms them after SERVING,
        between client batches (``diffstack_server.sizing.warm_wrapper``), and a request that uses
        one before then compiles it itself."""
        steps = self.settings.engine.warmup_steps
        if steps <= 0:
            return
        request = prepare_request(
            GenerationRequest("warm-up", steps=steps, seeds=(0,)), model, self.settings.limits
        )
        (result,) = run_batch(model, [GenerationJob(request)])
        if isinstance(result, DiffstackError):
            raise result
        compiled = model.denoiser_for(with_wrappers=False) is not model.denoiser_for(with_wrappers=True)
        model.unwarmed_wrappers = [
            name for name, offer in model.stack.wrappers.items() if offer.on_compiled and compiled
        ]
        log.info(
            "model warmed up",
            model=model.name,
            seconds=round(result.timings["total_s"], 2),
            wrappers_to_warm=model.unwarmed_wrappers,
        )

    def is_loaded(self, name: str = "") -> bool:
        """Whether ``name`` is in memory already (using it then neither loads nor composes)."""
        return self.resolve(name) in self._models

    def models(self) -> list[ModelListing]:
        """The default model, every loaded model and every entry of the models directory."""
        keys = {self.default_model_name, *self._models}
        keys.update(self.resolve(name) for name in embedded_model_names())
        models_dir = self.settings.engine.models_dir
        if models_dir is not None and models_dir.is_dir():
            for entry in models_dir.iterdir():
                if entry.name == LORA_FOLDER:
                    continue
                if MODEL_NAME.fullmatch(entry.name) and (entry.is_dir() or entry.suffix == ".safetensors"):
                    try:
                        keys.add(self.resolve(entry.name))
                    except InvalidRequest:
                        continue  # a link leading out of the models directory is no model of ours
        return [self._listing(key) for key in sorted(keys)]

    def _listing(self, key: str) -> ModelListing:
        loaded = self._models.get(key)
        family = ""
        if loaded is not None:
            family = loaded.info.family.value
        else:
            path = self._path_of(key)
            try:
                family = detect_family(path).value
            except DiffstackError as exc:
                family = f"unknown ({without_dirs(str(exc), path)})"
        card = loaded.card if loaded is not None else None
        return ModelListing(
            name=key,
            family=family,
            loaded=loaded is not None,
            default=key == self.default_model_name,
            weights=card.weights if card else "",
            description=card.description if card else "",
            memory=self._memory.get(key),
        )

    def loras(self) -> list[LoraListing]:
        """Every installed LoRA: what it is, and which loaded models take it (and why others do not)."""
        with self._lock:
            models = list(self._models.values())
        return [self._lora_listing(catalogue_name, models) for catalogue_name in self._lora_catalogue.names()]

    @functools.cached_property
    def _lora_catalogue(self) -> LoraCatalogue:
        return LoraCatalogue.for_models_dir(self.settings.engine.models_dir)

    def _lora_listing(self, name: str, models: list[LoadedModel]) -> LoraListing:
        try:
            lora = self._lora_catalogue.read(name)
        except (LoraError, InvalidRequest) as error:
            return LoraListing(name, 0, 0, (), "", (), (str(error),))
        compatible, problems = [], []
        for model in models:
            problem = (
                "takes no LoRAs (none fitted it at load)"
                if model.loras is None
                else model.loras.problem(lora)
            )
            if problem is None:
                compatible.append(model.name)
            else:
                problems.append(f"{model.name}: {problem}")
        return LoraListing(
            name,
            lora.size_bytes,
            lora.rank,
            lora.target_modules,
            lora.prefix,
            tuple(compatible),
            tuple(problems),
        )

    def report(self, model: str = "") -> StackReport:
        return self.model(model).report

    # -- requests ----------------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest, model: LoadedModel | None = None) -> GenerationRequest:
        """Validate ``request`` against the limits and its model; fill in defaults and seeds.

        A server passes the ``model`` it resolved and pinned; without it, the model is found by name
        (and loaded if need be). The prepared request names the model by its key.
        """
        if model is None:
            model = self.model(request.model)
        return replace(prepare_request(request, model, self.settings.limits), model=model.name)

    def batch_key(self, request: GenerationRequest) -> Hashable:
        """Prepared requests with equal keys can share one pipeline call: the same model, size,
        steps, sampler, schedule, wrappers with their options, kind (text, image or inpainting input,
        with its strength), and guidance, which for classifier-free guidance means only whether it
        runs (scale above 1): the scales themselves may differ per image (not under a plugin's
        sampler, whose step takes one scale). Prompts, negative prompts,
        seeds and image counts never split a batch."""
        wrappers = tuple(
            sorted(
                (name, tuple(sorted((key, _hashable(value)) for key, value in opts.items())))
                for name, opts in request.wrappers.items()
            )
        )
        with self._lock:
            model = self._models.get(request.model)
        # a plugin's sampler takes one guidance scale per call: its images batch by the exact scale
        per_image = (
            model is not None
            and model.adapter.guidance_per_image
            and request.sampler not in model.stack.samplers
        )
        return (
            request.model,
            request.width,
            request.height,
            request.steps,
            ("cfg", (request.guidance or 0) > 1) if per_image else request.guidance,
            request.sampler,
            request.schedule,
            wrappers,
            request.init_image is not None,
            request.mask is not None,
            request.strength if request.init_image is not None else None,
            request.loras,
        )

    def run(self, jobs: Sequence[GenerationJob]) -> list[GenerationResult | DiffstackError]:
        """Run prepared jobs that share one batch key as one pipeline call (blocking; the caller
        computed the key, so it is not computed again here)."""
        return run_batch(self._model_of(jobs), jobs)

    def launch(self, jobs: Sequence[GenerationJob]) -> PendingBatch:
        """As :meth:`run`, but return once the images' copy to the host is queued: collect them on
        any thread (:meth:`PendingBatch.collect`) while this thread launches the next batch."""
        return launch_batch(self._model_of(jobs), jobs)

    def _model_of(self, jobs: Sequence[GenerationJob]) -> LoadedModel:
        key = jobs[0].request.model
        with self._lock:
            model = self._models.get(key)
        return model if model is not None else self._loaded(key)

    def stats(self) -> dict[str, float]:
        """Counters from the stacks' components (the prompt cache, say), loaded models, GPU memory."""
        stats: dict[str, float] = {}
        with self._lock:
            models = list(self._models.values())
            stats["models_loaded"] = float(len(models))
            stats["models_bytes"] = float(sum(m.total_bytes for m in self._memory.values()))
        for model in models:
            for component in model.stack.encoder_chain:
                if hasattr(component, "stats"):
                    for key, value in component.stats().items():
                        stats[key] = stats.get(key, 0.0) + float(value)
        if torch.cuda.is_available():
            stats["gpu_memory_allocated_bytes"] = float(torch.cuda.memory_allocated())
            stats["gpu_memory_reserved_bytes"] = float(torch.cuda.memory_reserved())
        return stats


def _hashable(option: object) -> Hashable:
    """An option value as a batch key part: a picture (an image option) by its mode, size and pixels,
    so requests with equal pictures still share a pipeline call."""
    if isinstance(option, PILImage.Image):
        digest = hashlib.blake2b(option.tobytes(), digest_size=16).digest()
        return ("image", option.mode, option.size, digest)
    return option


def _rounded(seconds: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 2) for name, value in seconds.items()}


def _model_memory(model: LoadedModel) -> ModelMemory:
    """Bytes of the parameters and buffers of every module of the model's pipeline, by where they
    live (an offloaded component counts as host memory)."""
    seen: set[int] = set()
    device = host = 0
    for component in model.pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in (*component.parameters(), *component.buffers()):
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    size = tensor.numel() * tensor.element_size()
                    if tensor.device.type == "cpu":
                        host += size
                    else:
                        device += size
    return ModelMemory(device_bytes=device, host_bytes=host)


def _release_memory() -> None:
    """Give memory of unloaded models back (the CUDA caching allocator keeps it otherwise)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
