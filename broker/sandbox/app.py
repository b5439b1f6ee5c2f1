"""The sandbox's HTTP face: OpenRouter's routes under ``/api/v1``, fault injection, ``Sandbox``."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from broker.sandbox import bodies, chat
from broker.sandbox.faults import Fault, FaultRules
from broker.sandbox.state import SandboxState
from broker.sandbox.wire import ApiError, error_response, json_response, read_json_object

logger = logging.getLogger("keybroker.sandbox")

API: Final = "/api/v1"
CONTROL: Final = "/_sandbox"
TOTAL_CREDITS: Final = 1000
_SHUTDOWN_SECONDS: Final = 1.0
_BANNER: Final = (
    "THIS IS THE OPENROUTER SANDBOX at %s, NOT the real OpenRouter. "
    "Its keys are fake, no model is called and no real money is involved."
)


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class _Api:
    """The route handlers, sharing one state, one fault list and the management key."""

    def __init__(self, state: SandboxState, faults: FaultRules, management_key: str) -> None:
        self.state = state
        self.faults = faults
        self._management_key = management_key.encode()
        self.stopping = asyncio.Event()

    def _is_management_key(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self._management_key)

    def _require_management(self, request: web.Request) -> None:
        token = _bearer(request)
        if token is None:
            raise ApiError(401, "No auth credentials found")
        if self._is_management_key(token):
            return
        if self.state.key_for_secret(token) is not None:
            raise ApiError(403, "Only management keys can perform this operation")
        raise ApiError(401, "User not found.")

    # --- key management ------------------------------------------------------------------------

    async def list_keys(self, request: web.Request) -> web.Response:
        self._require_management(request)
        offset, include_disabled = bodies.parse_list_query(request.query)
        keys = self.state.list_keys(offset=offset, include_disabled=include_disabled)
        now = self.state.now()
        return json_response({"data": [key.to_json(now) for key in keys]})

    async def create_key(self, request: web.Request) -> web.Response:
        self._require_management(request)
        new = bodies.parse_new_key(await read_json_object(request))
        key = self.state.create_key(new)
        return json_response({"data": key.to_json(self.state.now()), "key": key.secret}, status=201)

    async def get_key(self, request: web.Request) -> web.Response:
        self._require_management(request)
        key = self.state.get_key(request.match_info["hash"])
        return json_response({"data": key.to_json(self.state.now())})

    async def update_key(self, request: web.Request) -> web.Response:
        self._require_management(request)
        self.state.get_key(request.match_info["hash"])  # 404 before 400, as the real API does
        update = bodies.parse_key_update(await read_json_object(request))
        key = self.state.update_key(request.match_info["hash"], update)
        return json_response({"data": key.to_json(self.state.now())})

    async def delete_key(self, request: web.Request) -> web.Response:
        self._require_management(request)
        self.state.delete_key(request.match_info["hash"])
        return json_response({"deleted": True})

    async def credits(self, request: web.Request) -> web.Response:
        self._require_management(request)
        usage = self.state.total_usage()
        return json_response({"data": {"total_credits": TOTAL_CREDITS, "total_usage": usage}})

    # --- any key -------------------------------------------------------------------------------

    async def current_key(self, request: web.Request) -> web.Response:
        token = _bearer(request)
        if token is None:
            raise ApiError(401, "No auth credentials found")
        if self._is_management_key(token):
            return json_response({"data": self._management_key_info()})
        key = self.state.inference_key(token)
        now = self.state.now()
        info = {
            "label": key.label,
            **key.usage_json(now),
            "is_free_tier": False,
            "is_management_key": False,
            "is_provisioning_key": False,
            "creator_user_id": None,
            "expires_at": key.to_json(now)["expires_at"],
            "workspace_id": key.workspace_id,
        }
        return json_response({"data": info})

    def _management_key_info(self) -> dict[str, object]:
        zero = 0
        return {
            "label": "sandbox management key",
            "limit": None,
            "limit_remaining": None,
            "limit_reset": None,
            "include_byok_in_limit": False,
            **{name: zero for name in ("usage", "usage_daily", "usage_weekly", "usage_monthly")},
            **{f"byok_{name}": zero for name in ("usage", "usage_daily", "usage_weekly", "usage_monthly")},
            "is_free_tier": False,
            "is_management_key": True,
            "is_provisioning_key": True,
            "creator_user_id": None,
            "expires_at": None,
            "workspace_id": self.state.workspace_id,
        }

    async def chat_completions(self, request: web.Request) -> web.Response:
        token = _bearer(request)
        if token is None:
            raise ApiError(401, "No auth credentials found")
        if self._is_management_key(token):
            raise ApiError(403, "Management keys cannot be used for completions")
        key = self.state.inference_key(token)
        chat_request = chat.parse_chat_request(await read_json_object(request))
        self.state.check_limit(key)
        usage = chat.usage_for(chat_request)
        self.state.charge(key, usage.cost)
        return json_response(chat.completion_json(chat_request, usage, self.state.now()))

    # --- control plane for tests -------------------------------------------------------------

    async def add_fault(self, request: web.Request) -> web.Response:
        self._require_management(request)
        fault = Fault.from_json(await read_json_object(request))
        self.faults.add(fault)
        return json_response({"data": fault.to_json()}, status=201)

    async def list_faults(self, request: web.Request) -> web.Response:
        self._require_management(request)
        pending = [{**fault.to_json(), "remaining": left} for fault, left in self.faults.pending()]
        return json_response({"data": pending})

    async def clear_faults(self, request: web.Request) -> web.Response:
        self._require_management(request)
        return json_response({"cleared": self.faults.clear()})

    async def dump_keys(self, request: web.Request) -> web.Response:
        self._require_management(request)
        now = self.state.now()
        keys = [{**key.to_json(now), "deleted": key.deleted} for key in self.state.all_keys()]
        return json_response({"data": keys})

    # --- middlewares ---------------------------------------------------------------------------

    @web.middleware
    async def errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every failure leaves as an OpenRouter-style error body, unknown routes included."""
        try:
            return await handler(request)
        except ApiError as error:
            return error_response(error.status, error.message, error.error_type)
        except web.HTTPException as error:
            if error.status < 400:
                raise
            return error_response(error.status, error.reason)

    @web.middleware
    async def inject_faults(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(CONTROL + "/"):
            return await handler(request)
        fault = self.faults.take(request.method, request.path)
        if fault is None:
            return await handler(request)
        if fault.delay_seconds and not await self._pause(fault.delay_seconds):
            return _drop_connection(request)
        if fault.status is not None:
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
            return error_response(fault.status, fault.message, headers=headers)
        if fault.drop_response:
            try:
                await handler(request)  # the operation really happens; only its answer is lost
            except (ApiError, web.HTTPException):
                pass
            return _drop_connection(request)
        return await handler(request)

    async def _pause(self, seconds: float) -> bool:
        """Sleep, cut short by ``stop()``; ``False`` when the sandbox is stopping."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            return True
        return False


def _drop_connection(request: web.Request) -> web.Response:
    """Close the connection with no answer; the response returned is never written."""
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=204)


def _build_app(api: _Api) -> web.Application:
    app = web.Application(middlewares=[api.errors, api.inject_faults])
    routes = app.router
    routes.add_get(f"{API}/keys", api.list_keys)
    routes.add_post(f"{API}/keys", api.create_key)
    routes.add_get(f"{API}/keys/{{hash}}", api.get_key)
    routes.add_patch(f"{API}/keys/{{hash}}", api.update_key)
    routes.add_delete(f"{API}/keys/{{hash}}", api.delete_key)
    routes.add_get(f"{API}/key", api.current_key)
    routes.add_get(f"{API}/credits", api.credits)
    routes.add_post(f"{API}/chat/completions", api.chat_completions)
    routes.add_post(f"{CONTROL}/faults", api.add_fault)
    routes.add_get(f"{CONTROL}/faults", api.list_faults)
    routes.add_delete(f"{CONTROL}/faults", api.clear_faults)
    routes.add_get(f"{CONTROL}/keys", api.dump_keys)
    return app


class Sandbox:
    """A local OpenRouter over real HTTP. ``state`` and ``faults`` are there for tests to steer."""

    def __init__(self, management_key: str, *, clock: Callable[[], datetime] | None = None) -> None:
        if not management_key:
            raise ValueError("the sandbox needs a management key")
        self.state = SandboxState(clock)
        self.faults = FaultRules()
        self.management_key = management_key
        self._api = _Api(self.state, self.faults, management_key)
        self._runner: web.AppRunner | None = None
        self.base_url: str | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 = any free port); returns the base URL ending in ``/api/v1``."""
        if self._runner is not None:
            raise RuntimeError("the sandbox is already running")
        runner = web.AppRunner(_build_app(self._api), shutdown_timeout=_SHUTDOWN_SECONDS)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._api.stopping.clear()
        self._runner = runner
        bound_port = runner.addresses[0][1]
        self.base_url = f"http://{_url_host(host)}:{bound_port}{API}"
        logger.warning(_BANNER, self.base_url)
        return self.base_url

    async def stop(self) -> None:
        """Stop listening; requests held by a delay fault are cut short."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._api.stopping.set()
        await runner.cleanup()
        self.base_url = None


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - turning a wildcard into a reachable address
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; an empty host means 127.0.0.1)."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"listen address must be HOST:PORT, got {listen!r}")
    host = host.removeprefix("[").removesuffix("]") or "127.0.0.1"
    return host, int(port_text)


async def run_sandbox(listen: str, management_key: str) -> None:
    """Serve the sandbox on ``listen`` (``HOST:PORT``) until cancelled."""
    host, port = parse_listen(listen)
    sandbox = Sandbox(management_key)
    await sandbox.start(host, port)
    try:
        await asyncio.Event().wait()
    finally:
        await sandbox.stop()
