"""What `decoderkit serve` does around the server itself: claim the port first, say what is served, report errors.

The port is bound before the model loads, so a busy port fails in a moment instead of after the load; uvicorn then
serves on that socket.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import socket
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from decoderkit.cli.common import CLIError


def port_number(text: str) -> int:
    """`--port`: 0 (any free port) to 65535."""
    if not text.strip().isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [0, 65535], got {text!r}")
    return int(text)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when `host` is an IPv6 address); CLIError naming the flags when the
    address is taken or cannot be used."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as err:
        raise CLIError(f"--host {host}: cannot resolve it ({err.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise CLIError(f"--port {port}: address {host}:{port} is already in use; stop the other server or "
                           "choose another --port") from None
        if err.errno == errno.EACCES:
            raise CLIError(f"--port {port}: permission denied (ports below 1024 need privileges)") from None
        raise CLIError(f"--host {host} --port {port}: cannot listen there ({err.strerror})") from None
    sock.set_inheritable(True)
    return sock


def quantization_summary(model: Any) -> str:
    """The weight formats of the model's linear layers: 'none' for float, else e.g. 'int4 (group 32)'."""
    from decoderkit.layers.quantized import Int4Linear, QuantizedLinear

    def kind(m: QuantizedLinear) -> str:
        if isinstance(m, Int4Linear):
            return f"int4 (group {m.group_size})"
        # int8 is per output channel, or (kept from a GGUF Q8_0 file) per block of inputs
        group = getattr(m, "group_size", None)
        return "int8" if group is None or group == m.in_features else f"int8 (group {group})"

    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    kinds = Counter(kind(m) for m in layers)
    summary = ", ".join(kind for kind, _ in kinds.most_common()) or "none"
    modes = sorted({m.activations for m in layers} - {"float"})
    return summary + (f", {'/'.join(modes)} activations" if modes else "")


def start_line(names: list[str], path: Any, model: Any, threads: int, context: int, sock: socket.socket) -> str:
    """One line saying what is served, how, and where."""
    host, port = sock.getsockname()[:2]
    where = f"[{host}]" if ":" in host else host
    dtype = str(model.dtype).removeprefix("torch.")
    served = names[0] + (f" (+ adapters: {', '.join(names[1:])})" if len(names) > 1 else "")
    return (f"decoderkit serve: serving {served} from {path} on {model.device}, dtype {dtype}, quantization "
            f"{quantization_summary(model)}, {threads} thread{'s' if threads != 1 else ''}, context {context} tokens, "
            f"at http://{where}:{port}/v1")


@contextlib.contextmanager
def serve_errors(verbose: bool) -> Iterator[None]:
    """The CLI's error contract around the server: one line on stderr and status 1 for an error (the traceback with
    `--verbose`), 130 on Ctrl-C before the server runs (uvicorn handles it after)."""
    from decoderkit.cli.common import EXIT_ERROR, EXIT_INTERRUPTED, report_error

    try:
        yield
    except KeyboardInterrupt:
        print("\ndecoderkit serve: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as err:  # noqa: BLE001 - the boundary where any failure becomes one line
        report_error("decoderkit serve", err, verbose)
        raise SystemExit(EXIT_ERROR) from None


ASGIReceive = Callable[[], Awaitable[dict]]
ASGISend = Callable[[dict], Awaitable[None]]
ROUTED_PATHS = ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize")


class ModelRouter:
    """One server for several models (the base and each `--adapter NAME=DIR`), as vLLM's `--lora-modules`.

    Each model is its own app over its own engine (the adapter merged into a copy of the weights: per-request
    adapters inside one batch are not something the engine does). A request's `model` field picks the app;
    /v1/models lists them all; anything else (/health, /metrics) is the base model's.
    """

    def __init__(self, apps: dict[str, Any], max_body_bytes: int) -> None:
        self.apps = apps
        self.base = next(iter(apps.values()))
        self.limit = max_body_bytes

    async def __call__(self, scope: dict, receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in ROUTED_PATHS:
            await self._routed(scope, receive, send)
        elif scope["type"] == "http" and scope["path"] == "/v1/models":
            await self._models(scope, receive, send)
        else:
            await self.base(scope, receive, send)

    async def _lifespan(self, receive: ASGIReceive, send: ASGISend) -> None:
        async with contextlib.AsyncExitStack() as stack:
            await receive()  # lifespan.startup
            try:
                for app in self.apps.values():
                    await stack.enter_async_context(app.router.lifespan_context(app))
            except Exception as err:  # noqa: BLE001 - reported to the server, which exits
                await send({"type": "lifespan.startup.failed", "message": str(err)})
                return
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})

    async def _routed(self, scope: dict, receive: ASGIReceive, send: ASGISend) -> None:
        chunks, size, more = [], 0, True
        while more and size <= self.limit:  # past the limit the app answers 413 from what it gets
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
        body = b"".join(chunks)
        app = self.base
        try:
            name = json.loads(body).get("model")
        except (ValueError, AttributeError):
            name = None
        if isinstance(name, str):
            app = next((a for a in self.apps.values() if a.state.settings.accepts(name)), None)
            if app is None:
                await self._not_found(name, send)
                return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": more}
            return await receive()

        await app(scope, replay, send)

    async def _not_found(self, name: str, send: ASGISend) -> None:
        from decoderkit.serve.protocol import error_body

        served = ", ".join(f"`{n}`" for n in self.apps)
        payload = json.dumps(error_body(f"The model `{name}` does not exist. This server serves {served}.",
                                        "invalid_request_error", "model", "model_not_found")).encode()
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})

    async def _models(self, scope: dict, receive: ASGIReceive, send: ASGISend) -> None:
        """Every app's /v1/models answer, their cards in one list (an error, such as 401, as the base gives it)."""
        answers = []
        for app in self.apps.values():
            start: dict = {}
            parts: list[bytes] = []

            async def capture(message: dict, start: dict = start, parts: list[bytes] = parts) -> None:
                if message["type"] == "http.response.start":
                    start.update(message)
                else:
                    parts.append(message.get("body", b""))

            await app(scope, receive, capture)
            answers.append((start, b"".join(parts)))
        start, body = answers[0]
        if start.get("status") == 200:
            listing = json.loads(body)
            listing["data"] = [card for _, b in answers for card in json.loads(b)["data"]]
            body = json.dumps(listing).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({"type": "http.response.start", "status": start.get("status", 500),
                    "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
