"""Start the ``tritonserver`` shipped in the nvidia-pytriton wheel on a built repository.

    python -m cxr_sr.builders.serve --repository build/model_repository_cpu

Binds 127.0.0.1 by default, waits until the server and ``cxr_sr`` are ready, and stops the
server cleanly on Ctrl-C / SIGTERM. :class:`TritonServer` is the same thing as a context
manager (used by the demo, the tests and the benchmarks).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError:
        raise RuntimeError("nvidia-pytriton is not installed: pip install -e '.[serve]'") from None
    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM the server if the process that started it dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def backend_dir(root: Path, dest: Path) -> Path:
    """A backend folder holding the Python backend and the stub for this Python."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise RuntimeError(f"the pytriton wheel has no Python backend stub for Python {version}")
    python = dest / "python"
    python.mkdir(parents=True, exist_ok=True)
    for src in (root / "backends" / "python").iterdir():
        if src.is_file():
            shutil.copy2(src, python / src.name)
    shutil.copy2(stub, python / stub.name)
    return dest


class TritonServer:
    """A tritonserver process on 127.0.0.1; ``with TritonServer(repo) as s: s.http_url``."""

    def __init__(
        self,
        repository: str | Path,
        *,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        log_verbose: int = 0,
        extra_args: list[str] | None = None,
        log_file: str | Path | None = None,
    ):
        self.repository = Path(repository).resolve()
        if not (self.repository / "cxr_sr" / "config.pbtxt").is_file():
            raise FileNotFoundError(
                f"{self.repository} is not a built repository (no cxr_sr/config.pbtxt); "
                "run `python -m cxr_sr.builders.build` first"
            )
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args or [])
        self.log_file = Path(log_file) if log_file else None
        self.process: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self, backends: Path) -> list[str]:
        root = pytriton_root()
        return [
            str(root / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--cache-directory={root / 'caches'}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--model-control-mode=none",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]

    def start(self, timeout_s: float = 120.0) -> TritonServer:
        root = pytriton_root()
        self._tmp = tempfile.TemporaryDirectory(prefix="cxr-sr-triton-")
        backends = backend_dir(root, Path(self._tmp.name) / "backends")
        env = dict(os.environ)
        # the stub runs the first `python3` on PATH: make it this environment's
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        # the copied stub no longer finds the wheel's bundled libraries through its rpath
        libs = root.parent.parent / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p
        )
        out = open(self.log_file, "w") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            self.command(backends),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        url = f"http://{self.http_url}/v2/models/cxr_sr/ready"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = ""
                if self.log_file and self.log_file.is_file():
                    tail = "\n" + "\n".join(self.log_file.read_text().splitlines()[-20:])
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode}{tail}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"tritonserver was not ready within {timeout_s:.0f} s")

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._tmp:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _port(value: str | None) -> int | None:
    return int(value) if value else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--repository",
        type=Path,
        default=Path("build/model_repository_cpu"),
        help="built model repository (default: %(default)s)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: %(default)s; 0.0.0.0 exposes the server)",
    )
    p.add_argument(
        "--http-port",
        type=int,
        default=_port(os.environ.get("HTTP_PORT")) or 8000,
        help="HTTP port (env HTTP_PORT, default 8000)",
    )
    p.add_argument(
        "--grpc-port",
        type=int,
        default=_port(os.environ.get("GRPC_PORT")) or 8001,
        help="gRPC port (env GRPC_PORT, default 8001)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=_port(os.environ.get("METRICS_PORT")) or 8002,
        help="metrics port (env METRICS_PORT, default 8002)",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    args = p.parse_args(argv)
    server = TritonServer(
        args.repository,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_verbose=args.log_verbose,
    )
    stop = {"now": False}

    def _stop(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        server.start(args.timeout)
    except (RuntimeError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"tritonserver ready: HTTP {server.http_url}  gRPC {server.grpc_url}  "
        f"metrics {server.host}:{server.metrics_port}  (Ctrl-C stops it)",
        flush=True,
    )
    try:
        while not stop["now"] and server.process.poll() is None:
            time.sleep(0.5)
    finally:
        server.stop()
    print("tritonserver stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
