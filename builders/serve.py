"""Start the ``tritonserver`` shipped in the nvidia-pytriton wheel on a built repository.

    python -m cxr_sr.builders.serve --repository build/model_repository_cpu [-- TRITON_ARGS]

Binds 127.0.0.1 by default, waits until the server and ``cxr_sr`` are ready, and stops the
server on Ctrl-C / SIGTERM within a few seconds (``--exit-timeout-secs``, then SIGKILL of the
whole process group, Python stubs included). :class:`TritonServer` is the same thing as a
context manager (used by the demo, the tests and the benchmarks).

Health: a watchdog sends one small real inference through ``cxr_sr`` every
``--probe-interval`` seconds (:mod:`cxr_sr.builders.probe`); Triton's own ready endpoints stay
200 after a Python stub has died. Before each probe it also counts the server's Python stub
processes per model against the count it had when ready (:func:`stub_census`): with several
instances of a model the probe reaches one of them, and a dead stub of another would fail
only the requests routed to it. After ``--probe-failures`` failures in a row it restarts
tritonserver (model control stays ``none``: the whole server is the unit), or with
``--on-failure exit`` stops it and exits 1 so that a supervisor restarts the process.

Security: listening beyond loopback (``--host 0.0.0.0``) needs an admin key (environment
``CXR_ADMIN_KEY``, or a file named by ``--admin-key-file`` / ``CXR_ADMIN_KEY_FILE``): the
model-repository and shared-memory APIs then answer only requests that carry it (HTTP header
``admin-key``, gRPC metadata ``triton-grpc-protocol-admin-key``). Triton 2.51 only takes the
key on its command line, so it is in tritonserver's argv (readable in ``/proc`` by the same
user and root); it is never printed or logged, and is removed from the environment the server
and its stubs inherit. gRPC TLS: ``--grpc-tls-cert`` / ``--grpc-tls-key`` (and
``--grpc-tls-ca`` for client certificates).

Scheduling: a repository whose models ask Triton's rate limiter for resources (the cpu
target's networks: one runs at a time) is served with ``--rate-limit=execution_count``,
unless the arguments after ``--`` set ``--rate-limit`` themselves.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cxr_sr.builders.probe import probe

ADMIN_KEY_ENV = "CXR_ADMIN_KEY"
ADMIN_KEY_FILE_ENV = "CXR_ADMIN_KEY_FILE"
RESTRICTED = "model-repository,shared-memory"  # the API groups only an admin may call
EXIT_TIMEOUT_S = 5  # tritonserver --exit-timeout-secs (its default is 30)
# tritonserver --grpc-infer-allocation-pool-size (its default is 8): gRPC request/response
# states kept for reuse. A kept state keeps the tensor buffers of the largest request and
# response it has carried, so with mixed image sizes tritonserver grew until every kept state
# had carried an LR 256 image (+18-36 MiB in `make soak`, 4 MiB per SR output); with 0 each
# state is freed with its request (+0.1-1.7%, same throughput: README, "Soak")
GRPC_STATE_POOL = 0
KILL_GRACE_S = 3.0  # after the exit timeout, before SIGKILL of the process group
MMAP_THRESHOLD = 1 << 20  # bytes: glibc malloc serves larger blocks with mmap (see below)
# jemalloc for tritonserver and its stubs where it is installed (Debian's libjemalloc2), with
# unused pages returned within a second; CXR_MALLOC=system keeps glibc's malloc
JEMALLOC = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
)
JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"


def numpy_bridge_models(repository: Path, numpy_version: str) -> list[str]:
    """The models of ``repository`` that would exchange tensors through the Python backend's
    numpy bridge (``pb_utils.Tensor(name, array)`` / ``as_numpy``), if this numpy is one the
    ``nvidia-pytriton`` wheel's stub cannot read: it is built for numpy 1.x, and under numpy 2
    it read arrays with an item size of 0 (outputs arrived empty, inputs garbled; measured on
    a GPU machine with numpy 2.5). Those models are the cpu target's onnxruntime models and
    every numpy sampler loop; the torch target exchanges tensors through DLPack and is safe.
    Empty where ``numpy_version`` is 1.x."""
    if int(numpy_version.split(".")[0]) < 2:
        return []
    from cxr_sr.builders.triton_config import read_config

    names = []
    for path in sorted(Path(repository).glob("*/config.pbtxt")):
        config = read_config(path)
        onnx = any(path.parent.glob("*/model.onnx"))
        loop = (
            config.parameters["loop_device"].string_value
            if "loop_device" in config.parameters
            else ""
        )
        if config.backend == "python" and (onnx or loop == "numpy"):
            names.append(path.parent.name)
    return names


_LOAD_FAILURE = re.compile(r"failed to load '([^']+)' version \d+: (.+)")


def load_failures(log: str) -> dict[str, str]:
    """Models that failed to load, from tritonserver's log: model name -> the first line of
    Triton's reason (e.g. ``Internal: ... INVALID_PROTOBUF ... model.onnx``)."""
    found = {}
    for match in _LOAD_FAILURE.finditer(log):
        reason = match.group(2).split("\\n")[0].strip().rstrip('"').strip()
        found.setdefault(match.group(1), reason)
    return found


