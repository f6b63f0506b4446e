"""`qelalora serve`: a static HTTP server for an export folder's page (any static server works as well).

It sends the two cross-origin isolation headers, so onnxruntime-web may use WASM threads, and the MIME types
browsers require for `.mjs` and `.wasm` files."""

from __future__ import annotations

import functools
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from qelalora.errors import UserError

from .web import PAGE


class _Handler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript", ".js": "text/javascript",
                      ".wasm": "application/wasm", ".onnx": "application/octet-stream"}

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        super().end_headers()

    def log_message(self, format, *args) -> None:  # noqa: A002  (the base class's name)
        pass


def make_server(folder: Path, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server for `folder` (not started); port 0 picks a free one."""
    if not (folder / PAGE).is_file():
        raise UserError(f"{folder} has no {PAGE}; export with --web to write the page")
    try:
        return ThreadingHTTPServer((host, port), functools.partial(_Handler, directory=str(folder)))
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port") from None
