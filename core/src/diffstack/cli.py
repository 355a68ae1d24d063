"""The ``diffstack`` command: generate images, list plugins, show the composed stack, score quality.

Other distributions add commands through the ``diffstack.commands`` entry-point group (the server adds
``serve``, the Python client ``status``): each entry point names a ``register_commands(commands)``
function that adds subparsers, so the core never imports them. Flags that set a setting are declared
once as :class:`SettingFlag` and read back by :func:`settings_from_args`, the one flag → settings
mapping every entry point shares. Global flags (settings and verbosity) are accepted before and after
the command name.

Quiet by default: only warnings and errors reach stderr, and the libraries underneath (diffusers,
transformers) are held to errors without their loading bars; ``-v`` shows the host's info lines,
``-vv`` or ``--log-level debug`` everything, theirs included.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from diffstack import __version__
from diffstack.config import Settings, load_settings
from diffstack.errors import DiffstackError, FieldViolation, InvalidRequest
from diffstack.hookspecs import HOOK_NAMES
from diffstack.logs import configure_logging
from diffstack.profiles import all_profiles, apply_profile, blame_profile, profile_rows, profiles_table
from diffstack.types import CandidateStatus, StackReport

if TYPE_CHECKING:
    from PIL import Image

    from diffstack.engine import Engine, GenerationRequest

COMMANDS_GROUP = "diffstack.commands"
"""Entry points here name ``register_commands(commands: Subcommands) -> None``."""

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""What ``add_subparsers()`` returns; a ``register_commands`` function adds its parsers to it."""
Command = Callable[[argparse.Namespace, Settings], int]
"""What a subparser stores as ``command``: it runs with the parsed flags and the loaded settings."""

DESCRIPTION = (
    "Generate images with diffusion models through a stack of optimizations that installed plugins "
    "offer and the host measures. Settings come from --config FILE, DIFFSTACK_<SECTION>__<FIELD> "
    "environment variables and flags, in rising precedence."
)
LOG_LEVELS = ("debug", "info", "warning", "error")
QUIET_LIBRARIES = ("diffusers", "transformers", "accelerate", "huggingface_hub", "torch")
"""Libraries whose info lines and advisory warnings mean nothing to a user of the command."""


@dataclass(frozen=True)
class SettingFlag:
    """A flag that sets ``section.field`` of :class:`~diffstack.config.Settings` when given."""

    flag: str
    section: str
    field: str
    help: str
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return f"{self.section}.{self.field}"


COMMON_FLAGS = (
    SettingFlag("--models-dir", "engine", "models_dir", "folder that model names resolve in", Path),
    SettingFlag("--device", "engine", "device", "cpu, cuda, cuda:1, ... (default: auto)"),
)
"""Setting flags of every command, the server's included."""
CLI_FLAGS = (
    *COMMON_FLAGS,
    SettingFlag(
        "--profile", "engine", "profile", "a named profile the requests start from (see: diffstack profiles)"
    ),
)
"""Setting flags of every ``diffstack`` command."""


def add_setting_flags(parser: argparse.ArgumentParser, flags: Sequence[SettingFlag]) -> None:
    """Add ``--config`` and ``flags``; a flag not given leaves its setting to the file or environment."""
    parser.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="a TOML settings file")
    for flag in flags:
        parser.add_argument(
            flag.flag,
            dest=flag.dest,
            type=flag.type,
            choices=flag.choices,
            metavar=None if flag.choices else flag.field.upper(),
            default=argparse.SUPPRESS,
            help=flag.help,
        )


def add_verbosity_flags(parser: argparse.ArgumentParser) -> None:
    """``-v/--verbose`` (repeatable) and ``--log-level``; not given, the command's default level holds."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="show info lines (-vv: debug lines, the libraries' included)",
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=argparse.SUPPRESS,
        help="the lowest level logged (default: warning; info for serve)",
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from ``--config``, the environment, then every :class:`SettingFlag` that was given."""
    overrides: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        section, dot, field = dest.partition(".")
        if dot:
            overrides.setdefault(section, {})[field] = value
    return load_settings(getattr(args, "config", None), **overrides)


def log_level(args: argparse.Namespace) -> int:
    """The level the flags ask for: ``--log-level``, else one step down per ``-v`` from the default."""
    if hasattr(args, "log_level"):
        return int(getattr(logging, args.log_level.upper()))
    default = int(getattr(args, "default_log_level", logging.WARNING))
    return max(logging.DEBUG, default - 10 * getattr(args, "verbose", 0))