def pytriton_root() -> Path:
    """The ``tritonserver`` folder inside the nvidia-pytriton wheel, found without importing
    pytriton (its ``__init__`` loads pytriton's own client stack: pyzmq, sh, ...)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed: pip install -e '.[serve]'")
    return Path(next(iter(spec.submodule_search_locations))).resolve() / "tritonserver"


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM the server if the process that started it dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except OSError:
        pass


_HANDED_OUT: collections.deque[int] = collections.deque(maxlen=256)
_HANDED_OUT_LOCK = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, and not one this process handed out recently: the kernel
    may give the same ephemeral port to two binds in a row, and a server asking for HTTP and
    gRPC ports that way once got one port for both (tritonserver refused to start)."""
    with _HANDED_OUT_LOCK:
        for _ in range(64):
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if port not in _HANDED_OUT:
                break
        _HANDED_OUT.append(port)
        return port


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; False for any other name or address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_admin_key(key_file: str | Path | None = None, env: dict | None = None) -> str | None:
    """The admin key: the first line of ``key_file`` (or of the file named by
    ``CXR_ADMIN_KEY_FILE``), else ``CXR_ADMIN_KEY``; None when neither is set.

    ValueError when the file is unreadable or the key is empty or unusable (Triton splits its
    option on ``,``, ``:`` and ``=``).
    """
    env = os.environ if env is None else env
    key_file = key_file or env.get(ADMIN_KEY_FILE_ENV)
    if key_file:
        try:
            key = Path(key_file).read_text().strip()
        except OSError as err:
            raise ValueError(f"cannot read the admin key file {key_file}: {err.strerror}") from None
        where = f"the admin key file {key_file}"
    else:
        key = env.get(ADMIN_KEY_ENV, "").strip()
        if not key:
            return None
        where = ADMIN_KEY_ENV
    if not key:
        raise ValueError(f"{where} is empty")
    if any(c in key for c in ",:= \t\n") or len(key) < 16:
        raise ValueError(
            f"{where}: the key must be at least 16 characters without spaces, ',', ':' or '=' "
            "(e.g. `openssl rand -hex 32`)"
        )
    return key


