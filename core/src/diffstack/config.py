"""One typed settings object, read from a TOML file, the environment and flags (in rising order).

Environment variables are ``DIFFSTACK_<SECTION>__<FIELD>``, e.g. ``DIFFSTACK_SERVER__PORT=50051`` or
``DIFFSTACK_PLUGINS__DENY='["sage"]'``. The CLI passes flags as overrides.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from diffstack.profiles import Profile, all_profiles


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineSettings(_Section):
    """Where models come from and where they run."""

    models_dir: Path | None = None
    """Client-given model names resolve inside this folder only."""
    default_model: str = ""
    """A name inside ``models_dir``, or empty for the embedded default model."""
    device: str = "auto"
    """``auto`` takes CUDA when present, else the CPU."""
    profile: str = ""
    """The named profile (:mod:`diffstack.profiles`) whose defaults the command's requests start from;
    empty for none."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """``auto`` is float16 on CUDA (bfloat16 for FLUX) and float32 on the CPU."""
    threads: int = Field(default=0, ge=0)
    """CPU threads torch may use for its operators; 0 takes half the CPUs this process may run on (at
    least one). torch's own default, every core, made a 20-step CPU image 4-75x slower than one thread
    while another process kept the cores busy; on a GPU it matters little."""
    warmup_steps: int = 2
    """Steps of one real generation run when a model is loaded, so the first client does not pay for
    CUDA-graph recording and lazy initialisation (0 turns it off). Only the plain stack: wrappers
    that run on the compiled denoiser (DeepCache) are listed for the server to warm after SERVING."""
    preload: list[str] = Field(default_factory=list)
    """Models (names inside ``models_dir``) loaded at start, besides the default, so they serve from
    the first request without ``load_on_request``."""
    load_on_request: bool = False
    """Whether a client's request for a model that is not loaded loads it. Off by default: a load takes
    the device thread for seconds to minutes and gigabytes of GPU memory, which no anonymous client
    should be able to spend; the admin lists models in ``preload`` or turns this on."""
    max_loaded_models: int = Field(default=2, ge=1)
    """At most this many models stay loaded; loading one more unloads the least recently used one that
    no request holds (the default model is never unloaded)."""
    max_models_bytes: int | None = Field(default=None, ge=0)
    """If set, the loaded models' parameters and buffers stay within this many bytes the same way."""
    lora_rank: int = Field(default=32, ge=0, le=1024)
    """The largest hot-swap slot: the combined rank one request's LoRAs may have. A model loaded while
    ``loras/`` holds a LoRA that fits it gets a slot on its attention projections of this rank, or of
    the fitting LoRAs' ranks summed if that is less, so a LoRA change is a weight copy, never a
    recompile; 0 turns LoRAs off. A zero slot still costs its low-rank matmuls on every call."""
    lora_cache: int = Field(default=8, ge=1)
    """LoRA files kept in memory per model, least recently used dropped first."""


def cpu_threads(settings: EngineSettings) -> int:
    """The thread count ``settings.threads`` means (0: half the usable CPUs, at least one)."""
    if settings.threads:
        return settings.threads
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, usable // 2)


class PluginSettings(_Section):
    """Which plugins load, and each plugin's own options (``[plugins.options.<name>]``)."""

    autoload: bool = True
    """Discover plugins through the ``diffstack`` entry-point group."""
    allow: list[str] | None = None
    """If set, only these plugin names load."""
    deny: list[str] = Field(default_factory=list)
    """These plugin names never load."""
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    import_timeout_s: float | None = Field(default=60.0, gt=0)
    """Longest a plugin's import (or one call of its hook) may take before it is recorded as
    "timed out" and skipped; ``None`` waits forever. The stuck import is abandoned, not stopped:
    Python cannot stop a thread."""