def quiet_libraries(level: int) -> None:
    """Hold the libraries underneath to errors (and hide their loading bars) unless debugging.

    Environment variables reach them when they are imported later; the logger levels and the
    progress-bar switches reach them when they are imported already (tests, ``-m`` runs).
    """
    if level <= logging.DEBUG:
        return
    for name in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(name, "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for library in QUIET_LIBRARIES:
        logging.getLogger(library).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module=rf"{library}(\.|$)")
    for library in ("diffusers", "transformers"):
        module = sys.modules.get(f"{library}.utils.logging")
        if module is not None:
            module.set_verbosity_error()
            module.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except (OSError, ValueError) as exc:  # an unreadable --config, a malformed value
        print(f"error: settings: {exc}", file=sys.stderr)
        return 2
    level = log_level(args)
    configure_logging(settings.server.log_format, level)
    quiet_libraries(level)
    try:
        return int(args.command(args, settings) or 0)
    except InvalidRequest as exc:
        for violation in exc.violations:
            print(f"error: {violation.field}: {violation.description}", file=sys.stderr)
        return 2
    except DiffstackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2^63 - 1, got {value}")
    return value


class _SamplerNames:
    """argparse choices that import the sampler table only when checked or shown (it imports torch):
    the built-in samplers, then those installed plugins offer (``select_sampler``), loaded only for a
    name that is not built in or for ``--help``."""

    def __init__(self) -> None:
        self._plugins: list[str] | None = None

    def _builtin(self) -> list[str]:
        from diffstack.engine.samplers import SAMPLERS

        return list(SAMPLERS)

    def _plugin_names(self) -> list[str]:
        if self._plugins is None:
            from diffstack.config import PluginSettings
            from diffstack.plugins import load_plugins
            from diffstack.preflight import installed_offer_names

            configure_logging(level=logging.WARNING)  # before main configures it: stay quiet
            installed = installed_offer_names(load_plugins(PluginSettings()), "select_sampler")
            self._plugins = sorted(installed - set(self._builtin()))
        return self._plugins

    def _names(self) -> list[str]:
        return [*self._builtin(), *self._plugin_names()]

    def __contains__(self, name: object) -> bool:
        return name in self._builtin() or name in self._plugin_names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __str__(self) -> str:
        return ", ".join(self._names())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffstack", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"diffstack {__version__}")
    add_setting_flags(parser, CLI_FLAGS)
    add_verbosity_flags(parser)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    _add_generate(commands)

    profiles = commands.add_parser(
        "profiles",
        help="list the named profiles and what each sets",
        description="The built-in profiles and the settings' [profiles.NAME], with what each sets.",
    )
    profiles.add_argument("--json", action="store_true", help="print JSON instead of a table")
    profiles.set_defaults(command=_profiles)

    plugins = commands.add_parser(
        "plugins",
        help="list installed plugins and their load status",
        description="List every plugin installed in this environment: loaded, failed (with why) or off.",
    )
    plugins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plugins.add_argument("--hook", choices=HOOK_NAMES, help="only plugins that implement this hook")
    plugins.set_defaults(command=_plugins)

    plugin = commands.add_parser(
        "plugin",
        help="start a new plugin from the template",
        description="Write a complete minimal plugin distribution for one hook, ready to install and test.",
    )
    plugin_commands = plugin.add_subparsers(required=True, metavar="ACTION")
    new = plugin_commands.add_parser("new", help="write plugins/NAME (or DIR) for one hook")
    new.add_argument("name", help="the plugin's name: lower case letters, digits and _")
    new.add_argument("--hook", required=True, choices=HOOK_NAMES, help="the hook it implements")
    new.add_argument("--dir", type=Path, help="where to write it (default: ./plugins/NAME)")
    new.set_defaults(command=_plugin_new)

    stack = commands.add_parser(
        "stack",
        help="compose and show the stack for a model on this machine",
        description="Load a model, let every plugin offer, check and time the offers, show every decision.",
    )
    stack.add_argument("--model", default="", help="a model name (default: the configured or embedded one)")
    stack.add_argument("--json", action="store_true", help="print JSON instead of text")
    stack.set_defaults(command=on_device(_stack))

    quality = commands.add_parser(
        "quality",
        help="score one configuration against the synthetic world's ground truth",
        description="Only meaningful for models trained on the synthetic world, like the embedded default.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    quality.add_argument(
        "--model", default="", help="a model name, e.g. synthetic-shapes-flux (default: the configured one)"
    )
    quality.add_argument("--scenes", type=_positive_int, default=48, help="how many fixed prompts")
    quality.add_argument("--seeds", default="0,1", help="comma-separated seeds per prompt")
    quality.add_argument("--steps", type=_positive_int, help="denoising steps (default: the model's)")
    quality.add_argument("--guidance", type=_non_negative_float, help="(default: the model's)")
    quality.add_argument("--sampler", choices=_SamplerNames(), metavar="NAME", help="(default: the model's)")
    quality.add_argument("--schedule", help="a schedule name (default: the profile's, else auto)")
    quality.add_argument("--wrapper", action="append", default=[], metavar="NAME[:KEY=VALUE,...]")
    quality.add_argument("--batch-size", type=_positive_int, default=16, help="images per pipeline call")
    quality.set_defaults(command=on_device(_quality))

    _register_installed_commands(commands)
    for subparser in commands.choices.values():
        _accept_global_flags(subparser)
    return parser