@dataclass(frozen=True)
class GrpcTls:
    """gRPC TLS: server certificate and key (PEM); ``ca`` set: clients must present a
    certificate signed by it (mutual TLS)."""

    cert: Path
    key: Path
    ca: Path | None = None

    def __post_init__(self) -> None:
        for name in ("cert", "key", "ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"gRPC TLS {name} file not found: {path}")

    def args(self) -> list[str]:
        out = [
            "--grpc-use-ssl=true",
            f"--grpc-server-cert={Path(self.cert).resolve()}",
            f"--grpc-server-key={Path(self.key).resolve()}",
        ]
        if self.ca is not None:
            out += [f"--grpc-root-cert={Path(self.ca).resolve()}", "--grpc-use-ssl-mutual=true"]
        return out


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


def rate_limited(repository: str | Path) -> bool:
    """Whether a model of ``repository`` asks Triton's rate limiter for resources (the cpu
    target's networks, ``builders.build --cpu-rate-limit``): such a repository is served with
    ``--rate-limit=execution_count``, without which Triton ignores the resources."""
    configs = Path(repository).glob("*/config.pbtxt")
    return any(re.search(r"^\s*rate_limiter\s*\{", c.read_text(), re.M) for c in configs)


class TritonServer:
    """A tritonserver process on 127.0.0.1; ``with TritonServer(repo) as s: s.http_url``.

    ``binary`` None: the nvidia-pytriton wheel's tritonserver with its Python backend (this
    environment's Python runs the stubs); a path: that tritonserver with its own backends
    (the NGC image's ``/opt/tritonserver/bin/tritonserver``). A ``host`` beyond loopback
    needs ``admin_key`` (ValueError otherwise); see the module docstring.
    """

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
        admin_key: str | None = None,
        grpc_tls: GrpcTls | None = None,
        exit_timeout_s: int = EXIT_TIMEOUT_S,
        binary: str | Path | None = None,
        grpc_state_pool: int = GRPC_STATE_POOL,
    ):
        self.repository = Path(repository).resolve()
        if not (self.repository / "cxr_sr" / "config.pbtxt").is_file():
            raise FileNotFoundError(
                f"{self.repository} is not a built repository (no cxr_sr/config.pbtxt); "
                "run `python -m cxr_sr.builders.build` first"
            )
        if not is_loopback(host) and not admin_key:
            raise ValueError(
                f"refusing to listen on {host} without an admin key: set {ADMIN_KEY_ENV} or "
                f"{ADMIN_KEY_FILE_ENV} (the model-repository and shared-memory APIs are then "
                "restricted to requests carrying it), or bind 127.0.0.1"
            )
        self.host = host
        # the address clients on this machine use (0.0.0.0 / :: are not connectable)
        self.local_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self.http_port = http_port or free_port(self.local_host)
        self.grpc_port = grpc_port or free_port(self.local_host)
        self.metrics_port = metrics_port or free_port(self.local_host)
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args or [])
        self.log_file = Path(log_file) if log_file else None
        self._admin_key = admin_key
        self.grpc_tls = grpc_tls
        self.exit_timeout_s = int(exit_timeout_s)
        if grpc_state_pool < 0:
            raise ValueError(f"grpc_state_pool must be >= 0, got {grpc_state_pool}")
        self.grpc_state_pool = int(grpc_state_pool)
        self.binary = Path(binary) if binary else None
        self.process: subprocess.Popen | None = None
        # Python stubs per model when the server became ready (:func:`stub_census`)
        self.stubs: collections.Counter = collections.Counter()
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._log: Path | None = None  # where this start's log goes (log_file or a temp file)

    def __repr__(self) -> str:  # never shows the admin key
        return f"TritonServer({str(self.repository)!r}, host={self.host!r})"

    @property
    def http_url(self) -> str:
        return f"{self.local_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.local_host}:{self.grpc_port}"

    @property
    def restricted(self) -> bool:
        return bool(self._admin_key)

    def command(self, backends: Path | None) -> list[str]:
        """tritonserver's argument list (holds the admin key when one is set: never log it,
        log :meth:`redacted` instead)."""
        if self.binary is None:
            root = pytriton_root()
            cmd = [
                str(root / "bin" / "tritonserver"),
                f"--backend-directory={backends}",
                f"--cache-directory={root / 'caches'}",
            ]
        else:
            cmd = [str(self.binary)]
        cmd += [
            f"--model-repository={self.repository}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--model-control-mode=none",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--grpc-infer-allocation-pool-size={self.grpc_state_pool}",
            f"--log-verbose={self.log_verbose}",
        ]
        if self._admin_key:
            # Triton 2.51 takes only this form (`<apis>:<header>=<value>`; --help's is refused)
            cmd += [
                f"--http-restricted-api={RESTRICTED}:admin-key={self._admin_key}",
                f"--grpc-restricted-protocol={RESTRICTED}:admin-key={self._admin_key}",
            ]
        if self.grpc_tls is not None:
            cmd += self.grpc_tls.args()
        own = any(a.startswith("--rate-limit=") or a == "--rate-limit" for a in self.extra_args)
        if not own and rate_limited(self.repository):
            cmd.append("--rate-limit=execution_count")  # the resources mean nothing without it
        return [*cmd, *self.extra_args]

    def redacted(self, cmd: list[str]) -> list[str]:
        """``cmd`` with the admin key replaced by ``***``."""
        if not self._admin_key:
            return list(cmd)
        return [a.replace(self._admin_key, "***") for a in cmd]

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in (ADMIN_KEY_ENV,)}
        # glibc raises its mmap threshold to the largest block freed (up to 32 MiB), after
        # which multi-MiB tensor buffers come from heap arenas that are never returned: in
        # `make soak` tritonserver then grew by one LR 256 output (4 MiB) at a time. A fixed
        # threshold keeps buffers of 1 MiB and more mmapped, so freeing returns them.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
        # and fewer malloc arenas for tritonserver's many threads, each of which otherwise
        # keeps its own free memory (Triton's docs suggest tcmalloc/jemalloc for the same)
        env.setdefault("MALLOC_ARENA_MAX", "2")
        # glibc's malloc still let tritonserver grow 11-14% over a 3-minute soak (its buffers
        # for mixed image sizes); with jemalloc returning unused pages it grew 9% and every
        # stub went back to its idle size (README, "Soak")
        jemalloc = next((p for p in JEMALLOC if Path(p).is_file()), None)
        if jemalloc and env.get("CXR_MALLOC", "jemalloc") != "system":
            env["LD_PRELOAD"] = os.pathsep.join(
                p for p in (jemalloc, env.get("LD_PRELOAD", "")) if p
            )
            env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
        if self.binary is not None:
            return env
        root = pytriton_root()
        # the stub runs the first `python3` on PATH: make it this environment's
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        # the copied stub no longer finds the wheel's bundled libraries through its rpath
        libs = root.parent.parent / "nvidia_pytriton.libs"
        # and it links libpython dynamically: give it this interpreter's own, not whichever
        # the system has (a Debian libpython with a pyenv stdlib fails to import ssl)
        own = Path(sys.base_prefix) / "lib"
        own = str(own) if any(own.glob("libpython3*.so*")) else ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(libs), own, env.get("LD_LIBRARY_PATH", "")) if p
        )
        return env

    def start(self, timeout_s: float = 120.0) -> TritonServer:
        backends = None
        self._tmp = self._tmp or tempfile.TemporaryDirectory(prefix="cxr-sr-triton-")
        if self.binary is None:
            import numpy

            broken = numpy_bridge_models(self.repository, numpy.__version__)
            if broken:
                raise RuntimeError(
                    f"numpy {numpy.__version__} is installed, but the nvidia-pytriton wheel's "
                    "Python backend is built for numpy 1.x and garbles the tensors of "
                    f"{', '.join(broken)} under numpy 2: pip install 'numpy<2' (the project's "
                    "own install pins it), or serve a --target torch repository (DLPack)"
                )
            backends = backend_dir(pytriton_root(), Path(self._tmp.name) / "backends")
        # without a log file of the caller's, the log goes to the temporary folder, so that a
        # failed start can say which model failed and why
        self._log = self.log_file or Path(self._tmp.name) / "tritonserver.log"
        out = open(self._log, "a")  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                self.command(backends),
                env=self._environment(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() kills the stubs too
                preexec_fn=_die_with_parent,
            )
        finally:
            out.close()
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        url = f"http://{self.http_url}/v2/models/cxr_sr/ready"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self._log.read_text(errors="replace") if self._log.is_file() else ""
                failures = load_failures(log)
                if failures:  # Triton exits when a model fails to load (--exit-on-error)
                    detail = "".join(f"\n  model '{m}': {why}" for m, why in failures.items())
                else:
                    lines = "\n".join(self.redacted(log.splitlines()[-20:]))
                    detail = f"; the end of its log:\n{lines}" if lines else ""
                code = self.process.returncode
                self.stop()
                raise RuntimeError(f"tritonserver exited with code {code}{detail}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        self.stubs = stub_census(self.process.pid)
                        return
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"tritonserver was not ready within {timeout_s:.0f} s")

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM, up to ``timeout_s`` (default: the exit timeout + a few seconds) for
        tritonserver to finish in-flight requests and exit, then SIGKILL for whatever is left
        of its process group (a stub that died or hangs keeps a plain shutdown waiting for
        Triton's exit timeout; stubs outliving the server are killed too)."""
        if self.process is not None:
            wait = self.exit_timeout_s + KILL_GRACE_S if timeout_s is None else timeout_s
            if self.process.poll() is None:
                _signal_group(self.process.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(wait)
            _signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if self._tmp:
            self._tmp.cleanup()
            self._tmp = None

    def restart(self, timeout_s: float = 120.0) -> TritonServer:
        """Stop and start again on the same ports (the unit of recovery: model control is
        ``none``, so a model cannot be reloaded on its own)."""
        self.stop()
        return self.start(timeout_s)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class Watchdog(threading.Thread):
    """Calls ``check`` (None: healthy, else the reason) every ``interval_s`` seconds and sets
    :attr:`tripped` after ``failures`` failures in a row; :attr:`reason` says the last one.

    Runs in its own thread so that a probe waiting on a busy server never delays shutdown.
    """

    def __init__(
        self, check: Callable[[], str | None], interval_s: float = 10.0, failures: int = 3
    ) -> None:
        super().__init__(daemon=True, name="cxr-sr-watchdog")
        if interval_s <= 0 or failures < 1:
            raise ValueError("interval_s must be > 0 and failures >= 1")
        self.check = check
        self.interval_s = interval_s
        self.failures = failures
        self.tripped = threading.Event()
        self.reason: str | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        count = 0
        while not self._halt.wait(self.interval_s):
            reason = self.check()
            if self._halt.is_set():
                return
            if reason is None:
                count = 0
                continue
            count += 1
            self.reason = reason
            print(f"[watchdog] probe failed ({count}/{self.failures}): {reason}", flush=True)
            if count >= self.failures:
                self.tripped.set()
                return

    def stop(self) -> None:
        self._halt.set()


STUB = "triton_python_backend_stub"  # the Python backend's per-instance process


def stub_model(cmdline: list[str]) -> str | None:
    """The model a Python stub process serves, from its command line
    (``triton_python_backend_stub <repository>/<model>/<version>/model.py ...``); None for
    any other process."""
    if len(cmdline) < 2 or not Path(cmdline[0]).name.startswith(STUB):
        return None
    return Path(cmdline[1]).parent.parent.name


def stub_census(pid: int, proc: Path = Path("/proc")) -> collections.Counter:
    """Living Python stub processes under the process ``pid`` (tritonserver), per model: one
    per model instance, named by :func:`stub_model`; zombies do not count. Read from
    ``/proc`` (Linux, where Triton runs), so it works in the bare NGC runtime image too."""
    parents: dict[int, int] = {}
    if not proc.is_dir():  # not Linux: nothing to count, nothing reported missing
        return collections.Counter()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    children = collections.defaultdict(list)
    for child, parent in parents.items():
        children[parent].append(child)
    census: collections.Counter = collections.Counter()
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            cmd = (proc / str(p) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        model = stub_model([os.fsdecode(part) for part in cmd])
        if model is not None:
            census[model] += 1
    return census


def missing_stubs(expected: collections.Counter, now: collections.Counter) -> str | None:
    """Which models have fewer living stubs than ``expected`` (None: none)."""
    gone = [f"{m} ({n - now[m]} of {n})" for m, n in sorted(expected.items()) if now[m] < n]
    return None if not gone else "Python stub process gone: " + ", ".join(gone)


def server_probe(server: TritonServer, timeout_s: float) -> Callable[[], str | None]:
    """The watchdog's check: every Python stub the ready server had is still alive, then one
    real inference (:func:`cxr_sr.builders.probe.probe`). The census catches what the
    inference cannot: with several instances of a model, the probe's request reaches one of
    them, and a dead stub of another fails only the requests routed to it. The expected count
    is the census taken when the server became ready (:attr:`TritonServer.stubs`)."""

    def check() -> str | None:
        gone = missing_stubs(server.stubs, stub_census(server.process.pid))
        if gone:
            return gone
        result = probe(server.http_url, timeout_s)
        return None if result.ok else result.detail

    return check


def _port(value: str | None) -> int | None:
    return int(value) if value else None


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--repository",
        type=Path,
        default=Path(os.environ.get("MODEL_REPOSITORY", "build/model_repository_cpu")),
        help="built model repository (env MODEL_REPOSITORY, default build/model_repository_cpu)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: %(default)s); anything beyond loopback needs an admin "
        f"key ({ADMIN_KEY_ENV} or {ADMIN_KEY_FILE_ENV})",
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
    p.add_argument(
        "--admin-key-file",
        type=Path,
        default=None,
        help=f"file holding the admin key (default: env {ADMIN_KEY_FILE_ENV}, else the key "
        f"itself in env {ADMIN_KEY_ENV}); never pass the key as a flag",
    )
    p.add_argument(
        "--grpc-tls-cert",
        type=Path,
        default=_env_path("CXR_GRPC_TLS_CERT"),
        help="PEM server certificate: serve gRPC over TLS (env CXR_GRPC_TLS_CERT)",
    )
    p.add_argument(
        "--grpc-tls-key",
        type=Path,
        default=_env_path("CXR_GRPC_TLS_KEY"),
        help="PEM private key of --grpc-tls-cert (env CXR_GRPC_TLS_KEY)",
    )
    p.add_argument(
        "--grpc-tls-ca",
        type=Path,
        default=_env_path("CXR_GRPC_TLS_CA"),
        help="PEM CA: clients must present a certificate it signed (mutual TLS; env "
        "CXR_GRPC_TLS_CA)",
    )
    p.add_argument(
        "--tritonserver",
        type=Path,
        default=None,
        help="tritonserver binary with its own backends (e.g. the NGC image's "
        "/opt/tritonserver/bin/tritonserver); default: the nvidia-pytriton wheel's",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
    p.add_argument(
        "--exit-timeout-secs",
        type=int,
        default=EXIT_TIMEOUT_S,
        help="seconds tritonserver may take to finish in-flight requests on stop before the "
        "process group is killed (default: %(default)s)",
    )
    p.add_argument(
        "--grpc-state-pool",
        type=int,
        default=GRPC_STATE_POOL,
        help="gRPC request/response states tritonserver keeps for reuse "
        "(--grpc-infer-allocation-pool-size); each keeps the buffers of the largest image it "
        "carried, so the default 0 frees them with their request: bounded memory under mixed "
        "image sizes, at an allocation per request (default: %(default)s)",
    )
    p.add_argument(
        "--probe-interval",
        type=float,
        default=10.0,
        help="seconds between health probes (one real inference; 0 disables the watchdog; "
        "default: %(default)s)",
    )
    p.add_argument(
        "--probe-timeout",
        type=float,
        default=30.0,
        help="seconds one probe may take, queueing behind the load included (default: %(default)s)",
    )
    p.add_argument(
        "--probe-failures",
        type=int,
        default=3,
        help="failed probes in a row that count as broken (default: %(default)s)",
    )
    p.add_argument(
        "--on-failure",
        choices=("restart", "exit"),
        default="restart",
        help="when broken: restart tritonserver here, or stop it and exit 1 for a supervisor "
        "(Docker, Kubernetes, systemd) to restart (default: %(default)s)",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        help="with --on-failure restart: give up and exit 1 after this many restarts "
        "(default: %(default)s)",
    )
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    p.add_argument(
        "--log-file", type=Path, default=None, help="tritonserver's log (default: the console)"
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = p.parse_args(argv[: len(argv) - len(extra) - 1] if "--" in argv else argv)
    args.tritonserver_args = extra  # after `--`: passed to tritonserver as they are
    return args


def server_from_args(args: argparse.Namespace) -> TritonServer:
    """The server the flags describe; ValueError / FileNotFoundError on a bad setting."""
    key = read_admin_key(args.admin_key_file)
    tls = None
    if args.grpc_tls_cert or args.grpc_tls_key:
        if not (args.grpc_tls_cert and args.grpc_tls_key):
            raise ValueError("gRPC TLS needs both --grpc-tls-cert and --grpc-tls-key")
        tls = GrpcTls(args.grpc_tls_cert, args.grpc_tls_key, args.grpc_tls_ca)
    elif args.grpc_tls_ca:
        raise ValueError("--grpc-tls-ca needs --grpc-tls-cert and --grpc-tls-key")
    return TritonServer(
        args.repository,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_verbose=args.log_verbose,
        log_file=args.log_file,
        admin_key=key,
        grpc_tls=tls,
        exit_timeout_s=args.exit_timeout_secs,
        grpc_state_pool=args.grpc_state_pool,
        binary=args.tritonserver,
        extra_args=args.tritonserver_args,
    )


def _watch(server: TritonServer, args: argparse.Namespace) -> Watchdog | None:
    if args.probe_interval <= 0:
        return None
    dog = Watchdog(
        server_probe(server, args.probe_timeout), args.probe_interval, args.probe_failures
    )
    dog.start()
    return dog


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe_failures < 1 or args.exit_timeout_secs < 0 or args.max_restarts < 0:
        print("error: --probe-failures must be >= 1, the others >= 0", file=sys.stderr)
        return 2
    try:
        server = server_from_args(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def _stop(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    restarts = 0
    try:
        server.start(args.timeout)
    except (RuntimeError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    tls = " (TLS)" if server.grpc_tls else ""
    print(
        f"tritonserver ready: HTTP {server.host}:{server.http_port}  gRPC {server.host}:"
        f"{server.grpc_port}{tls}  metrics {server.host}:{server.metrics_port}"
        f"{'  restricted APIs: ' + RESTRICTED if server.restricted else ''}  (Ctrl-C stops it)",
        flush=True,
    )
    code = 0
    try:
        while not stop.is_set():
            dog = _watch(server, args)
            while not stop.is_set() and server.process.poll() is None:
                if dog is not None and dog.tripped.is_set():
                    break
                stop.wait(0.5)
            if dog is not None:
                dog.stop()
            if stop.is_set():
                break
            if server.process.poll() is not None:
                reason = f"tritonserver exited with code {server.process.returncode}"
            else:
                reason = f"{args.probe_failures} probes in a row failed: {dog.reason}"
            if args.on_failure == "exit" or restarts >= args.max_restarts:
                print(f"error: {reason}; stopping (exit 1)", file=sys.stderr, flush=True)
                code = 1
                break
            restarts += 1
            print(f"[watchdog] {reason}; restarting tritonserver ({restarts})", flush=True)
            t0 = time.monotonic()
            try:
                server.restart(args.timeout)
            except (RuntimeError, TimeoutError) as err:
                print(f"error: restart failed: {err}", file=sys.stderr, flush=True)
                return 1
            print(
                f"[watchdog] tritonserver ready again in {time.monotonic() - t0:.1f} s", flush=True
            )
    finally:
        server.stop()
    print("tritonserver stopped", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
