"""Named profiles: small sets of request defaults (steps, sampler, schedule, wrappers and their options).

Four are built in, after the reference's recommended configurations; ``[profiles.NAME]`` in the TOML
adds more (or replaces a built-in of the same name). A profile only fills what a request leaves out:
fields the caller sets explicitly win, and a wrapper the caller names keeps the caller's options.
A profile never loads anything: a wrapper or schedule whose plugin the admin denied is not there, so
the request is refused on the ``profile`` field with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from diffstack.errors import FieldViolation, InvalidRequest


class Profile(BaseModel):
    """What one profile sets; a field left ``None`` (or no wrappers) leaves the request's default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    steps: int | None = Field(default=None, ge=1)
    guidance: float | None = Field(default=None, ge=0)
    sampler: str | None = None
    schedule: str | None = None
    wrappers: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def request_defaults(self) -> dict[str, Any]:
        """The request fields this profile sets."""
        fields = self.model_dump(exclude={"description", "wrappers"}, exclude_none=True)
        if self.wrappers:
            fields["wrappers"] = {name: dict(options) for name, options in self.wrappers.items()}
        return fields


BUILTIN_PROFILES: Mapping[str, Profile] = {
    "speed": Profile(
        description="maximum speed for batch jobs: 10 AYS steps, DeepCache every 2nd step",
        steps=10,
        sampler="euler",
        schedule="ays",
        wrappers={"deepcache": {"interval": 2}},
    ),
    "balanced": Profile(
        description="20 AYS steps, DeepCache every 3rd step",
        steps=20,
        sampler="euler",
        schedule="ays",
        wrappers={"deepcache": {"interval": 3}},
    ),
    "quality": Profile(
        description="quality first: 30 steps on the best schedule offered, no step skipping",
        steps=30,
        sampler="euler",
        schedule="auto",
    ),
    "production": Profile(
        description="production API: 20 AYS steps, DeepCache every 2nd step (steady quality, fixed cost)",
        steps=20,
        sampler="euler",
        schedule="ays",
        wrappers={"deepcache": {"interval": 2}},
    ),
}
"""Request defaults only: what compiles (torch_compile, stable_fast) and caches prompts (prompt_cache)
is the stack the host composes and measures for every request, not something a profile turns on."""


def all_profiles(user: Mapping[str, Profile]) -> dict[str, Profile]:
    """The built-in profiles, then the settings' ``[profiles.NAME]`` (which replace same-named ones)."""
    return {**BUILTIN_PROFILES, **user}


def apply_profile(fields: Mapping[str, Any], name: str, profiles: Mapping[str, Profile]) -> dict[str, Any]:
    """``fields`` (a request's explicitly set fields) over profile ``name``'s defaults.

    An unknown name is refused on the ``profile`` field; an empty name applies nothing.
    """
    if not name:
        return dict(fields)
    if name not in profiles:
        known = ", ".join(sorted(profiles))
        raise InvalidRequest([FieldViolation("profile", f"no profile named {name!r} (known: {known})")])
    merged = {**profiles[name].request_defaults(), **fields}
    if "wrappers" in fields and profiles[name].wrappers:
        merged["wrappers"] = {**profiles[name].wrappers, **fields["wrappers"]}
    return merged


def blame_profile(error: InvalidRequest, name: str, explicit: Mapping[str, Any]) -> InvalidRequest:
    """``error`` with violations of fields the profile set (not the caller) moved onto ``profile``,
    saying which of its settings was refused and why (e.g. a wrapper whose plugin the admin denied)."""
    if not name:
        return error
    violations = []
    for violation in error.violations:
        top, _, rest = violation.field.partition(".")
        set_by_caller = top in explicit and (
            top != "wrappers" or not rest or rest.split(".")[0] in explicit[top]
        )
        if top and not set_by_caller:
            violation = FieldViolation(
                "profile", f"profile {name!r} sets {violation.field}, refused: {violation.description}"
            )
        violations.append(violation)
    return InvalidRequest(violations)


def profile_rows(profiles: Mapping[str, Profile]) -> list[dict[str, Any]]:
    """One JSON-ready record per profile: its name, whether it is built in, and what it sets."""
    return [
        {
            "name": name,
            "builtin": BUILTIN_PROFILES.get(name) == profile,
            "description": profile.description,
            "sets": profile.request_defaults(),
        }
        for name, profile in profiles.items()
    ]


def profiles_table(profiles: Mapping[str, Profile]) -> str:
    """A plain-text table of :func:`profile_rows`."""
    lines = []
    for row in profile_rows(profiles):
        sets = dict(row["sets"])
        wrappers = sets.pop("wrappers", {})
        parts = [f"{key}={value}" for key, value in sets.items()]
        for wrapper, options in wrappers.items():
            opts = ",".join(f"{k}={v}" for k, v in options.items())
            parts.append(f"wrapper={wrapper}" + (f":{opts}" if opts else ""))
        origin = "built-in" if row["builtin"] else "settings"
        lines.append(f"{row['name']:<12} {origin:<9} {' '.join(parts) or '(nothing)'}")
        if row["description"]:
            lines.append(f"{'':<12} {row['description']}")
    return "\n".join(lines)
