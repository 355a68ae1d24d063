"""Attaching attention kernels to a denoiser through diffusers' own extension points.

UNets: one attention processor per attention module (``set_attn_processor``), each serving the
kernel chosen for that module's shape. The chosen kernel is a :class:`KernelChain`: when a kernel
raises at run time or meets a shape it does not serve (a request at another size than composition
measured), the next fastest accepted kernel for that shape runs, and SDPA last. Transformers (FLUX):
diffusers' attention dispatch, through ``set_attention_backend``.

A leaf module: it imports only :mod:`diffstack.types`, so composition (which checks kernels) and the
engine (which installs them) both build on it without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
import torch
import torch.nn.functional as F

from diffstack.types import AttentionFn, AttentionShape, Availability, supports_every_shape

log = structlog.get_logger(__name__)


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The reference kernel: PyTorch's scaled dot-product attention."""
    return F.scaled_dot_product_attention(query, key, value)


@dataclass(frozen=True)
class ChainLink:
    """One accepted kernel in a fallback chain: its offer's name, the kernel, the shapes it serves."""

    name: str
    kernel: AttentionFn
    supports: Callable[[AttentionShape], Availability] = supports_every_shape


class KernelChain:
    """Accepted kernels for one attention scope, fastest first, called like one kernel.

    Each call runs the first link that serves the call's shape and has not raised; a link that
    raises is passed over from then on. When no link serves, SDPA does. ``used`` and ``passed_over``
    describe the last call, so an answer can name what really ran and why.
    """

    def __init__(self, links: Sequence[ChainLink]) -> None:
        self.links = tuple(links)
        self.broken: set[str] = set()
        self.used = self.links[0].name if self.links else "sdpa"
        self.passed_over: tuple[str, ...] = ()
        self._serving: dict[AttentionShape, tuple[tuple[ChainLink, ...], tuple[str, ...]]] = {}

    @property
    def order(self) -> str:
        """The chain as the report shows it: ``sage → sparge → sdpa``."""
        names = [link.name for link in self.links]
        return " → ".join(names if names and names[-1] == "sdpa" else [*names, "sdpa"])

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        shape = AttentionShape(query.shape[1], query.shape[-1], query.shape[2], key.shape[2])
        serving, unserved = self._links_for(shape)
        passed = list(unserved)
        for link in serving:
            if link.name in self.broken:
                passed.append(f"{link.name} failed at run time")
                continue
            try:
                out = link.kernel(query, key, value)
            except Exception as exc:
                self.broken.add(link.name)
                passed.append(f"{link.name} failed at run time")
                log.warning(
                    "attention kernel failed; the next in its chain runs", kernel=link.name, error=str(exc)
                )
                continue
            self.used, self.passed_over = link.name, tuple(passed)
            return out
        self.used, self.passed_over = "sdpa", tuple(passed)
        return F.scaled_dot_product_attention(query, key, value)

    def _links_for(self, shape: AttentionShape) -> tuple[tuple[ChainLink, ...], tuple[str, ...]]:
        """The links that serve ``shape`` and a reason for each that does not (asked once per shape)."""
        if shape not in self._serving:
            serving, unserved = [], []
            for link in self.links:
                answer = _serves(link, shape)
                if answer.ok:
                    serving.append(link)
                else:
                    unserved.append(f"{link.name} does not serve {shape.key}: {answer.reason}")
            self._serving[shape] = (tuple(serving), tuple(unserved))
        return self._serving[shape]


def _serves(link: ChainLink, shape: AttentionShape) -> Availability:
    """A link's own answer for a shape; a ``supports`` that raises or answers garbage serves nothing."""
    try:
        answer = link.supports(shape)
    except Exception as exc:
        return Availability.no(f"its supports() raised {type(exc).__name__}: {exc}")
    return (
        answer if isinstance(answer, Availability) else Availability.no("its supports() gave no Availability")
    )


