"""A tiny in-process server speaking the KServe v2 HTTP protocol, for what a real
tritonserver cannot show: what a client put on the wire, and faults on demand.

Its "model" is bicubic upsampling (``cxr_sr.imaging.bicubic_baseline``), any LR side within
``[min_side, max_side]``. Faults: the first ``unavailable`` inference requests get HTTP 503,
the next ``resets`` have their connection closed without an answer (a reset, as a
restarting server gives), ``config_after_503`` replaces the config at a 503 (a server
restarted with another model), and a request with ``steps == 999`` gets a 400. Every inference
request is logged in ``requests`` (batch, shape, parameters, status).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from cxr_sr.imaging import bicubic_baseline


def model_config(min_side: int = 16, max_side: int = 64, identity: dict | None = None) -> dict:
    """The served config's JSON: dynamic sides and their limits (and a model identity)."""
    params = {
        "lr_min_side": {"string_value": str(min_side)},
        "lr_max_side": {"string_value": str(max_side)},
    }
    for key, value in (identity or {}).items():
        params[key] = {"string_value": value}
    return {
        "name": "cxr_sr",
        "max_batch_size": 8,
        "input": [{"name": "LR", "data_type": "TYPE_FP32", "dims": [1, -1, -1]}],
        "output": [{"name": "SR", "data_type": "TYPE_FP32", "dims": [1, -1, -1]}],
        "parameters": params,
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeTriton  # set per server

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, code: int, body: bytes, header_length: int | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if header_length is not None:
            self.send_header("Inference-Header-Content-Length", str(header_length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/v2/models/cxr_sr/config":
            self._send(200, json.dumps(self.fake.config).encode())
            return
        ok = self.path in ("/v2/health/live", "/v2/health/ready", "/v2/models/cxr_sr/ready")
        self._send(200 if ok else 404, b"")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path != "/v2/models/cxr_sr/infer":
            self._send(404, json.dumps({"error": "unknown model"}).encode())
            return
        n_json = int(self.headers.get("Inference-Header-Content-Length", len(body)))
        request = json.loads(body[:n_json])
        (inp,) = request["inputs"]
        lr = np.frombuffer(body[n_json:], dtype=np.float32).reshape(inp["shape"])
        params = request.get("parameters", {})
        status = self.fake.next_status(params)
        self.fake.log(
            {"batch": lr.shape[0], "shape": lr.shape, "parameters": params, "status": status}
        )
        if status == "reset":
            self.close_connection = True
            self.connection.close()
            return
        if status == 503:
            self._send(503, json.dumps({"error": "Server unavailable (test)"}).encode())
            return
        if status == 400:
            msg = {"error": "steps (999) exceeds the 300 timesteps the plan covers"}
            self._send(400, json.dumps(msg).encode())
            return
        time.sleep(self.fake.delay_s)
        sr = bicubic_baseline(lr).astype(np.float32)
        raw = sr.tobytes()
        header = json.dumps(
            {
                "model_name": "cxr_sr",
                "outputs": [
                    {
                        "name": "SR",
                        "datatype": "FP32",
                        "shape": list(sr.shape),
                        "parameters": {"binary_data_size": len(raw)},
                    }
                ],
            }
        ).encode()
        self._send(200, header + raw, header_length=len(header))


class FakeTriton:
    """The fake server on 127.0.0.1 and a free port; a context manager (started / stopped)."""

    def __init__(
        self,
        config: dict | None = None,
        *,
        unavailable: int = 0,
        resets: int = 0,
        delay_s: float = 0.0,
        config_after_503: dict | None = None,
    ) -> None:
        self.config = config or model_config()
        self.config_after_503 = config_after_503  # as a server restarted with another model
        self.unavailable, self.resets, self.delay_s = unavailable, resets, delay_s
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.url = f"127.0.0.1:{self._server.server_address[1]}"

    def next_status(self, params: dict) -> int | str:
        with self._lock:
            if self.unavailable > 0:
                self.unavailable -= 1
                if self.config_after_503 is not None:
                    self.config = self.config_after_503
                return 503
            if self.resets > 0:
                self.resets -= 1
                return "reset"
        return 400 if params.get("steps") == 999 else 200

    def log(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(entry)

    def __enter__(self) -> FakeTriton:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
