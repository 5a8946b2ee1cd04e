"""`hwr serve MODEL`: the model behind an HTTP API and a draw-a-digit page, on uvicorn.

fastapi, uvicorn and python-multipart are the optional extra `hwr-dist[serve]`; they are imported
here, when the command runs, so `hwr --help` and the other commands never pay for them.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
from importlib.util import find_spec
from pathlib import Path

from hwr_dist.errors import HwrError

SERVE_EXTRA = ("hwr serve needs the optional packages fastapi, uvicorn and python-multipart: "
               "pip install 'hwr-dist[serve]'")
GRACEFUL_S = 30  # after SIGTERM, in-flight requests get this long to finish
# One intra-op thread for the forward pass: for a small CNN the pass is a small part of a request's
# CPU time (decoding, preprocessing and HTTP are most of it), and a second thread spin-waits on the
# cores the preprocessing threads need (bench/RESULTS.md, "Serving"). More cores: use --workers.
INFERENCE_THREADS = 1


def serve(model: Path, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 64, max_wait_ms: float = 5.0,
          workers: int = 1) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise HwrError(SERVE_EXTRA) from None
    if not (find_spec("python_multipart") or find_spec("multipart")):  # python-multipart's new and old names
        raise HwrError(SERVE_EXTRA)
    if not 0 <= port <= 65535 or workers < 1 or max_batch < 1 or max_wait_ms < 0:
        raise HwrError("--port must be 0..65535, --workers and --max-batch at least 1, --max-wait-ms at least 0")
    # uvicorn drains in-flight requests on SIGTERM, then raises the signal again with the handler found
    # at start: this one, so a drained server exits 0 (and a SIGTERM while loading exits 0 too).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    from hwr_dist.serve.app import SETTINGS_ENV, app_from_env, create_app, set_threads

    settings = {"model": str(Path(model).absolute()), "max_batch": max_batch, "max_wait_ms": max_wait_ms,
                "threads": INFERENCE_THREADS}
    os.environ[SETTINGS_ENV] = json.dumps(settings)  # worker processes build their app from it
    set_threads(INFERENCE_THREADS)
    # a bad model fails here, as one error line, before the port is bound
    app = create_app(settings["model"], max_batch, max_wait_ms, inference_threads=INFERENCE_THREADS)
    served = app.state.hwr.served
    sock = listen(host, port)
    port = sock.getsockname()[1]  # --port 0: the free port found
    where = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    print(f"serving {served.file} ({served.format}, {served.id}, {len(served.classes)} classes) on {where} "
          f"with {workers} worker{'s' if workers > 1 else ''}; max batch {max_batch}, max wait {max_wait_ms:g} ms; "
          f"page at {where}/, OpenAPI schema at {where}/openapi.json", file=sys.stderr, flush=True)
    options = {"access_log": False, "log_level": "info", "timeout_graceful_shutdown": GRACEFUL_S,
               "server_header": False}
    if workers == 1:
        # uvicorn serves on the socket bound above: no second start can take the port in between.
        server = uvicorn.Server(uvicorn.Config(app, **options))
        server.run(sockets=[sock])
        if not server.started:  # the app's start-up failed; uvicorn has said why
            sys.exit(3)
        return
    # Several workers: uvicorn's supervisor binds the port itself, at once; the check above names a port in use.
    sock.close()
    uvicorn.run(f"{app_from_env.__module__}:{app_from_env.__name__}", factory=True, host=host, port=port,
                workers=workers, **options)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, set up as uvicorn sets up its own, or one error line: a port in
    use (another `hwr serve`, say) would otherwise end in uvicorn's log lines and exit status 3."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # listening at once: a second server started now finds the port taken
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise HwrError(f"port {port} on {host} is already in use (another hwr serve?); stop that server or "
                           "pass another --port") from None
        raise HwrError(f"cannot listen on {host}:{port} ({e.strerror or e}); check --host and --port") from None
    return sock
