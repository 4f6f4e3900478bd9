"""The viewer's web app (Starlette): one page, its static assets, and a small JSON/binary API.

Routes (every asset is served from this package: the page loads with no network):

    GET  /                              the page (static/index.html)
    GET  /static/...                    its script, style sheet and icon
    GET  /api/status                    Triton's state and limits, the viewer's own limits
    POST /api/jobs?mode=&name=&steps=&seed=
                                        body = the file's bytes; starts a job -> {"id": ...}
    GET  /api/jobs/{id}                 the job's stage, tile progress, sizes and metrics
    GET  /api/jobs/{id}/pixels/{kind}   lr | bicubic | sr | hr: little-endian uint16
                                        [H, W] (headers X-Width, X-Height), windowed in the page
    GET  /api/jobs/{id}/sr.png          the SR as a 16-bit PNG
    GET  /api/jobs/{id}/sr.dcm          the SR as a derived DICOM instance in the upload's
                                        study (``client.dicom.derive_instance``; DICOM
                                        uploads in the upscale mode)
    GET  /api/pacs/studies?patient_id=&modality=&date_from=&date_to=
                                        QIDO-RS study search (with ``dicomweb_url`` only)
    POST /api/pacs/jobs?study_uid=&mode=&steps=&seed=
                                        a job on the study's first chest radiograph (WADO-RS)

Errors are JSON ``{"error": message}`` with a 4xx/5xx status and never carry a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from cxr_sr.client.dicom import derive_instance, dicom_file_name, domain_problem, safe_name
from cxr_sr.client.io import KNOWN_SUFFIXES, write_png
from cxr_sr.client.pacs import Credentials, DicomWebPacs, PacsError, PacsUnreachableError
from cxr_sr.client.triton import (
    DEFAULT_IN_FLIGHT,
    DEFAULT_MODEL,
    SRClient,
    SRServerError,
    sampling_parameters,
)
from cxr_sr.client.viewer.jobs import DONE, KINDS, MODES, UPSCALE, Job, JobStore

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
PAGE_FIELDS = ("steps", "seed")  # the sampling controls the page offers
# The page may load nothing from elsewhere (hospital networks are closed, and a viewer of
# patient images should not talk to third parties): the browser enforces it too.
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


@dataclass
class ViewerConfig:
    """What the viewer talks to and what it accepts.

    ``url``/``protocol``/``model``: the Triton server and ensemble (``SRClient``);
    ``max_upload_bytes``: the largest file accepted; ``max_output_pixels``: the largest SR
    (pixels) a job may produce (the page holds every image at that size, 16-bit, plus its
    RGBA rendering); ``sampling``: request parameters every job sends unless the page sets
    its own ``steps``/``seed``; ``tile``: the LR tile side for images larger than it
    (None: the server's largest side); ``dicomweb_url`` (+ ``pacs_credentials``): a PACS
    whose studies the page can search and open.
    """

    url: str = "127.0.0.1:8000"
    protocol: str = "http"
    model: str = DEFAULT_MODEL
    timeout_s: float = 300.0
    in_flight: int = DEFAULT_IN_FLIGHT
    max_upload_bytes: int = 200 * 2**20
    max_output_pixels: int = 40_000_000
    sampling: dict[str, Any] = field(default_factory=dict)
    tile: int | None = None
    dicomweb_url: str | None = None
    pacs_credentials: Credentials | None = field(default=None, repr=False)

    def pacs(self, timeout_s: float = 60.0) -> DicomWebPacs:
        return DicomWebPacs(self.dicomweb_url, self.pacs_credentials, timeout_s=timeout_s)

    def client(self, timeout_s: float | None = None) -> SRClient:
        return SRClient(
            self.url,
            self.protocol,
            self.model,
            timeout_s=timeout_s or self.timeout_s,
            in_flight=self.in_flight,
        )


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _triton_status(config: ViewerConfig) -> dict[str, Any]:
    """Whether the server is ready, and the LR sides it takes (a quick probe)."""
    where = f"{config.protocol}://{config.url}"
    try:
        with config.client(timeout_s=3.0) as c:
            c.wait_ready(0)
            limits = c.limits()
            model = c.model_identity()
    except (SRServerError, ValueError) as e:
        return {"url": where, "ready": False, "message": str(e)}
    return {
        "url": where,
        "ready": True,
        "model": model.short(),
        "lr_sides": [limits.min_side, limits.max_side],
        "message": f"ready; LR {limits.describe()} per request, larger images are tiled",
    }


def _pacs_message(e: PacsError) -> str:
    if isinstance(e, PacsUnreachableError):
        return f"The PACS is not answering or refused us: {e}"
    return f"The PACS answered with an error: {e}"


PACS_SEARCH_LIMIT = 50
PACS_FIELDS = ("patient_id", "modality", "date_from", "date_to")


def _find_studies(config: ViewerConfig, criteria: dict[str, str]) -> list[dict[str, Any]]:
    with config.pacs(timeout_s=30.0) as pacs:
        found = pacs.find_studies(**criteria, limit=PACS_SEARCH_LIMIT)
    return [dataclasses.asdict(s) for s in found]


def _fetch_study(config: ViewerConfig, study_uid: str, path: Path) -> str:
    """Write the study's first chest radiograph (``client.dicom.domain_problem``) to
    ``path``, streaming the study from WADO-RS; its display name. ValueError (a message for
    the page) when the PACS fails or the study holds none."""
    skipped = []
    try:
        with config.pacs() as pacs:
            for ds in pacs.iter_study(study_uid):
                problem = domain_problem(ds) if "PixelData" in ds else "no pixel data"
                if problem is None:
                    ds.save_as(path, enforce_file_format=True)
                    parts = (ds.get("PatientID"), ds.get("StudyDate"), ds.get("Modality"))
                    return safe_name(" ".join(str(p) for p in parts if p)) + ".dcm"
                skipped.append(problem)
    except PacsError as e:
        raise ValueError(_pacs_message(e)) from None
    why = "; ".join(sorted(set(skipped)))
    raise ValueError(f"study {study_uid} holds no chest radiograph ({why})")


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n / 1024:.0f} KB"


def create_app(config: ViewerConfig | None = None) -> Starlette:
    """The viewer as an ASGI app (``uvicorn.run(create_app(cfg), host="127.0.0.1")``)."""
    config = config or ViewerConfig()
    store = JobStore(
        Path(tempfile.mkdtemp(prefix="cxr-sr-viewer-")),
        config.client,
        config.max_output_pixels,
        tile=config.tile,
    )

    async def index(request: Request) -> Response:
        return FileResponse(
            STATIC / "index.html",
            headers={
                "Content-Security-Policy": CSP,
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-cache",
            },
        )

    async def status(request: Request) -> Response:
        triton = await run_in_threadpool(_triton_status, config)
        return JSONResponse(
            {
                "triton": triton,
                "modes": MODES,
                "max_upload_bytes": config.max_upload_bytes,
                "max_output_pixels": config.max_output_pixels,
                "sampling": config.sampling,
                "pacs": config.dicomweb_url,
            }
        )

    def _job_options(request: Request) -> tuple[str, dict[str, Any]] | Response:
        """The mode and sampling parameters a job request asks for, or a 400."""
        q = request.query_params
        mode = q.get("mode", UPSCALE)
        if mode not in MODES:
            return _error(400, f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        try:
            page = {k: q[k] for k in PAGE_FIELDS if q.get(k, "").strip()}
            return mode, sampling_parameters(**{**config.sampling, **page})
        except (TypeError, ValueError) as e:
            return _error(400, str(e))

    async def create_job(request: Request) -> Response:
        options = _job_options(request)
        if isinstance(options, Response):
            return options
        mode, sampling = options
        q = request.query_params
        name = Path(q.get("name") or "upload").name or "upload"
        limit = config.max_upload_bytes
        too_big = f"{name} is larger than this viewer accepts ({_mb(limit)}, --max-upload-mb)"
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return _error(413, too_big)
        folder = store.new_folder()
        suffix = Path(name).suffix.lower()
        path = folder / ("upload" + (suffix if suffix in KNOWN_SUFFIXES else ""))
        size = 0
        try:
            with open(path, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        break
                    f.write(chunk)
        except ClientDisconnect:
            shutil.rmtree(folder, ignore_errors=True)
            return _error(400, f"the upload of {name} was interrupted")
        if size > limit or size == 0:
            shutil.rmtree(folder, ignore_errors=True)
            return _error(413, too_big) if size else _error(400, f"{name} is empty")
        job = store.submit(Job(name=name, mode=mode, path=path, sampling=sampling))
        return JSONResponse(job.summary(), status_code=202)

    def _job(request: Request) -> Job | Response:
        job = store.get(request.path_params["job_id"])
        if job is None:
            return _error(404, "no such job (the viewer keeps the last few; upload again)")
        return job

    async def job_status(request: Request) -> Response:
        job = _job(request)
        return job if isinstance(job, Response) else JSONResponse(job.summary())

    async def pixels(request: Request) -> Response:
        job = _job(request)
        if isinstance(job, Response):
            return job
        kind = request.path_params["kind"]
        if kind not in KINDS:
            return _error(404, f"image must be one of {', '.join(KINDS)}, got {kind!r}")
        if job.state != DONE or kind not in job.pixels:
            return _error(404, f"job {job.id} has no {kind} image")
        x = job.pixels[kind]
        return Response(
            x.tobytes(),
            media_type="application/octet-stream",
            headers={
                "X-Width": str(x.shape[1]),
                "X-Height": str(x.shape[0]),
                "Cache-Control": "no-store",
            },
        )

    async def download_png(request: Request) -> Response:
        job = _job(request)
        if isinstance(job, Response):
            return job
        if job.state != DONE or job.sr is None:
            return _error(404, f"job {job.id} has no SR yet")
        out = job.folder / f"{Path(job.name).stem}_sr.png"
        if not out.is_file():
            await run_in_threadpool(write_png, out, job.sr, 16)
        return FileResponse(out, media_type="image/png", filename=out.name)

    def _derived(job: Job) -> tuple[str, bytes]:
        source = pydicom.dcmread(job.path)
        ds = derive_instance(source, job.sr, job.model, sampling=job.sampling)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return dicom_file_name(ds), buffer.getvalue()

    async def download_dicom(request: Request) -> Response:
        job = _job(request)
        if isinstance(job, Response):
            return job
        if job.state != DONE or job.sr is None:
            return _error(404, f"job {job.id} has no SR yet")
        problem = job.dicom_problem()
        if problem:
            return _error(409, problem)
        try:
            name, data = await run_in_threadpool(_derived, job)
        except ValueError as e:
            return _error(422, f"cannot derive a DICOM from {job.name}: {e}")
        except Exception:  # a message, never a traceback; the details go to the log
            log.exception("derived DICOM of job %s (%s)", job.id, job.name)
            return _error(500, f"could not derive a DICOM from {job.name} (see the viewer's log)")
        return Response(
            data,
            media_type="application/dicom",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    async def pacs_studies(request: Request) -> Response:
        if not config.dicomweb_url:
            return _error(404, "no PACS configured (start the viewer with --dicomweb-url)")
        q = request.query_params
        criteria = {k: q[k].strip() for k in PACS_FIELDS if q.get(k, "").strip()}
        try:
            studies = await run_in_threadpool(_find_studies, config, criteria)
        except ValueError as e:
            return _error(400, str(e))
        except PacsError as e:
            return _error(503 if isinstance(e, PacsUnreachableError) else 502, _pacs_message(e))
        return JSONResponse({"studies": studies, "limit": PACS_SEARCH_LIMIT})

    async def pacs_job(request: Request) -> Response:
        if not config.dicomweb_url:
            return _error(404, "no PACS configured (start the viewer with --dicomweb-url)")
        options = _job_options(request)
        if isinstance(options, Response):
            return options
        mode, sampling = options
        study_uid = request.query_params.get("study_uid", "").strip()
        if not study_uid:
            return _error(400, "pick a study first")
        path = store.new_folder() / "upload.dcm"
        job = Job(
            name=f"study {study_uid}",
            mode=mode,
            path=path,
            sampling=sampling,
            fetch=lambda p: _fetch_study(config, study_uid, p),
        )
        store.submit(job)
        return JSONResponse(job.summary(), status_code=202)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        await run_in_threadpool(store.close)

    routes = [
        Route("/", index),
        Route("/api/status", status),
        Route("/api/jobs", create_job, methods=["POST"]),
        Route("/api/jobs/{job_id}", job_status),
        Route("/api/jobs/{job_id}/pixels/{kind}", pixels),
        Route("/api/jobs/{job_id}/sr.png", download_png),
        Route("/api/jobs/{job_id}/sr.dcm", download_dicom),
        Route("/api/pacs/studies", pacs_studies),
        Route("/api/pacs/jobs", pacs_job, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.config = config
    app.state.jobs = store
    return app