class ComposeSettings(_Section):
    """How the host checks and measures offers."""

    measure: Literal["auto", "always", "never"] = "auto"
    """``auto`` times offers on CUDA only; on a CPU the report then says timing was skipped."""
    attention_tolerance: float = 0.05
    """Largest accepted relative error of an attention kernel against SDPA in float32."""
    compile_tolerance: float = 0.02
    """Largest accepted relative error of a compiled denoiser against eager execution."""
    compile_tolerance_bf16: float = 0.1
    """The same for bfloat16 models: on the H100 a by-hand torch.compile of FLUX drifts 7.5e-2 from
    eager in bf16 (fused kernels round differently), with fp16 models under 2e-3 (BENCHMARKS.md)."""
    lossy_tolerance: float = 0.15
    """Largest accepted relative error of a ``lossy`` compile offer (fp8 GEMMs) against eager: fp8's
    3-bit mantissa drifts 5-10% on a whole random-weight denoiser; the report carries the drift, and
    quality on trained weights is measured with ``diffstack quality``. Deny the offer to serve exact."""
    tie_fraction: float = 0.03
    """Offers within this fraction of the fastest time count as tied; priority decides."""
    repeats: int = 10
    """Timed repetitions per candidate (median taken) after warm-up."""
    batch: int = 2
    """Batch size of the measured denoiser calls (2 = one image with classifier-free guidance)."""
    probe_timeout_s: float | None = Field(default=30.0, gt=0)
    """Longest an offer's probe (or ``supports``) may take before the offer is recorded as "timed
    out"; ``None`` waits forever."""
    decisions_dir: Path | None = Path("~/.cache/diffstack/decisions")
    """Where measured decisions are kept (beside torch-compile's default cache), so a restart rebuilds
    the chosen stack without measuring (:mod:`diffstack.decisions`); ``None`` keeps none."""
    build_timeout_s: float | None = Field(default=600.0, gt=0)
    """Longest an offer's build and numeric check may take (compile offers: the build only, since
    their first call records CUDA graphs that must stay on the engine's thread)."""


CPU_MAX_COST = 20 * 1024 * 1024
"""One 1024x1024 image at 20 steps (or four 512x512 ones): under a minute for the embedded model on
a 2-core CPU, where the old bounds let one request (8 images, 1024², 150 steps) hold it ~50 minutes."""
CUDA_MAX_COST = 4 * 50 * 1024 * 1024
"""Four 1024x1024 images at 50 steps: ~40 s of FLUX.1 on an H100 (184 ms a step), a few s of SDXL."""
_IMAGE_FORMAT_SLACK = 1.5
"""An encoded picture of a real scene is smaller than its raw RGB. The worst cases, measured with
Pillow on 1024x1024 noise: PNG and lossless WebP raw + 0.2%, JPEG quality 100 without chroma
subsampling 1.37x raw. Half again over raw covers every image a client can legitimately send."""
_OTHER_FIELDS_BYTES = 64 * 1024
"""Room for every other field of a request or response (names, options, seeds, the stack, timings)."""