class _RequestDefaultsFormatter(argparse.HelpFormatter):
    """Help that shows ``%(request_default)s`` as GenerationRequest's default for the flag's field.

    The defaults live on the request type only; reading them when help is shown keeps torch (which
    importing the engine package brings) out of every other start of the command.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if "%(request_default)s" in help_text:
            from diffstack.engine.requests import GenerationRequest

            default = getattr(GenerationRequest, action.dest)
            help_text = help_text.replace("%(request_default)s", str(default))
        return help_text


def _add_generate(commands: Subcommands) -> None:
    generate = commands.add_parser(
        "generate",
        formatter_class=_RequestDefaultsFormatter,
        help="generate images from a prompt into PNG files",
        description=(
            "Generate images from a prompt. The embedded default model draws one shape: "
            "'a [small|large] <colour> <shape> [<position>] [on a <background> background]' "
            "(the exact grammar: README.md)."
        ),
    )
    # Flags left out are left out of the request too: its defaults live on GenerationRequest only.
    generate.add_argument("prompt")
    generate.add_argument("-o", "--output", type=Path, default=Path("out.png"), help="(default: out.png)")
    generate.add_argument("--negative", dest="negative_prompt", help="negative prompt (not for FLUX)")
    generate.add_argument("--model", help="model name (default: the configured or embedded model)")
    size = "pixels, a multiple of 8 (16 for FLUX) (default: the model's; 64 for the embedded model)"
    generate.add_argument("--width", type=_positive_int, help=size)
    generate.add_argument("--height", type=_positive_int, help=size)
    generate.add_argument(
        "--steps",
        type=_positive_int,
        help="denoising steps, 1 to limits.max_steps (default: the model's; 20 for the embedded model)",
    )
    generate.add_argument(
        "--guidance",
        type=_non_negative_float,
        help="classifier-free guidance scale, 0 to 50, or 0 to 1 for the CFG++ samplers (default: the "
        "model's; 4.0 for the embedded model; a plugin sampler's own, 0.6 for CFG++)",
    )
    generate.add_argument(
        "--sampler",
        choices=_SamplerNames(),
        metavar="NAME",
        help="one of: %(choices)s; flow_euler is the only one for FLUX, the plugins' (euler_cfgpp, ...) "
        "serve SD families (default: euler; flow_euler for FLUX)",
    )
    generate.add_argument(
        "--schedule",
        metavar="NAME",
        help=(
            "auto (the best schedule offered for the model), default (the scheduler's own), karras, "
            "or one a plugin adds (see: diffstack plugins --hook build_sigmas) (default: %(request_default)s)"
        ),
    )
    generate.add_argument(
        "--seed",
        type=_seed,
        action="append",
        help="a seed; repeat for several images, one each (default: random, printed with each image)",
    )
    generate.add_argument(
        "-n",
        "--num-images",
        type=_positive_int,
        help="how many images (default: %(request_default)s, or one per --seed)",
    )
    generate.add_argument("--init-image", type=Path, help="img2img: start from this picture")
    generate.add_argument(
        "--mask",
        type=Path,
        help="inpaint: repaint the white parts of --init-image (same size; pad to outpaint)",
    )
    generate.add_argument(
        "--strength",
        type=float,
        help="img2img: how much to change the --init-image, in (0, 1] (default: %(request_default)s)",
    )
    generate.add_argument(
        "--wrapper",
        action="append",
        metavar="NAME[:KEY=VALUE,...]",
        help="enable a denoiser wrapper, e.g. deepcache:interval=3; KEY=@FILE passes a picture to an image "
        "option (diffstack plugins --hook wrap_denoiser)",
    )
    generate.add_argument(
        "--lora",
        action="append",
        type=_lora,
        metavar="NAME[:SCALE]",
        help="apply a LoRA from the models directory's loras/ folder, e.g. colour-swap:0.8 (default scale 1)",
    )
    generate.set_defaults(command=on_device(_generate))


def _accept_global_flags(parser: argparse.ArgumentParser) -> None:
    """Let ``diffstack COMMAND --config x.toml`` mean what ``diffstack --config x.toml COMMAND`` does."""
    known = parser._option_string_actions  # argparse keeps no public view of a parser's flags
    if "--config" not in known:
        add_setting_flags(parser, [flag for flag in CLI_FLAGS if flag.flag not in known])
    if "--log-level" not in known:
        add_verbosity_flags(parser)
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        for child in getattr(action, "choices", {}).values():
            _accept_global_flags(child)


def _register_installed_commands(commands: Subcommands) -> None:
    """Let installed distributions add their commands; one that fails is reported and skipped."""
    for entry_point in entry_points(group=COMMANDS_GROUP):
        try:
            entry_point.load()(commands)
        except Exception as exc:
            print(
                f"warning: commands from {entry_point.value} are unavailable: {type(exc).__name__}: {exc}",
                file=sys.stderr,
            )


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------

_REQUEST_FLAGS = (
    "prompt",
    "negative_prompt",
    "model",
    "width",
    "height",
    "steps",
    "guidance",
    "sampler",
    "schedule",
    "num_images",
    "strength",
)


def request_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields the flags set; the rest keep GenerationRequest's defaults.

    Flags that would be silently ignored are errors instead: ``--strength`` without ``--init-image``,
    more ``--seed`` than ``-n``. Repeated ``--seed`` without ``-n`` asks for one image per seed.
    """
    fields = {name: getattr(args, name) for name in _REQUEST_FLAGS if getattr(args, name) is not None}
    violations = []
    if args.strength is not None and args.init_image is None:
        violations.append(FieldViolation("strength", "--strength needs --init-image (it is img2img only)"))
    if args.seed:
        fields["seeds"] = tuple(args.seed)
        if args.num_images is None:
            fields["num_images"] = len(args.seed)
        elif len(args.seed) > args.num_images:
            violations.append(
                FieldViolation("seeds", f"{len(args.seed)} seeds for -n {args.num_images} images")
            )
    if args.wrapper:
        fields["wrappers"] = dict(_wrapper(spec) for spec in args.wrapper)
    if args.lora:
        fields["loras"] = tuple(args.lora)
    if violations:
        raise InvalidRequest(violations)
    if args.init_image:
        fields["init_image"] = _open_image(args.init_image)
    if args.mask:
        fields["mask"] = _open_image(args.mask, "mask")
    return fields