def capture_attention_shapes(denoiser: torch.nn.Module, run: Callable[[], Any]) -> dict[str, AttentionShape]:
    """Run ``run`` (one denoiser call) and record the shape every attention module sees, by name."""
    shapes: dict[str, AttentionShape] = {}
    handles = []
    for name, module in denoiser.named_modules():
        if hasattr(module, "heads") and hasattr(module, "processor"):
            handles.append(
                module.register_forward_pre_hook(_recorder(name, module, shapes), with_kwargs=True)
            )
    try:
        with torch.inference_mode():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _recorder(name: str, module: Any, shapes: dict[str, AttentionShape]) -> Callable[..., None]:
    def record(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        query_len = hidden.shape[2] * hidden.shape[3] if hidden.ndim == 4 else hidden.shape[1]
        heads = int(module.heads)
        head_dim = int(getattr(module, "inner_dim", 0) or module.to_q.out_features) // heads
        joint = getattr(module, "added_kv_proj_dim", None) is not None
        if joint and context is not None:  # FLUX double blocks attend over image and text tokens at once
            query_len += context.shape[1]
            key_len = query_len
        else:
            key_len = query_len if context is None else context.shape[1]
        shapes[name] = AttentionShape(heads, head_dim, query_len, key_len)

    return record


class KernelAttnProcessor:
    """Attention for diffusers' ``Attention`` modules (UNets), computed by a chosen kernel.

    Follows diffusers' ``AttnProcessor2_0`` step for step; only the attention product differs. Calls
    with a mask, and any call where the kernel raises, use SDPA, so a kernel can never break a request.
    """

    handles_fused_projections = True
    """It reads ``to_qkv``/``to_kv`` when a module's projections were fused (by a compile offer)."""

    def __init__(self, kernel: AttentionFn, label: str) -> None:
        self.kernel = kernel
        self.label = label
        """The stack report's entry this processor serves (``h8xd40 q4096 k4096: sage``, or a name)."""
        self.failed = False
        """Set when the kernel raised: from then on this module runs SDPA, and answers say so."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attention_mask is not None:
            key_len = (encoder_hidden_states if encoder_hidden_states is not None else hidden_states).shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query, key, value = _project(attn, hidden_states, encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self._attend(query, key, value, attention_mask)
        hidden_states = (
            hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        if mask is not None or self.failed:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        try:
            return self.kernel(query, key, value)
        except Exception as exc:
            self.failed = True
            log.warning(
                "attention kernel failed; this module falls back to SDPA",
                kernel=self.label,
                error=str(exc),
            )
            return F.scaled_dot_product_attention(query, key, value)


def _project(
    attn: Any, hidden_states: torch.Tensor, context: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key and value, from fused projections when the module has them."""
    fused = getattr(attn, "fused_projections", False)
    if context is None:
        if fused:
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        context = hidden_states
    elif attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    if fused:
        key, value = attn.to_kv(context).chunk(2, dim=-1)
        return attn.to_q(hidden_states), key, value
    return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)


def install_attention(denoiser: torch.nn.Module, plan: Mapping[str, tuple[str, AttentionFn]]) -> None:
    """Give each attention module named in ``plan`` (module → (label, kernel)) a processor running its
    chosen kernel; the label names the choice in answers when the kernel falls back at run time."""
    processors: dict[str, Any] = dict(denoiser.attn_processors)  # type: ignore[arg-type]
    for module_name, (label, kernel) in plan.items():
        processors[f"{module_name}.processor"] = KernelAttnProcessor(kernel, label)
    denoiser.set_attn_processor(processors)  # type: ignore[operator]


def backend_kernel(backend: str) -> AttentionFn:
    """A diffusers attention-dispatch backend as an SDPA-layout kernel, so it is checked and timed alike."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    def kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        out = dispatch_attention_fn(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            backend=backend,  # type: ignore[arg-type]
        )
        return out.transpose(1, 2)

    return kernel