class Limits(_Section):
    """What one request may ask for."""

    max_prompt_tokens: int = 77
    max_prompt_chars: int = 2000
    """Checked before tokenizing (a 60 MB prompt took 58 s and 9 GB to tokenize): 77 CLIP tokens of
    long words and punctuation stay far below it."""
    max_prompt_bytes: int = 4000
    """UTF-8 bytes of one prompt, checked after the characters: 2000 ASCII characters fit, and so do
    1000 four-byte ones (emoji), far beyond 77 tokens either way."""
    max_pixels: int = 1024 * 1024
    max_steps: int = 150
    max_images: int = 8
    max_loras: int = 4
    """LoRAs one request may name."""
    max_cost: int | None = None
    """Bound on steps × pixels × images of one request (img2img counts the steps it runs). ``None``
    sizes it to the device: :data:`CPU_MAX_COST` on a CPU, :data:`CUDA_MAX_COST` on CUDA."""
    max_message_bytes: int | None = None
    """gRPC's receive limit; ``None`` computes what a request can legitimately need from the other
    limits (:attr:`request_message_bytes`). Responses get :attr:`response_message_bytes`."""

    def cost_limit(self, device: str) -> int:
        """The cost bound for a model on ``device``."""
        if self.max_cost is not None:
            return self.max_cost
        return CUDA_MAX_COST if device.startswith("cuda") else CPU_MAX_COST

    @property
    def request_message_bytes(self) -> int:
        """The largest legitimate request: an init image and its inpainting mask of ``max_pixels`` each
        (raw RGB is 3 bytes a pixel; half again for encoded formats), a prompt and a negative prompt of
        ``max_prompt_bytes``, and 64 KiB for every other field. With the defaults: 2 × 4.5 MiB + 8 KB +
        64 KiB ≈ 9.1 MiB (was 64 MiB)."""
        if self.max_message_bytes is not None:
            return self.max_message_bytes
        image = int(self.max_pixels * 3 * _IMAGE_FORMAT_SLACK)
        return 2 * image + 2 * self.max_prompt_bytes + _OTHER_FIELDS_BYTES

    @property
    def response_message_bytes(self) -> int:
        """The largest legitimate response: ``max_images`` images of ``max_pixels`` in raw RGB (the
        largest format), half again, and 64 KiB: 36 MiB with the defaults."""
        image = int(self.max_pixels * 3 * _IMAGE_FORMAT_SLACK)
        return self.max_images * image + _OTHER_FIELDS_BYTES


class ApiKey(_Section):
    """One caller of the generation service, known by a key or by its client certificate (or both),
    with its own limits (see ``server.api_keys``)."""

    label: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """Names the caller in metrics and logs; the key itself is never shown."""
    key: SecretStr | None = Field(default=None, min_length=16)
    """The secret the caller sends as ``authorization: Bearer <key>``."""
    tls_identity: str | None = Field(default=None, min_length=1, max_length=256)
    """With mTLS (``server.tls_client_ca``): the client certificate identity that names this caller,
    its subject CN or one of its subject alternative names (DNS name, URI, e-mail, IP)."""
    max_concurrent: int | None = Field(default=None, ge=1)
    """Generation calls this key may have open at once; None: no limit of its own."""
    rate_per_minute: float | None = Field(default=None, gt=0)
    """Generation calls this key may start per minute (a token bucket of ``burst``); None: unlimited."""
    burst: int = Field(default=1, ge=1)
    """Calls the rate limit lets through at once before it spaces them out."""
    models: list[str] | None = None
    """The models this key may use (the default model is ``""``); None: every model."""

    @model_validator(mode="after")
    def _known_somehow(self) -> ApiKey:
        if self.key is None and self.tls_identity is None:
            raise ValueError(f"caller {self.label!r} needs a key, a tls_identity or both")
        return self