def _generate(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from diffstack.engine import GenerationJob, GenerationRequest, StepEvent
    from diffstack.preflight import check_before_loading

    explicit = request_fields(args)
    profile = settings.engine.profile
    request = GenerationRequest(**apply_profile(explicit, profile, all_profiles(settings.profiles)))
    try:
        check_before_loading(request, settings)
    except InvalidRequest as exc:
        raise blame_profile(exc, profile, explicit) from None
    engine = _start_engine(settings, request.model)
    try:
        request = engine.prepare(request)
    except InvalidRequest as exc:
        explained = explain_rejections(exc, request, engine.report(request.model))
        raise blame_profile(explained, profile, explicit) from None
    with tqdm(total=request.steps, unit="step", desc="generating", disable=None, leave=False) as bar:

        def advance(event: StepEvent) -> None:
            bar.update(event.step - bar.n)

        (result,) = engine.run([GenerationJob(request, on_step=advance)])
    if isinstance(result, DiffstackError):
        raise result
    for index, generated in enumerate(result.images):
        path = _numbered(args.output, index, len(result.images))
        path.parent.mkdir(parents=True, exist_ok=True)
        generated.image.save(path)
        print(f"{path}  seed={generated.seed}")
    print(f"model {result.model}, stack: {stack_summary(result.stack)}", file=sys.stderr)
    return 0


def on_device(command: Command) -> Command:
    """``command`` run on an :class:`~diffstack.engine.EngineWorker`'s device thread: every engine
    call it makes (start, load, run) happens on that one thread, as in the server, so CUDA graphs
    recorded while composing replay where they were recorded; Ctrl-C still ends the command at once."""

    def run(args: argparse.Namespace, settings: Settings) -> int:
        from diffstack.engine.worker import EngineWorker

        worker = EngineWorker(settings)
        try:
            return worker.submit(command, args, settings).result()
        finally:
            worker.stop()

    return run


def _start_engine(settings: Settings, model: str = "") -> Engine:
    """Load the plugins and ``model`` and compose its stack, saying so on stderr (it takes seconds)."""
    from diffstack.engine import Engine
    from diffstack.plugins import load_plugins

    started = time.perf_counter()
    _status("loading plugins")
    engine = Engine(settings, load_plugins(settings.plugins))
    _status(f"loading {model or engine.default_model_name} and composing its stack")
    engine.model(model)
    _status(f"ready in {time.perf_counter() - started:.1f} s", done=True)
    return engine


def _status(text: str, done: bool = False) -> None:
    """One progress line on stderr, rewritten in place on a terminal, left out otherwise."""
    if sys.stderr.isatty():
        print(
            f"\r\033[K{text}{'' if done else ' ...'}", end="\n" if done else "", file=sys.stderr, flush=True
        )


def explain_rejections(
    error: InvalidRequest, request: GenerationRequest, report: StackReport
) -> InvalidRequest:
    """``error`` with the host's reason added where the schedule, sampler or a wrapper the request names was
    offered for this model but refused ("needs a transformer denoiser", "not made for flux models")."""
    asked = {
        "schedule": ("build_sigmas", {request.schedule}),
        "sampler": ("select_sampler", {request.sampler}),
        "wrappers": ("wrap_denoiser", set(request.wrappers)),
    }
    explained = []
    for violation in error.violations:
        slot, names = asked.get(violation.field.split(".")[0], ("", set()))
        reasons = [
            f"{c.offer!r} from plugin {c.plugin} was {c.status.value} for this model: {c.reason}"
            for c in (report.slot(slot).candidates if slot else ())
            if c.offer in names
            and c.reason
            and c.status in (CandidateStatus.REJECTED, CandidateStatus.FAILED, CandidateStatus.TIMED_OUT)
        ]
        explained.append(FieldViolation(violation.field, "; ".join([violation.description, *reasons])))
    return InvalidRequest(explained)


def stack_summary(stack: Mapping[str, Sequence[str]]) -> str:
    """The chosen stack in one readable line: per-shape attention choices are counted, not listed.

    ``{"select_attention": ["h1xd64 q1 k1: sdpa", ...8], "build_sigmas": ["default"]}`` reads
    ``attention: sdpa for all 8 shapes; schedule: default``.
    """
    names = {
        "select_attention": "attention",
        "build_sigmas": "schedule",
        "select_sampler": "sampler",
        "encode_prompt": "encoder",
        "wrap_denoiser": "wrappers",
        "compile_model": "compile",
        "compile_vae": "vae decode",
    }
    parts = []
    for slot, chosen in stack.items():
        label = names.get(slot, slot)
        if slot == "select_sampler" and not chosen:
            continue  # a built-in sampler ran; only a plugin's is worth naming
        if slot == "select_attention" and chosen:
            per_kernel: dict[str, int] = {}
            for entry in chosen:
                kernel = entry.rpartition(": ")[2]
                per_kernel[kernel] = per_kernel.get(kernel, 0) + 1
            if len(per_kernel) == 1:
                ((kernel, count),) = per_kernel.items()
                parts.append(f"{label}: {kernel} for all {count} shapes")
            else:
                counts = ", ".join(
                    f"{k} for {n}" for k, n in sorted(per_kernel.items(), key=lambda kv: -kv[1])
                )
                parts.append(f"{label}: {counts} of {len(chosen)} shapes")
        else:
            parts.append(f"{label}: {', '.join(chosen) or 'none'}")
    return "; ".join(parts)


def _open_image(path: Path, field: str = "init_image") -> Image.Image:
    """The picture for ``field``, or an InvalidRequest naming it when it cannot be read as one."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise InvalidRequest(FieldViolation(field, f"cannot read {path}: {exc}")) from exc


def _wrapper(spec: str) -> tuple[str, dict[str, Any]]:
    """``deepcache:interval=3,branch=0`` → ("deepcache", {"interval": 3, "branch": 0}); a value
    ``@FILE`` (as curl spells a file) is the picture in FILE, for an image option."""
    name, _, options = spec.partition(":")
    parsed: dict[str, Any] = {}
    for pair in filter(None, options.split(",")):
        key, _, value = pair.partition("=")
        if value.startswith("@"):
            parsed[key] = _open_image(Path(value[1:]), f"wrappers.{name}.{key}")
            continue
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return name, parsed


def _lora(spec: str) -> Any:
    """``colour-swap:0.8`` → LoraSpec("colour-swap", 0.8); the scale is 1 when left out."""
    from diffstack.engine.requests import LoraSpec

    name, _, scale = spec.partition(":")
    try:
        return LoraSpec(name, float(scale) if scale else LoraSpec.scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r}: the scale after ':' must be a number") from None


def _numbered(path: Path, index: int, count: int) -> Path:
    return path if count == 1 else path.with_name(f"{path.stem}-{index}{path.suffix}")


# ---------------------------------------------------------------------------------------------
# plugins, plugin new, stack, quality
# ---------------------------------------------------------------------------------------------


def _plugins(args: argparse.Namespace, settings: Settings) -> int:
    from diffstack.plugins import load_plugins
    from diffstack.render import plugins_table, to_jsonable

    records = load_plugins(settings.plugins).records
    if args.hook:
        records = tuple(r for r in records if args.hook in r.hooks)
    print(json.dumps(to_jsonable(records), indent=2) if args.json else plugins_table(records))
    return 0


def _profiles(args: argparse.Namespace, settings: Settings) -> int:
    known = all_profiles(settings.profiles)
    print(json.dumps(profile_rows(known), indent=2) if args.json else profiles_table(known))
    return 0


def _plugin_new(args: argparse.Namespace, settings: Settings) -> int:
    from diffstack.template import write_plugin

    try:
        folder = write_plugin(args.name, args.hook, args.dir or Path("plugins") / args.name.replace("_", "-"))
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {folder}")
    print(f"install it into this environment: {sys.executable} -m pip install -e {folder}")
    print(f"test it: {sys.executable} -m pytest {folder / 'tests'}")
    return 0


def _stack(args: argparse.Namespace, settings: Settings) -> int:
    from diffstack.render import report_text, to_jsonable

    report = _start_engine(settings, args.model).report(args.model)
    print(json.dumps(to_jsonable(report), indent=2) if args.json else report_text(report))
    return 0


def _quality(args: argparse.Namespace, settings: Settings) -> int:
    """Only meaningful for a model trained on the synthetic world, like the embedded default."""
    from tqdm import tqdm

    from diffstack.synthetic.quality import engine_generator, evaluate, fixed_scenes, markdown_table

    explicit: dict[str, Any] = {
        key: getattr(args, key) for key in ("steps", "guidance", "sampler", "schedule")
    }
    explicit = {key: value for key, value in explicit.items() if value is not None}
    if args.wrapper:
        explicit["wrappers"] = dict(_wrapper(spec) for spec in args.wrapper)
    config = apply_profile(explicit, settings.engine.profile, all_profiles(settings.profiles))
    config.setdefault("schedule", "auto")
    config["batch_size"] = args.batch_size
    seeds = tuple(int(s) for s in args.seeds.split(","))
    scenes = fixed_scenes(args.scenes)
    label = " ".join(f"{k}={v}" for k, v in config.items() if k != "batch_size") or "defaults"
    generate = engine_generator(_start_engine(settings, args.model), model=args.model)
    with tqdm(
        total=len(scenes) * len(seeds) + 1, unit="image", desc="scoring", disable=None, leave=False
    ) as bar:

        def counted(prompts: Sequence[str], image_seeds: Sequence[int], **options: Any) -> list[Any]:
            images = generate(prompts, image_seeds, **options)
            bar.update(len(images))
            return images

        rows = evaluate(counted, {label: config}, scenes=scenes, seeds=seeds)
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
