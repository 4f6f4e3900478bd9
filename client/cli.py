"""``cxr-sr``: super-resolve radiographs (files, folders, DICOM studies) with Triton servers.

    cxr-sr scans/ study/ one.png --out results/                     # upscale (the default)
    cxr-sr upscale scans/ --out results/ --url h1:8000 --url h2:8000 --concurrency 4
    cxr-sr upscale study/ --out derived/ --dicom --no-png           # derived DICOM series
    cxr-sr scans/ --out results/ --eval native                      # score the model
    cxr-sr pacs ... / cxr-sr listen ...                             # PACS commands

Commands: ``upscale`` (``client.batch.run_batch``: resumable, spread over every ``--url``),
and the PACS commands that ``cxr_sr.client.pacs_cli.register`` adds when that module is
installed. A first argument that is not a command means ``upscale``.

Upscale: every input is the LR. ``<stem>_sr.png`` is the 4x image at the input's own geometry
(H x W -> 4H x 4W) and bit depth (8-bit inputs give 8-bit PNGs, deeper ones and DICOM
16-bit); inputs larger than the server's maximum side are tiled (``SRClient.upscale``).
Folder inputs keep their sub-folder layout under ``--out``. ``--dicom`` also writes
``<stem>_sr.dcm`` for each DICOM input: the derived instance in its study
(``client.dicom.derive_instance``). ``--eval`` scores the model on a degraded copy of each
image with the image as reference (``cxr_sr.imaging``): ``reference`` (HR = the centred
square resized to 256, LR its 4x area downsample) or ``native`` (HR = the image at its own
size). Every mode reports each result's LR consistency (``client.metrics.lr_psnr``).

The run keeps a manifest in ``--out``: run the same command again after an interruption and
it does only what is left. Each image's line is in ``<out>/report.csv`` and ``report.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxr_sr.client.batch import DEFAULT_MAX_PIXELS, ON_CHANGE, UPSCALE, run_batch
from cxr_sr.client.exit_codes import EXIT_CODES, EXIT_USAGE
from cxr_sr.client.report import METRICS, format_table
from cxr_sr.client.servers import DEFAULT_BACKOFF_S, DEFAULT_RETRIES
from cxr_sr.client.triton import DEFAULT_IN_FLIGHT, DEFAULT_MAX_BATCH, PROTOCOLS
from cxr_sr.imaging import PROTOCOLS as IMAGE_PROTOCOLS
from cxr_sr.imaging import SCALE
from cxr_sr.serving import add_arguments, namespace_parameters

PROG = "cxr-sr"
WIDTH = 88  # --help text width of the descriptions and epilogs
DEFAULT_URL = "127.0.0.1:8000"
PACS_CLI = "cxr_sr.client.pacs_cli"  # its register(subparsers) adds the PACS commands
EVAL_PROTOCOLS = ("reference", "native")
MODES = {
    UPSCALE: f"upscale: each input is the LR; SR = {SCALE}x its size (H x W -> "
    f"{SCALE}H x {SCALE}W), tiled where larger than the server takes",
    **{
        name: f"{name} protocol: {text}; scored at the HR's size"
        for name, text in IMAGE_PROTOCOLS.items()
    },
}
LR_COLUMNS = [
    ("lr_psnr_sr", "LR PSNR SR", ".2f"),
    ("lr_psnr_bicubic", "LR PSNR bicubic", ".2f"),
    ("tiles", "tiles"),
    ("seconds", "s/image", ".3f"),
]
TABLE_COLUMNS = {
    UPSCALE: [("key", "image"), ("size", "input"), ("out_size", "output"), *LR_COLUMNS],
    "eval": [
        ("key", "image"),
        ("size", "input"),
        ("scale", "HR / LR"),
        ("psnr_sr", "PSNR SR", ".2f"),
        ("psnr_bicubic", "PSNR bicubic", ".2f"),
        ("ssim_sr", "SSIM SR", ".4f"),
        ("ssim_bicubic", "SSIM bicubic", ".4f"),
        *LR_COLUMNS,
    ],
}
_MEAN_KEYS = (
    *(f"{k}_{w}" for k in (*METRICS, "lr_psnr") for w in ("sr", "bicubic")),
    "seconds",
)


def exit_code_epilog() -> str:
    """The exit-code table (``client.exit_codes``), for every command's --help."""
    lines = [f"  {code}  {meaning}" for code, meaning in EXIT_CODES.items()]
    return "exit codes (every cxr-sr command):\n" + "\n".join(lines)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    """--url (repeatable), --protocol, --model, --timeout, --wait: how to reach the servers."""
    p.add_argument(
        "--url",
        action="append",
        metavar="HOST:PORT",
        help=f"Triton host:port, no scheme (default {DEFAULT_URL}); give it several times to "
        "spread the batch over several servers (each image goes to the least busy one)",
    )
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="http",
        help="tritonclient protocol (Triton serves HTTP on 8000 and gRPC on 8001)",
    )
    p.add_argument("--model", default="cxr_sr", help="name of the served ensemble")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per request")
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        help="seconds to wait for the servers to become ready before giving up",
    )


