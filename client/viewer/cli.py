"""``cxr-sr-viewer``: the browser viewer on 127.0.0.1, talking to a Triton server.

    cxr-sr-viewer                                                # Triton at 127.0.0.1:8000
    cxr-sr-viewer --serve-repository build/model_repository_cpu  # start one if none answers
    cxr-sr-viewer --url triton.local:8001 --protocol grpc --port 8090

With ``--serve-repository``, a Triton server is started on that built repository (the
embedded tritonserver of ``cxr_sr.builders.serve``, at the address of ``--url``) when nothing
listens there, and stopped when the viewer stops. Ctrl-C stops both.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from cxr_sr.builders.serve import TritonServer, free_port
from cxr_sr.client.exit_codes import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from cxr_sr.client.pacs import credentials_from_env
from cxr_sr.client.triton import DEFAULT_IN_FLIGHT, DEFAULT_MODEL, PROTOCOLS
from cxr_sr.client.viewer.app import ViewerConfig, create_app
from cxr_sr.serving import add_arguments, namespace_parameters

DEFAULT_PORT = 8090
LOCAL_HOSTS = ("127.0.0.1", "localhost")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cxr-sr-viewer",
        description="A browser viewer for 4x chest X-ray super-resolution: upload a PNG, JPEG, "
        "TIFF or DICOM image and compare LR, bicubic and SR (split slider, synchronised zoom "
        "and pan, window/level), score it at native scale, download the SR.",
    )
    p.add_argument(
        "--url", default="127.0.0.1:8000", help="Triton host:port, no scheme (default: %(default)s)"
    )
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="http",
        help="tritonclient protocol for --url (default: %(default)s)",
    )
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="name of the served ensemble (default: %(default)s)"
    )
    p.add_argument(
        "--serve-repository",
        type=Path,
        default=None,
        help="a built model repository: when nothing listens at --url (which must then be "
        "on this machine), start the embedded tritonserver on it there, and stop it on exit",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the viewer binds (default: %(default)s; 0.0.0.0 would expose uploaded "
        "patient images to the network)",
    )
    p.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="the viewer's port (default: %(default)s)"
    )
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=200.0,
        help="largest file accepted, MB (default: %(default)g); larger uploads are refused "
        "with a message",
    )
    p.add_argument(
        "--max-output-mp",
        type=float,
        default=40.0,
        help="largest SR a job may produce (megapixels); the browser holds every image at "
        "that size, so larger requests are refused with a message (default: %(default)g)",
    )
    p.add_argument(
        "--tile",
        type=int,
        default=None,
        help="LR tile side for images larger than it (default: the largest side the server takes)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds allowed per request (default: %(default)g)",
    )
    p.add_argument(
        "--in-flight",
        type=int,
        default=DEFAULT_IN_FLIGHT,
        help="tile requests in flight at once (default: %(default)s; raise it for a GPU server)",
    )
    p.add_argument(
        "--dicomweb-url",
        default=None,
        help="a PACS (DICOMweb base URL, e.g. http://pacs:8042/dicom-web) whose studies the "
        "page can search and open; credentials from CXR_SR_PACS_USER + CXR_SR_PACS_PASSWORD, "
        "CXR_SR_PACS_TOKEN or --credentials-file, never on the command line",
    )
    p.add_argument(
        "--credentials-file",
        type=Path,
        default=None,
        help='JSON file with the DICOMweb credentials ({"username": ..., "password": ...} '
        'or {"token": ...})',
    )
    p.add_argument(
        "--log-level",
        choices=("critical", "error", "warning", "info", "debug"),
        default="warning",
        help="the viewer's (uvicorn's) log level (default: %(default)s)",
    )
    add_arguments(p)  # --steps, --seed, ...: defaults for every job (the page may set steps/seed)
    return p


def _host_port(url: str) -> tuple[str, int]:
    host, _, port = url.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--url must be host:port, got {url!r}")
    return host, int(port)


def _listening(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _local_server(args: argparse.Namespace) -> TritonServer | None:
    """A TritonServer to start at --url, or None when one already listens there."""
    host, port = _host_port(args.url)
    if args.serve_repository is None or _listening(host, port):
        return None
    if host not in LOCAL_HOSTS:
        raise ValueError(f"--serve-repository starts a server on this machine; --url is {host}")
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    ports[f"{args.protocol}_port"] = port
    return TritonServer(args.serve_repository, **ports)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cxr-sr-viewer``; returns the exit code (``client.exit_codes``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    err = sys.stderr
    try:
        sampling = namespace_parameters(args)
        if args.max_upload_mb <= 0 or args.max_output_mp <= 0:
            raise ValueError("--max-upload-mb and --max-output-mp must be positive")
        config = ViewerConfig(
            url=args.url,
            protocol=args.protocol,
            model=args.model,
            timeout_s=args.timeout,
            in_flight=args.in_flight,
            max_upload_bytes=int(args.max_upload_mb * 2**20),
            max_output_pixels=int(args.max_output_mp * 1e6),
            sampling=sampling,
            tile=args.tile,
        )
        config.client().close()  # checks --url, --protocol, --in-flight
        if args.dicomweb_url:
            config.dicomweb_url = args.dicomweb_url
            config.pacs_credentials = credentials_from_env(args.credentials_file)
            config.pacs().close()  # checks the URL
        server = _local_server(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"cxr-sr-viewer: error: {e}", file=err)
        return EXIT_USAGE
    if not _port_free(args.host, args.port):
        print(
            f"cxr-sr-viewer: error: {args.host}:{args.port} is in use; pick another --port",
            file=err,
        )
        return EXIT_USAGE

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    # uvicorn re-raises the signal that stopped it: make SIGTERM end like Ctrl-C, so the
    # local tritonserver is stopped either way
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if server is not None:
            print(f"starting tritonserver on {server.repository} ...", flush=True)
            try:
                server.start()
            except (RuntimeError, TimeoutError) as e:
                print(f"cxr-sr-viewer: error: tritonserver did not start: {e}", file=err)
                return EXIT_UNREACHABLE
        where = "started here at" if server else "at"
        print(
            f"cxr-sr viewer: http://{args.host}:{args.port}/  (Triton {where} "
            f"{args.protocol}://{args.url}; Ctrl-C stops)",
            flush=True,
        )
        uvicorn.run(create_app(config), host=args.host, port=args.port, log_level=args.log_level)
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            server.stop()
            print("tritonserver stopped", flush=True)
    return EXIT_OK


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
