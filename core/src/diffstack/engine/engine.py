"""The engine: models by name, request validation, and batched generation through diffusers."""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from pathlib import Path

import structlog
import torch

from diffstack.config import Settings, cpu_threads
from diffstack.engine.loading import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME, detect_family, resolve_model_path
from diffstack.engine.model import LoadedModel, load_model
from diffstack.engine.requests import GenerationJob, GenerationRequest, GenerationResult, ModelListing
from diffstack.engine.run import run_batch
from diffstack.engine.validation import prepare_request
from diffstack.errors import DiffstackError
from diffstack.plugins import PluginHost, load_plugins
from diffstack.types import PluginRecord, StackReport

log = structlog.get_logger(__name__)


class Engine:
    """Serves generation for every model it can find; thread-safe.

    Build it with :meth:`start`, which loads the plugins and the default model and composes that
    model's stack before returning, so a server can report SERVING only once this is done.
    """

    def __init__(self, settings: Settings, host: PluginHost) -> None:
        self.settings = settings
        self.host = host
        torch.set_num_threads(cpu_threads(settings.engine))
        self._models: dict[str, LoadedModel] = {}
        self._loading = threading.Lock()

    @classmethod
    def start(cls, settings: Settings, host: PluginHost | None = None) -> Engine:
        engine = cls(settings, host if host is not None else load_plugins(settings.plugins))
        engine.model(settings.engine.default_model)
        return engine

    @property
    def plugins(self) -> tuple[PluginRecord, ...]:
        return self.host.records

    @property
    def default_model_name(self) -> str:
        return self.settings.engine.default_model or DEFAULT_MODEL_NAME

    def _path_of(self, name: str) -> Path:
        if name == DEFAULT_MODEL_NAME and not self.settings.engine.default_model:
            return DEFAULT_MODEL_DIR
        return resolve_model_path(name, self.settings.engine.models_dir)

    def model(self, name: str = "") -> LoadedModel:
        """The loaded model ``name`` ("" for the default), loading and composing it on first use."""
        name = name or self.default_model_name
        with self._loading:
            if name not in self._models:
                model = load_model(name, self._path_of(name), self.host, self.settings)
                self._warm_up(model)
                self._models[name] = model
            return self._models[name]

    def _warm_up(self, model: LoadedModel) -> None:
        """One short generation through the real pipeline call, as clients will make it."""
        steps = self.settings.engine.warmup_steps
        if steps <= 0:
            return
        request = prepare_request(
            GenerationRequest("warm-up", steps=steps, seeds=(0,)), model, self.settings.limits
        )
        (result,) = run_batch(model, [GenerationJob(request)])
        if isinstance(result, DiffstackError):
            raise result
        log.info("model warmed up", model=model.name, seconds=round(result.timings["total_s"], 2))

    def is_loaded(self, name: str = "") -> bool:
        """Whether ``name`` is in memory already (using it then neither loads nor composes)."""
        return (name or self.default_model_name) in self._models

    def models(self) -> list[ModelListing]:
        """The default model, every loaded model and every entry of the models directory."""
        names = {self.default_model_name, *self._models}
        models_dir = self.settings.engine.models_dir
        if models_dir is not None and models_dir.is_dir():
            names.update(p.name for p in models_dir.iterdir() if p.is_dir() or p.suffix == ".safetensors")
        return [self._listing(name) for name in sorted(names)]

    def _listing(self, name: str) -> ModelListing:
        loaded = self._models.get(name)
        family = ""
        if loaded is not None:
            family = loaded.info.family.value
        else:
            try:
                family = detect_family(self._path_of(name)).value
            except DiffstackError as exc:
                family = f"unknown ({exc})"
        card = loaded.card if loaded is not None else None
        return ModelListing(
            name=name,
            family=family,
            loaded=loaded is not None,
            default=name == self.default_model_name,
            weights=card.weights if card else "",
            description=card.description if card else "",
        )

    def report(self, model: str = "") -> StackReport:
        return self.model(model).report

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """Validate ``request`` against the limits and its model; fill in defaults and seeds."""
        return prepare_request(request, self.model(request.model), self.settings.limits)

    @staticmethod
    def batch_key(request: GenerationRequest) -> Hashable:
        """Prepared requests with equal keys can share one pipeline call."""
        wrappers = tuple(
            sorted((name, tuple(sorted(opts.items()))) for name, opts in request.wrappers.items())
        )
        return (
            request.model,
            request.width,
            request.height,
            request.steps,
            request.guidance,
            request.sampler,
            request.schedule,
            wrappers,
            request.init_image is not None,
            request.strength if request.init_image is not None else None,
        )

    def run(self, jobs: Sequence[GenerationJob]) -> list[GenerationResult | DiffstackError]:
        """Run prepared jobs with one batch key as one pipeline call (blocking)."""
        if len({self.batch_key(job.request) for job in jobs}) != 1:
            raise ValueError("engine.run takes jobs that share one batch key")
        return run_batch(self.model(jobs[0].request.model), jobs)

    def stats(self) -> dict[str, float]:
        """Counters from the stacks' components (the prompt cache, say) and GPU memory."""
        stats: dict[str, float] = {}
        for model in list(self._models.values()):
            for component in model.stack.encoder_chain:
                if hasattr(component, "stats"):
                    for key, value in component.stats().items():
                        stats[key] = stats.get(key, 0.0) + float(value)
        if torch.cuda.is_available():
            stats["gpu_memory_allocated_bytes"] = float(torch.cuda.memory_allocated())
            stats["gpu_memory_reserved_bytes"] = float(torch.cuda.memory_reserved())
        return stats