def _add_upscale(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        UPSCALE,
        help="4x each image of files and folders (the default command)",
        description=textwrap.fill(
            "4x super-resolution of chest radiographs through Triton servers (ensemble "
            "cxr_sr). Every input is the LR and comes back 4x larger, at its own geometry and "
            "bit depth; --eval scores the model on degraded copies instead. The run is "
            "resumable: the same command after an interruption does only what is left.",
            WIDTH,
        ),
        epilog=exit_code_epilog()
        + "\n\n"
        + textwrap.fill(
            "A run stopped by a full output disk exits with 1 and a line saying so; free "
            "space and re-run the same command.",
            WIDTH,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files (PNG, JPEG, TIFF, DICOM) or folders, searched recursively "
        "(DICOM files without suffix are found by content)",
    )
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output folder: <stem>_sr.png (and .dcm), the run's manifest and report",
    )
    add_server_arguments(p)
    add_arguments(p)  # --steps, --seed, ...: one flag per request-schema key
    p.add_argument(
        "--eval",
        choices=EVAL_PROTOCOLS,
        default=None,
        help="score instead of upscaling: 'reference' (HR = centred square resized to "
        "256x256, LR 64x64) or 'native' (HR = the image at its own size, LR = its 4x area "
        "downsample); PSNR/SSIM of SR and bicubic against the HR",
    )
    p.add_argument(
        "--concurrency",
        type=_positive_int,
        default=1,
        help="images in flight at once, spread over the --url servers (default 1)",
    )
    p.add_argument(
        "--in-flight",
        type=_positive_int,
        default=DEFAULT_IN_FLIGHT,
        help=f"tile requests in flight per image (default {DEFAULT_IN_FLIGHT}: the cpu target "
        "computes one batch at a time, and more only add memory; up to the server's "
        f"max_batch_size, {DEFAULT_MAX_BATCH}, on a GPU server, whose dynamic batcher merges them)",
    )
    p.add_argument(
        "--tile",
        type=_positive_int,
        default=None,
        help="LR tile side for images larger than it (default: the largest side the server takes)",
    )
    p.add_argument(
        "--overlap",
        type=int,
        default=None,
        help="LR pixels shared by neighbouring tiles (default: a quarter of the tile side)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=DEFAULT_RETRIES,
        help="retries of a request on transient errors (connection refused or reset, HTTP "
        f"502/503/504, gRPC UNAVAILABLE), with exponential backoff (default {DEFAULT_RETRIES}); "
        "a refused request (400) is never retried",
    )
    p.add_argument(
        "--backoff",
        type=float,
        default=DEFAULT_BACKOFF_S,
        help=f"first retry delay in seconds, doubled at each retry, with jitter (default "
        f"{DEFAULT_BACKOFF_S})",
    )
    p.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=DEFAULT_MAX_PIXELS,
        help="largest input image in pixels, read from its header and refused before decoding "
        f"(default {DEFAULT_MAX_PIXELS}, 3000 x 3000)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="also process DICOM inputs outside the model's domain (modality other than CR, "
        "DX, RG; a body part other than chest), which are skipped otherwise",
    )
    p.add_argument(
        "--on-change",
        choices=ON_CHANGE,
        default="refuse",
        help="when --out holds results of another model or other settings: refuse (exit 2, "
        "the default) or redo them",
    )
    p.add_argument(
        "--json",
        type=Path,
        help="also write the report (as <out>/report.json) to this file",
    )
    p.add_argument(
        "--side-by-side",
        action="store_true",
        help="also write <stem>_compare.png: LR | bicubic | SR (| HR with --eval)",
    )
    p.add_argument(
        "--dicom",
        action="store_true",
        help="also write <stem>_sr.dcm for each DICOM input: a derived Secondary Capture in "
        "its study (new series, deterministic UIDs, source referenced, spacing / 4)",
    )
    p.add_argument(
        "--no-png",
        action="store_true",
        help="do not write <stem>_sr.png (with --dicom: DICOM outputs only)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_upscale)


def build_parser() -> argparse.ArgumentParser:
    """``cxr-sr`` and its commands (``upscale``, and those of ``pacs_cli`` when installed)."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description=textwrap.fill(
            "4x super-resolution of chest radiographs through Triton servers. A first "
            f"argument that is not a command runs '{UPSCALE}' ('{PROG} scans/ --out "
            f"results/'); '{PROG} COMMAND --help' for each command.",
            WIDTH,
        ),
        epilog=exit_code_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, help="the command")
    _add_upscale(sub)
    if importlib.util.find_spec(PACS_CLI) is not None:
        importlib.import_module(PACS_CLI).register(sub)
    return p


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The commands ``parser`` knows, by name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def upscale_parser() -> argparse.ArgumentParser:
    """The ``upscale`` command's own parser (inputs, --out, servers, sampling flags ...)."""
    return commands(build_parser())[UPSCALE]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse a command line, ``upscale`` inserted when the first argument is no command."""
    argv = list(argv)
    parser = build_parser()
    if not argv or (argv[0] not in commands(parser) and argv[0] not in ("-h", "--help")):
        argv = [UPSCALE, *argv]
    return parser.parse_args(argv)


def _mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    mean: dict[str, Any] = {"key": f"mean ({len(rows)})", "size": ""}
    for k in _MEAN_KEYS:
        vals = [r[k] for r in rows if r.get(k) is not None]
        mean[k] = float(np.mean(vals)) if vals else None
    return mean


def cmd_upscale(args: argparse.Namespace) -> int:
    """``cxr-sr upscale``: run the batch, print the table and the summary; the exit code."""
    err = sys.stderr
    mode = args.eval or UPSCALE
    try:
        sampling = namespace_parameters(args)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=err)
        return EXIT_USAGE
    if args.dicom and args.eval:
        print(
            f"{PROG}: error: --dicom writes derived instances of the inputs; not with --eval",
            file=err,
        )
        return EXIT_USAGE
    if args.no_png and not args.dicom:
        print(f"{PROG}: error: --no-png leaves nothing to write without --dicom", file=err)
        return EXIT_USAGE
    urls = args.url or [DEFAULT_URL]
    bad = [u for u in urls if "://" in u]
    if bad:
        print(f"{PROG}: error: --url takes host:port without a scheme, got {bad[0]!r}", file=err)
        return EXIT_USAGE
    report = run_batch(
        args.inputs,
        args.out,
        urls,
        protocol=args.protocol,
        model=args.model,
        concurrency=args.concurrency,
        mode=mode,
        png=not args.no_png,
        dicom=args.dicom,
        side_by_side=args.side_by_side,
        force=args.force,
        max_pixels=args.max_pixels,
        retries=max(0, args.retries),
        backoff=max(0.0, args.backoff),
        on_change=args.on_change,
        timeout_s=args.timeout,
        wait_s=args.wait,
        in_flight=args.in_flight,
        tile=args.tile,
        overlap=args.overlap,
        sampling=sampling,
        progress=False if args.quiet else None,
        report_extra={"mode": {"name": mode, "description": MODES[mode]}},
    )
    if not report.rows and report.message:  # nothing ran: unreachable, or a manifest mismatch
        print(f"{PROG}: error: {report.message}", file=err)
        return report.exit_code
    done = report.done
    if done:
        print(MODES[mode])
        columns = TABLE_COLUMNS[UPSCALE if mode == UPSCALE else "eval"]
        print(format_table([*done, _mean_row(done)], columns))
        print(
            f"(PSNR in dB; LR PSNR = LR consistency, the {SCALE}x area downsample of the "
            "result against the LR)"
        )
    print(f"{PROG}: {report.summary()}", file=err)
    if args.json:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            src = Path(report.files[1]) if len(report.files) > 1 else None
            body = src.read_text() if src else json.dumps(report.to_json(), indent=2)
            args.json.write_text(body)
        except OSError as e:
            print(f"{PROG}: could not write {args.json}: {e}", file=err)
    return report.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cxr-sr`` console script; returns the exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