class ServerSettings(_Section):
    """The gRPC server: ports, queue, batching, shutdown and security."""

    host: str = "127.0.0.1"
    port: int = 50051
    metrics: bool = True
    """Serve Prometheus ``/metrics`` over HTTP (``--no-metrics`` turns it off)."""
    metrics_port: int = 9464
    """The metrics port (0 picks a free one). 9464 is the port Prometheus exporters of OpenTelemetry
    use; a busy port is logged as an error and the server serves on without metrics."""
    metrics_host: str = "127.0.0.1"
    """Where ``/metrics`` listens: loopback by default, whatever ``host`` is, so a scraper on another
    machine is a deliberate choice (set ``0.0.0.0``, ideally with ``metrics_require_token``)."""
    metrics_require_token: bool = False
    """Require ``Authorization: Bearer <admin_token>`` on ``/metrics`` (needs ``admin_token``)."""
    reflection: bool = True
    """Serve gRPC server reflection (so grpcurl works without our stubs); it reveals only the public
    ``diffstack.v1`` contract."""
    queue_size: int = Field(default=64, ge=1)
    """Images (not requests) waiting or being prepared at most; a request of n images takes n places.
    Beyond it requests get RESOURCE_EXHAUSTED with a retry hint."""
    max_batch: int = Field(default=16, ge=1)
    """The largest batch, in images, the batcher may form: the cap on the measured size."""
    batch_size: int = Field(default=0, ge=0)
    """0 measures the batch size at start on CUDA (the largest that still improves images/s on this
    device, within memory; kept beside the stack decision, so a restart does not measure again) and
    takes ``cpu_batch_size`` on a CPU; a number fixes it (capped by ``max_batch``)."""
    cpu_batch_size: int = Field(default=4, ge=1)
    """The batch size on a CPU when ``batch_size`` is 0: measuring there takes up to
    ``batch_measure_budget_s`` of start-up for little gain (a CPU's images/s barely grows with the
    batch), so a fixed size is used unless ``measure_batch_on_cpu`` asks to measure."""
    measure_batch_on_cpu: bool = False
    """Measure the batch size on a CPU too (``batch_size`` 0)."""
    batch_measure_steps: int = Field(default=4, ge=1)
    """Steps of each timed batch while measuring, and of each warm-up batch (batch sizes, wrappers)."""
    batch_measure_budget_s: float = Field(default=60.0, gt=0)
    """Measuring stops before a size whose expected cost (two warm-up and two timed runs, scaled from
    the last size) would take the whole measurement, warm-ups included, past this."""
    batch_min_gain: float = Field(default=0.05, ge=0)
    """A larger batch is kept only if its images/s beats the best smaller one by this fraction; after
    a size that does not, one more is tried (noise), and two in a row end the search."""
    warm_batches: bool | None = None
    """Warm every batch size the batcher can form (untimed runs until two agree within 10%, at least
    two) before the batcher forms it, so no client's batch records CUDA graphs. ``None``: when the
    default model runs on CUDA (a CPU has no graphs to record). Sizes the measurement did not run
    are warmed after SERVING, on the device thread between client batches (see
    ``warm_before_serving``); until a size and every smaller one are warmed, the batcher forms
    batches only up to the largest warmed size."""
    warm_before_serving: bool = False
    """Warm every batch size, and every wrapper on the compiled denoiser (DeepCache), before reporting
    SERVING instead (slower start, full batches and cached requests fast at once)."""
    warm_wrappers: bool = True
    """Warm the default model's wrappers that run on the compiled denoiser (DeepCache: 77 s on an
    H200, cold) after SERVING, once every batch size is warm, each only in a real pause of client
    traffic (``wrapper_warm_quiet_s``; its compile holds the device thread for as long). Off: each
    compiles on its first use, for a server whose clients never enable one (the serve benchmarks)."""
    wrapper_warm_quiet_s: float = Field(default=5.0, ge=0)
    """A wrapper's warm-up starts only once nothing has been queued, prepared or running for this
    long. It holds the device thread for as long as its compile (DeepCache: 14 s on an H200 after a
    restart, 77 s cold), so it must start when traffic has stopped, not in the gap between two
    requests of a steady stream: 0.1 s of quiet let one start under 10 requests/s, and 53 admitted
    requests timed out behind it. At 1 request/s (Poisson) a 5 s gap comes once in ~150 requests;
    a server that idles warms its wrappers 5 s later, which costs nothing. Requests arriving during
    a warm-up are admitted only if they can finish after it (the queue counts the warm-up), so a
    longer quiet time trades a later warm-up for fewer refusals."""
    batch_wait_ms: int = 5
    encode_threads: int = Field(default=0, ge=0)
    """Threads encoding result images (PNG, WebP and JPEG encoders release the GIL, so they run in
    parallel beside the device thread); 0 takes the usable CPUs, between 2 and 16."""
    grace_seconds: float = 30.0
    preview_interval_s: float = 0.5
    preview_max_side: int = 256
    admin_token: str | None = None
    jobs_keep_s: float = Field(default=3600.0, ge=0)
    """How long a finished job (SubmitJob) and its result stay for WatchJob and ListJobs."""
    jobs_keep_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    """Memory the finished jobs' events may hold; past it the oldest finished jobs go first."""
    api_keys: list[ApiKey] = Field(default_factory=list)
    """Keys for the generation service; empty (and no ``api_keys_file``): generation is open.
    From the environment: ``DIFFSTACK_SERVER__API_KEYS='[{"label": ..., "key": ...}]'``."""
    api_keys_file: Path | None = None
    """A TOML file of ``[[keys]]`` tables (the fields of :class:`ApiKey`), added to ``api_keys``;
    keeps the secrets out of the main configuration."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    log_format: Literal["auto", "json", "console"] = "auto"
    replicas: int = Field(default=0, ge=0)
    """0: the single-process server. N: N Ray Serve replicas (one per GPU, else per CPU slot) behind
    Ray's gRPC proxy on ``port``; needs the ``diffstack-ray`` distribution."""
    context_parallel: int = Field(default=0, ge=0)
    """0 or 1: one process. N ≥ 2: N processes, one per GPU, that split each denoiser step through
    the ``diffstack-context-parallel`` plugin; rank 0 serves gRPC and the others follow it."""
    collective_timeout_s: float = Field(default=120.0, gt=0)
    """Under context parallelism: how long one collective (and so one step) may wait for the other
    ranks before it fails, and the group with it (health NOT_SERVING), instead of hanging."""
    rank_heartbeat_timeout_s: float = Field(default=15.0, gt=0)
    """Under context parallelism: a rank silent this long is taken for dead (health NOT_SERVING)."""


