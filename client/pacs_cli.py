"""``cxr-sr pacs ...`` and ``cxr-sr listen``: the PACS side of the command line.

    cxr-sr pacs find --dicomweb URL --patient-id P123 --modality CR --date-from 2024-01-01
    cxr-sr pacs run  --dicomweb URL --study-uid 1.2.3... --url 127.0.0.1:8000
    cxr-sr pacs run  --input study/ --dest dimse:PACS@10.0.0.5:104 --url 127.0.0.1:8000
    cxr-sr pacs echo --dimse PACS@10.0.0.5:104
    cxr-sr pacs send derived/ --dimse PACS@10.0.0.5:104
    cxr-sr listen --spool /var/spool/cxr-sr --dest dimse:PACS@10.0.0.5:104 --port 11112

DICOMweb credentials come from the environment (``CXR_SR_PACS_USER`` and
``CXR_SR_PACS_PASSWORD``, or ``CXR_SR_PACS_TOKEN``) or a JSON file (``--credentials-file``
or ``CXR_SR_PACS_CREDENTIALS_FILE``), never from a flag's value, and are never printed.
Exit codes: ``client.exit_codes`` (0 done, 1 some instances failed, 2 usage, 3 the Triton
server or the PACS unreachable, with one line saying which).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxr_sr.client.dicom import safe_name
from cxr_sr.client.dimse import DEFAULT_AE_TITLE, Peer, echo, send
from cxr_sr.client.exit_codes import EXIT_INPUT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from cxr_sr.client.io import is_dicom, iter_inputs
from cxr_sr.client.manifest import DONE
from cxr_sr.client.node import DEFAULT_BATCH, Node
from cxr_sr.client.pacs import (
    ENV_CREDENTIALS_FILE,
    ENV_PASSWORD,
    ENV_TOKEN,
    ENV_USER,
    DicomWebPacs,
    PacsError,
    PacsUnreachableError,
    credentials_from_env,
)
from cxr_sr.client.studies import DicomWebDestination, parse_destination, submit_study
from cxr_sr.client.triton import PROTOCOLS, SRClient, SRServerError
from cxr_sr.serving import add_arguments, namespace_parameters

PROG = "cxr-sr"
CREDENTIALS_HELP = (
    f"DICOMweb credentials: a JSON file with username/password or token (default: "
    f"${ENV_CREDENTIALS_FILE}; else ${ENV_USER} + ${ENV_PASSWORD} or ${ENV_TOKEN})"
)
DEST_HELP = (
    "where derived instances go: dimse:AET@HOST:PORT (C-STORE), dicomweb:URL (STOW-RS) or "
    "folder:PATH; repeat for several"
)


class _StopError(Exception):
    """A run-stopping error: one line for stderr and the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _quiet_pynetdicom() -> None:
    """pynetdicom logs connection failures itself; our one-line error says it better."""
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


# arguments shared by several subcommands


