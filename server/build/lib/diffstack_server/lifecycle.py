"""Model lifecycle for admins: LoadModel, UnloadModel and FreeMemory.

They change what the server holds in memory, so they need the admin token: the
:class:`~diffstack_server.interceptors.AdminTokenInterceptor` checks it on every DiagnosticsService
call, and without ``server.admin_token`` configured these three are refused outright
(PERMISSION_DENIED), while the read-only diagnostics stay open. Loading goes through the engine's own
cap on loaded models (``engine.max_loaded_models``, ``engine.max_models_bytes``): the least recently
used idle models make room, and a load that finds every model in use is RESOURCE_EXHAUSTED. The
device work runs on the engine worker's device thread, like every load.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from diffstack.errors import FieldViolation, InvalidRequest, PermissionDenied
from diffstack_client.v1 import diagnostics_pb2
from diffstack_server import convert

if TYPE_CHECKING:
    from diffstack_server.servicers import Runtime


class ModelLifecycle:
    """Loads and unloads models at an admin's request; the handlers of the three RPCs call it."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def _require_admin(self) -> None:
        if not self.runtime.settings.server.admin_token:
            raise PermissionDenied(
                "loading and unloading models needs an admin token: set server.admin_token "
                "(DIFFSTACK_SERVER__ADMIN_TOKEN) and send 'authorization: Bearer <token>'"
            )

    async def load(self, request: diagnostics_pb2.LoadModelRequest) -> diagnostics_pb2.LoadModelResponse:
        self._require_admin()
        engine = self.runtime.started_engine()
        key = engine.resolve(request.model)
        held = engine.pin(key)
        if held is not None:
            engine.unpin(held)
        model = await asyncio.wrap_future(self.runtime.worker.checkout(request.model, may_load=True))
        engine.unpin(model)
        return diagnostics_pb2.LoadModelResponse(model=self._listing(key), loaded_now=held is None)

    async def unload(
        self, request: diagnostics_pb2.UnloadModelRequest
    ) -> diagnostics_pb2.UnloadModelResponse:
        self._require_admin()
        engine = self.runtime.started_engine()
        if not request.model:
            raise InvalidRequest(
                FieldViolation("model", "name the model to unload; the default model stays loaded")
            )
        key = engine.resolve(request.model)
        unloaded = await asyncio.wrap_future(self.runtime.worker.submit(engine.unload, key))
        return diagnostics_pb2.UnloadModelResponse(unloaded=unloaded)

    async def free_memory(
        self, request: diagnostics_pb2.FreeMemoryRequest
    ) -> diagnostics_pb2.FreeMemoryResponse:
        self._require_admin()
        engine = self.runtime.started_engine()
        before = {m.name: m.memory.total_bytes for m in engine.models() if m.memory is not None}
        unloaded = await asyncio.wrap_future(self.runtime.worker.submit(engine.free_memory))
        return diagnostics_pb2.FreeMemoryResponse(
            unloaded=unloaded, freed_bytes=sum(before.get(key, 0) for key in unloaded)
        )

    def _listing(self, key: str) -> diagnostics_pb2.Model:
        engine = self.runtime.started_engine()
        listing = next(m for m in engine.models() if m.name == key)
        return convert.model_message(listing)