class Settings(BaseSettings):
    """Every setting of diffstack, grouped by the part it configures."""

    model_config = SettingsConfigDict(env_prefix="DIFFSTACK_", env_nested_delimiter="__", frozen=True)

    engine: EngineSettings = EngineSettings()
    plugins: PluginSettings = PluginSettings()
    compose: ComposeSettings = ComposeSettings()
    limits: Limits = Limits()
    server: ServerSettings = ServerSettings()
    profiles: dict[str, Profile] = Field(default_factory=dict)
    """User-defined profiles (``[profiles.NAME]``), besides and over the built-in ones."""

    @model_validator(mode="after")
    def _profile_is_known(self) -> Settings:
        known = all_profiles(self.profiles)
        if self.engine.profile and self.engine.profile not in known:
            raise ValueError(f"engine.profile {self.engine.profile!r} is not a profile ({', '.join(known)})")
        return self

    @model_validator(mode="after")
    def _start_up_work_fits_the_limits(self) -> Settings:
        """The warm-up and the batch-size measurement are real requests, checked like a client's: a
        configuration that refuses its own start-up work is an error at load, not a server that
        never turns SERVING."""
        for name, steps in (
            ("engine.warmup_steps", self.engine.warmup_steps),
            ("server.batch_measure_steps", self.server.batch_measure_steps),
        ):
            if steps > self.limits.max_steps:
                raise ValueError(f"{name} ({steps}) exceeds limits.max_steps ({self.limits.max_steps})")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings layers file < environment < flags itself and passes the result as init.
        return (init_settings, env_settings)


def load_settings(path: Path | None = None, **overrides: dict[str, Any]) -> Settings:
    """Settings from ``path`` (TOML), then the environment, then ``overrides`` (section → fields)."""
    from_file: dict[str, Any] = tomllib.loads(path.read_text()) if path else {}
    from_environment = Settings().model_dump(exclude_unset=True)
    merged: dict[str, Any] = {}
    for layer in (from_file, from_environment, overrides):
        for section, fields in layer.items():
            merged[section] = {**merged.get(section, {}), **fields}
    return Settings(**merged)