def _add_server(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Triton server")
    g.add_argument("--url", default="127.0.0.1:8000", help="Triton host:port, no scheme")
    g.add_argument("--protocol", choices=PROTOCOLS, default="http", help="tritonclient protocol")
    g.add_argument("--model", default="cxr_sr", help="name of the served ensemble")
    g.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per request")
    g.add_argument(
        "--wait", type=float, default=0.0, help="seconds to wait for the server to be ready"
    )
    add_arguments(p)  # --steps, --seed, ...: one flag per request-schema key
    p.add_argument(
        "--force",
        action="store_true",
        help="also upscale inputs outside the model's domain (CT, MR, US ..., non-chest body "
        "parts), which are otherwise skipped with their reason",
    )


def _add_dicomweb(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--dicomweb",
        metavar="URL",
        required=required,
        help="DICOMweb base URL (QIDO/WADO/STOW), e.g. http://pacs:8042/dicom-web",
    )
    p.add_argument("--credentials-file", type=Path, metavar="PATH", help=CREDENTIALS_HELP)


def _add_filters(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("study selection (QIDO-RS; all given must match)")
    g.add_argument("--study-uid", help="Study Instance UID")
    g.add_argument("--patient-id", help="Patient ID")
    g.add_argument("--modality", help="a modality in the study (e.g. CR, DX)")
    g.add_argument("--date-from", help="first study date, YYYYMMDD or YYYY-MM-DD")
    g.add_argument("--date-to", help="last study date, YYYYMMDD or YYYY-MM-DD")
    g.add_argument("--limit", type=int, help="at most this many studies")


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("study_uid", "patient_id", "modality", "date_from", "date_to", "limit")
    return {k: getattr(args, k) for k in keys}


def _pacs(args: argparse.Namespace) -> DicomWebPacs:
    return DicomWebPacs(args.dicomweb, credentials_from_env(args.credentials_file))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``pacs`` (find, run, echo, send) and ``listen`` to a ``cxr-sr`` subparsers object.

    Each leaf parser sets ``handler``: ``args.handler(args) -> exit code``.
    """
    pacs = subparsers.add_parser(
        "pacs",
        help="find studies in a PACS, super-resolve them, store the derived series back",
        description="Work with a PACS over DICOMweb (QIDO-RS, WADO-RS, STOW-RS) or DIMSE "
        "(C-ECHO, C-STORE). " + CREDENTIALS_HELP + ".",
    )
    sub = pacs.add_subparsers(dest="pacs_command", required=True, metavar="COMMAND")

    p = sub.add_parser("find", help="list studies (QIDO-RS)", description="List matching studies.")
    _add_dicomweb(p, required=True)
    _add_filters(p)
    p.add_argument("--json", type=Path, help="also write the matches to this JSON file")
    p.set_defaults(handler=cmd_find)

    p = sub.add_parser(
        "run",
        help="super-resolve studies from a PACS or folders and deliver the derived series",
        description="Each chest radiograph of each study becomes a derived instance (4x, "
        "same study, new series, deterministic UIDs: a re-run replaces its results). Studies "
        "come from --dicomweb (WADO-RS, selected by the filters) or from --input folders; "
        "the derived series goes to each --dest (default: back to --dicomweb by STOW-RS).",
    )
    _add_dicomweb(p)
    _add_filters(p)
    p.add_argument(
        "--input", nargs="+", type=Path, metavar="PATH", help="DICOM files or study folders"
    )
    p.add_argument("--dest", action="append", default=[], metavar="DEST", help=DEST_HELP)
    p.add_argument(
        "--out",
        type=Path,
        help="the run's folder: derived <stem>_sr.dcm files, job manifest (a re-run resumes) "
        "and report.csv/json, per study in <out>/<StudyInstanceUID>/ for --dicomweb "
        "(default: a temporary folder, removed at the end)",
    )
    p.add_argument(
        "--calling-ae", default=DEFAULT_AE_TITLE, help="our AE title for C-STORE destinations"
    )
    p.add_argument("--concurrency", type=int, default=1, help="images in flight at once")
    _add_server(p)
    p.add_argument("--json", type=Path, help="also write the report to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser(
        "echo", help="check a PACS answers (C-ECHO or QIDO-RS)", description="Verify a PACS."
    )
    _add_dicomweb(p)
    p.add_argument("--dimse", metavar="AET@HOST:PORT", help="DICOM node to C-ECHO")
    p.add_argument("--calling-ae", default=DEFAULT_AE_TITLE, help="our AE title")
    p.set_defaults(handler=cmd_echo)

    p = sub.add_parser(
        "send",
        help="C-STORE DICOM files (e.g. derived series written by --dicom) to a node",
        description="Send DICOM files and folders to a DICOM node over one association.",
    )
    p.add_argument("inputs", nargs="+", type=Path, metavar="PATH", help="DICOM files or folders")
    p.add_argument("--dimse", required=True, metavar="AET@HOST:PORT", help="the receiving node")
    p.add_argument("--calling-ae", default=DEFAULT_AE_TITLE, help="our AE title")
    p.set_defaults(handler=cmd_send)

    p = subparsers.add_parser(
        "listen",
        help="DICOM node mode: receive studies over C-STORE, send derived series on",
        description="A C-STORE SCP: every instance a PACS or modality pushes is spooled to "
        "disk before it is acknowledged, super-resolved by a bounded pool of workers and the "
        "derived instance sent to --dest. A restarted node resumes its spool. SIGTERM or "
        "Ctrl-C stops it gracefully.",
    )
    p.add_argument("--spool", required=True, type=Path, help="the node's spool folder")
    p.add_argument("--dest", required=True, metavar="DEST", help=DEST_HELP.split("; ")[0])
    p.add_argument("--ae-title", default=DEFAULT_AE_TITLE, help="our AE title (called AE)")
    p.add_argument("--port", type=int, default=11112, help="DICOM port to listen on")
    p.add_argument("--bind", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument(
        "--allow-ae",
        action="append",
        default=[],
        metavar="AET",
        help="accept associations only from this calling AE title (repeat; default: any)",
    )
    p.add_argument("--workers", type=int, default=1, help="images in flight at once")
    p.add_argument(
        "--batch",
        type=int,
        default=DEFAULT_BATCH,
        help="most spooled instances taken into one batch run (a stop waits for it to end)",
    )
    p.add_argument(
        "--calling-ae",
        default=None,
        help="AE title for C-STORE to --dest (default: --ae-title)",
    )
    p.add_argument("--credentials-file", type=Path, metavar="PATH", help=CREDENTIALS_HELP)
    _add_server(p)
    p.set_defaults(handler=cmd_listen)


# pacs find


def cmd_find(args: argparse.Namespace) -> int:
    _quiet_pynetdicom()
    try:
        with _pacs(args) as pacs:
            studies = pacs.find_studies(**_filters(args))
    except ValueError as e:
        _error(str(e))
        return EXIT_USAGE
    except PacsUnreachableError as e:
        _error(str(e))
        return EXIT_UNREACHABLE
    except PacsError as e:  # unreachable, credentials refused, or an error answer
        _error(str(e))
        return EXIT_UNREACHABLE
    for s in studies:
        print(
            f"{s.study_uid}  {s.patient_id}  {s.study_date}  {'/'.join(s.modalities)}  "
            f"{s.instances if s.instances is not None else '?'} instance(s)  {s.description}"
        )
    print(f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'} found", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([vars(s) for s in studies], indent=2))
    return EXIT_OK


# pacs echo / send


def cmd_echo(args: argparse.Namespace) -> int:
    _quiet_pynetdicom()
    if not (args.dicomweb or args.dimse):
        _error("give --dicomweb URL and/or --dimse AET@HOST:PORT")
        return EXIT_USAGE
    try:
        if args.dimse:
            peer = Peer.parse(args.dimse)
            echo(peer, calling_ae=args.calling_ae)
            print(f"C-ECHO {peer}: ok")
        if args.dicomweb:
            with _pacs(args) as pacs:
                pacs.ping()
            print(f"QIDO-RS {args.dicomweb}: ok")
    except ValueError as e:
        _error(str(e))
        return EXIT_USAGE
    except PacsError as e:
        _error(str(e))
        return EXIT_UNREACHABLE
    return EXIT_OK


def cmd_send(args: argparse.Namespace) -> int:
    _quiet_pynetdicom()
    try:
        peer = Peer.parse(args.dimse)
        files = [f for f in iter_inputs(args.inputs) if is_dicom(f)]
        if not files:
            raise ValueError("no DICOM files in the inputs")
    except ValueError as e:
        _error(str(e))
        return EXIT_USAGE
    try:
        n = send(files, peer, calling_ae=args.calling_ae)
    except ValueError as e:
        _error(str(e))
        return EXIT_INPUT_FAILED
    except PacsUnreachableError as e:
        _error(str(e))
        return EXIT_UNREACHABLE
    except PacsError as e:
        _error(str(e))
        return EXIT_INPUT_FAILED
    print(f"C-STORE {peer}: {n} instance(s) stored")
    return EXIT_OK


# pacs run


def _check_server(args: argparse.Namespace) -> None:
    """Fail fast (exit code 3, one line) when the Triton server does not answer."""
    with SRClient(args.url, args.protocol, args.model, timeout_s=args.timeout) as client:
        try:
            client.wait_ready(args.wait)
            client.model_identity()
        except SRServerError as e:
            raise _StopError(str(e), EXIT_UNREACHABLE) from None


def cmd_run(args: argparse.Namespace) -> int:
    _quiet_pynetdicom()
    try:
        return _run(args)
    except _StopError as e:
        _error(str(e))
        return e.code
    except PacsUnreachableError as e:
        _error(str(e))
        return EXIT_UNREACHABLE


def _run(args: argparse.Namespace) -> int:
    if not args.input and not args.dicomweb:
        raise _StopError("give --dicomweb URL (with a study selection) or --input PATH", EXIT_USAGE)
    if args.input and any(v is not None for v in _filters(args).values()):
        raise _StopError("the study filters select from --dicomweb, not from --input", EXIT_USAGE)
    try:
        sampling = namespace_parameters(args)
        credentials = credentials_from_env(args.credentials_file)
        pacs = DicomWebPacs(args.dicomweb, credentials) if args.dicomweb else None
        dests = [
            parse_destination(d, calling_ae=args.calling_ae, credentials=credentials)
            for d in args.dest
        ]
    except ValueError as e:
        raise _StopError(str(e), EXIT_USAGE) from None
    if not dests:
        if pacs is None and args.out is None:
            raise _StopError("give --dest or --out (where the derived series goes)", EXIT_USAGE)
        if pacs is not None:
            dests = [DicomWebDestination(pacs)]
    _check_server(args)
    common = dict(
        url=args.url, dest=dests, force=args.force, protocol=args.protocol, model=args.model,
        concurrency=args.concurrency, timeout_s=args.timeout, wait_s=args.wait,
        progress=False if args.quiet else None, **sampling,
    )  # fmt: skip
    if args.input:
        studies = [(None, args.input)]
    else:
        found = pacs.find_studies(**_filters(args))
        if not found:
            raise _StopError("no study matches the selection", EXIT_INPUT_FAILED)
        studies = [(s.study_uid, s.study_uid) for s in found]
    reports = []
    for uid, source in studies:
        out = args.out / safe_name(uid, "study") if (args.out and uid) else args.out
        report = submit_study(source, source=pacs, out=out, **common)
        if report.exit_code != EXIT_UNREACHABLE:  # that one gets its own error line
            print(f"{uid or 'inputs'}: {report.summary()}", file=sys.stderr)
        reports.append((uid, report))
        if report.exit_code == EXIT_UNREACHABLE:
            break
    return _finish_run(args, reports)


def _finish_run(args: argparse.Namespace, reports) -> int:
    codes = [r.exit_code for _, r in reports]
    for _, r in reports:
        for row in r.rows:
            if row.get("status") == DONE:
                where = ", ".join(row.get("delivered_to") or []) or f"kept in {args.out}"
                print(f"{row['key']}: {row.get('size')} -> {row.get('out_size')}  {where}")
    if args.json:
        body = {
            "studies": [{"study": uid, **r.to_json()} for uid, r in reports],
            "exit_code": max(codes),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(body, indent=2, default=str))
    for _, r in reports:
        if r.exit_code == EXIT_UNREACHABLE:
            _error(r.message)
    if EXIT_UNREACHABLE in codes:
        return EXIT_UNREACHABLE
    return max(codes)


# listen


def cmd_listen(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    for library in ("pynetdicom", "dicomweb_client"):
        logging.getLogger(library).setLevel(logging.WARNING)
    log = logging.getLogger("cxr_sr.client.node")
    try:
        dest = parse_destination(
            args.dest,
            calling_ae=args.calling_ae or args.ae_title,
            credentials=credentials_from_env(args.credentials_file),
        )
        node = Node(
            args.spool,
            dest,
            url=args.url,
            protocol=args.protocol,
            model=args.model,
            timeout_s=args.timeout,
            ae_title=args.ae_title,
            host=args.bind,
            port=args.port,
            allowed_aes=tuple(args.allow_ae),
            workers=args.workers,
            batch=args.batch,
            force=args.force,
            sampling=namespace_parameters(args),
        )
    except ValueError as e:
        _error(str(e))
        return EXIT_USAGE
    try:
        _check_server(args)
    except _StopError as e:
        _error(str(e))
        return e.code
    stop = threading.Event()

    def _stop(signum, frame) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():  # a second signal: stop now, the spool keeps what is unfinished
            raise KeyboardInterrupt(name)
        log.info("%s: stopping (finishing the batch in hand; again to stop at once)", name)
        stop.set()

    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        node.run(
            stop,
            ready=lambda n: log.info(
                "listening as %s on %s:%d, sending to %s",
                n.scp.ae_title,
                n.scp.host,
                n.scp.port,
                dest,
            ),
        )
    except OSError as e:
        _error(str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        log.warning("stopped at once; unfinished instances stay in %s", node.incoming)
        return EXIT_INPUT_FAILED
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cxr_sr.client.pacs_cli pacs|listen ...`` (the same as ``cxr-sr ...``)."""
    parser = argparse.ArgumentParser(prog=PROG, description="PACS commands of cxr-sr")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
