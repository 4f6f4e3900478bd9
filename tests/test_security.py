"""Secure defaults of the serve wrapper: loopback unless told otherwise, an admin key for the
model-repository and shared-memory APIs, the key never logged or inherited, gRPC over TLS."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from benchmarks.soak import server_processes
from cxr_sr.builders import serve
from cxr_sr.builders.probe import probe
from cxr_sr.builders.serve import ADMIN_KEY_ENV, GrpcTls, TritonServer, read_admin_key

KEY = "0123456789abcdef0123456789abcdef"


@pytest.fixture()
def fake_repository(tmp_path) -> Path:
    """Enough of a repository for the wrapper's checks (nothing is started on it)."""
    (tmp_path / "repo" / "cxr_sr").mkdir(parents=True)
    (tmp_path / "repo" / "cxr_sr" / "config.pbtxt").write_text('name: "cxr_sr"\n')
    return tmp_path / "repo"


def test_loopback_addresses():
    assert serve.is_loopback("127.0.0.1") and serve.is_loopback("::1")
    assert serve.is_loopback("localhost") and serve.is_loopback("127.0.0.2")
    assert not serve.is_loopback("0.0.0.0") and not serve.is_loopback("10.1.2.3")
    assert not serve.is_loopback("myhost")


def test_admin_key_from_file_then_environment(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    assert read_admin_key(key_file, env={}) == KEY
    assert read_admin_key(None, env={"CXR_ADMIN_KEY_FILE": str(key_file)}) == KEY
    assert read_admin_key(None, env={ADMIN_KEY_ENV: KEY}) == KEY
    assert read_admin_key(None, env={}) is None
    with pytest.raises(ValueError, match="cannot read the admin key file"):
        read_admin_key(tmp_path / "absent", env={})
    for weak in ("short", "has:colon-0123456789", "has,comma-0123456789"):
        with pytest.raises(ValueError, match="at least 16 characters"):
            read_admin_key(None, env={ADMIN_KEY_ENV: weak})


def test_server_refuses_to_listen_beyond_loopback_without_a_key(fake_repository):
    with pytest.raises(ValueError, match="refusing to listen on 0.0.0.0 without an admin key"):
        TritonServer(fake_repository, host="0.0.0.0")
    TritonServer(fake_repository, host="0.0.0.0", admin_key=KEY)  # with one it may


def test_wrapper_refuses_0000_without_a_key(fake_repository, monkeypatch, capsys):
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    monkeypatch.delenv("CXR_ADMIN_KEY_FILE", raising=False)
    code = serve.main(["--repository", str(fake_repository), "--host", "0.0.0.0"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: refusing to listen on 0.0.0.0") and "Traceback" not in err


def test_command_restricts_apis_and_redacts_the_key(fake_repository):
    server = TritonServer(fake_repository, admin_key=KEY)
    cmd = server.command(Path("/backends"))
    assert f"--http-restricted-api=model-repository,shared-memory:admin-key={KEY}" in cmd
    assert f"--grpc-restricted-protocol=model-repository,shared-memory:admin-key={KEY}" in cmd
    assert "--model-control-mode=none" in cmd and "--http-address=127.0.0.1" in cmd
    assert not any(KEY in a for a in server.redacted(cmd)) and KEY not in repr(server)
    assert not any("restricted" in a for a in TritonServer(fake_repository).command(Path("/b")))


def test_command_keeps_no_grpc_states_by_default(fake_repository):
    """Kept gRPC states keep their largest image's buffers (tritonserver's memory growth in
    `make soak`): none are kept unless asked for, through the wrapper's flag."""
    flag = "--grpc-infer-allocation-pool-size"
    assert f"{flag}=0" in TritonServer(fake_repository).command(Path("/b"))
    args = serve.parse_args(["--repository", str(fake_repository), "--grpc-state-pool", "8"])
    assert f"{flag}=8" in serve.server_from_args(args).command(Path("/b"))
    with pytest.raises(ValueError, match="grpc_state_pool"):
        TritonServer(fake_repository, grpc_state_pool=-1)


def _post(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=b"{}", headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def _get(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture(scope="module")
def restricted_server(built_repository, tmp_path_factory):
    """A server with the admin key; the key is also in this process's environment, to
    show that the server and its stubs do not inherit it."""
    repo, _ = built_repository
    log = tmp_path_factory.mktemp("restricted") / "triton.log"
    mp = pytest.MonkeyPatch()
    mp.setenv(ADMIN_KEY_ENV, KEY)
    try:
        with TritonServer(repo, admin_key=KEY, log_file=log, log_verbose=1) as server:
            yield server, log
    finally:
        mp.undo()


@pytest.mark.integration
def test_restricted_http_apis_need_the_key(restricted_server):
    server, _ = restricted_server
    base = f"http://{server.http_url}"
    assert _post(f"{base}/v2/repository/index") == 403
    assert _post(f"{base}/v2/repository/index", {"admin-key": "wrong-key-wrong-key"}) == 403
    assert _post(f"{base}/v2/repository/index", {"admin-key": KEY}) == 200
    assert _get(f"{base}/v2/systemsharedmemory/status") == 403
    assert _get(f"{base}/v2/systemsharedmemory/status", {"admin-key": KEY}) == 200
    # model control stays `none`: even the admin cannot load or unload
    unload = f"{base}/v2/repository/models/cxr_sr/unload"
    assert _post(unload, {"admin-key": KEY}) >= 400
    assert probe(server.http_url, 30).ok  # inference needs no key


@pytest.mark.integration
def test_restricted_grpc_apis_need_the_key(restricted_server):
    server, _ = restricted_server
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match="(?i)unavailable|denied|permission"):
        client.get_model_repository_index()
    index = client.get_model_repository_index(
        headers={"triton-grpc-protocol-admin-key": KEY}, as_json=True
    )
    assert {m["name"] for m in index["models"]} >= {"cxr_sr", "sampler"}
    assert client.is_model_ready("cxr_sr")


@pytest.mark.integration
def test_the_key_is_neither_logged_nor_inherited(restricted_server):
    server, log = restricted_server
    assert log.is_file() and KEY not in log.read_text(errors="replace")
    for name, proc in server_processes(server.process.pid).items():
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes().decode(errors="replace")
        assert f"{ADMIN_KEY_ENV}=" not in environ, name


def _certificate(folder: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    assert openssl, "openssl is missing (system-packages.txt lists it)"
    cert, key = folder / "server.crt", folder / "server.key"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.mark.integration
def test_grpc_over_tls(built_repository, tmp_path):
    repo, _ = built_repository
    cert, key = _certificate(tmp_path)
    with pytest.raises(ValueError, match="TLS key file not found"):
        GrpcTls(cert, tmp_path / "absent.key")
    with TritonServer(repo, grpc_tls=GrpcTls(cert, key)) as server:
        secure = grpcclient.InferenceServerClient(
            server.grpc_url, ssl=True, root_certificates=str(cert)
        )
        assert secure.is_model_ready("cxr_sr")
        config = secure.get_model_config("cxr_sr", as_json=True)["config"]
        assert json.dumps(config)  # a real answer over TLS
        plain = grpcclient.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException):
            plain.is_server_live(client_timeout=5)
