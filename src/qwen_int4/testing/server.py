"""Run the HTTP server in a background thread of this process (tests, benchmarks on the tiny model)."""
from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def running_server(app: Any, host: str = "127.0.0.1", ready_timeout: float = 120.0,
                   wait_for_model: bool = True) -> Iterator[str]:
    """Serve `app` with uvicorn on an ephemeral port; yield its base URL once /health says 200
    (or, without wait_for_model, once it answers at all); stop the server after."""
    import uvicorn

    port = free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                          timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    base = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except urllib.error.HTTPError as exc:  # 503 while loading
                if not wait_for_model:
                    break
                body = exc.read().decode(errors="replace")
                if '"failed"' in body:
                    raise RuntimeError(f"the server at {base} failed to load its model: {body}") from None
            except (urllib.error.URLError, ConnectionError):  # not listening yet
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the server at {base} did not become healthy in {ready_timeout} s")
            time.sleep(0.05)
        yield base
    finally:
        server.should_exit = True
        thread.join(30)
