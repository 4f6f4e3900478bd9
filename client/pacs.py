"""A PACS over DICOMweb (QIDO-RS, WADO-RS, STOW-RS) with ``dicomweb-client``.

    pacs = DicomWebPacs("https://pacs.example.org/dicom-web", credentials_from_env())
    for study in pacs.find_studies(patient_id="P123", modality="CR", date_from="20240101"):
        datasets = pacs.retrieve_study(study.study_uid)     # list of pydicom Datasets
        ...
        pacs.store(derived)                                 # STOW-RS, one request

Credentials never travel on the command line: :func:`credentials_from_env` reads
``CXR_SR_PACS_USER`` + ``CXR_SR_PACS_PASSWORD`` (HTTP basic) or ``CXR_SR_PACS_TOKEN``
(bearer), or a file named by ``CXR_SR_PACS_CREDENTIALS_FILE`` (or passed as a path). The
secret is held by a ``requests`` auth object that sets the header on each request, so it
never appears in the headers ``dicomweb-client`` logs, nor in any message of this module;
a URL carrying ``user:password@`` is refused.

Errors: :class:`PacsUnreachableError` when no PACS answers (refused, DNS, timeout: exit
code 3 in the CLI), :class:`PacsError` for an answer that is an error (authentication
refused, unknown study, a STOW-RS failure).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

ENV_USER = "CXR_SR_PACS_USER"
ENV_PASSWORD = "CXR_SR_PACS_PASSWORD"
ENV_TOKEN = "CXR_SR_PACS_TOKEN"
ENV_CREDENTIALS_FILE = "CXR_SR_PACS_CREDENTIALS_FILE"
# attempts per HTTP request on a connection error or HTTP 408/429/503/504 (1 s, then 2 s apart)
HTTP_ATTEMPTS = 3

# STOW-RS response attributes (PS3.18 10.5.3): instances not stored, and why
_FAILED_SOP_SEQUENCE = "FailedSOPSequence"
_FAILURE_REASON = "FailureReason"


class PacsError(RuntimeError):
    """The PACS answered, with an error (authentication, unknown study, refused store)."""


class PacsUnreachableError(PacsError):
    """No PACS answered at the address (connection refused, unknown host, timeout), or it
    refused us as a whole (:class:`PacsAccessError`): nothing more can be done this run."""


class PacsAccessError(PacsUnreachableError):
    """The PACS refused the credentials (HTTP 401 / 403)."""


@dataclass(frozen=True)
class Credentials:
    """HTTP credentials for a DICOMweb server: basic (``username`` + ``password``) or a bearer
    ``token``. ``repr`` shows which kind, never the secret."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        basic = self.username is not None or self.password is not None
        if basic and self.token is not None:
            raise ValueError("give a username and password or a token, not both")
        if basic and not (self.username and self.password is not None):
            raise ValueError("basic authentication needs both a username and a password")
        if not basic and not self.token:
            raise ValueError("no credentials given (a username and password, or a token)")

    @property
    def kind(self) -> str:
        return "bearer token" if self.token else f"basic auth as {self.username!r}"

    def auth(self) -> requests.auth.AuthBase:
        if self.token:
            return _BearerAuth(self.token)
        return requests.auth.HTTPBasicAuth(self.username, self.password)


class _BearerAuth(requests.auth.AuthBase):
    """Sets ``Authorization: Bearer`` on each request (kept out of logged header dicts)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self._token}"
        return r

    def __repr__(self) -> str:
        return "_BearerAuth(<hidden>)"


def read_credentials_file(path: str | os.PathLike) -> Credentials:
    """Credentials from a JSON file: ``{"username": ..., "password": ...}`` or
    ``{"token": ...}``. A file others can read is used, with a warning."""
    path = Path(path)
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except OSError as e:
        raise ValueError(f"credentials file {path}: cannot read it ({e.strerror})") from None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("credentials file %s is readable by other users (chmod 600 it)", path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # the message names the position only, never the file's content
        raise ValueError(f"credentials file {path}: not JSON (line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"credentials file {path}: expected a JSON object")
    unknown = sorted(set(data) - {"username", "password", "token"})
    if unknown:
        raise ValueError(f"credentials file {path}: unknown keys {', '.join(unknown)}")
    try:
        return Credentials(data.get("username"), data.get("password"), data.get("token"))
    except ValueError as e:
        raise ValueError(f"credentials file {path}: {e}") from None


def credentials_from_env(
    file: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None
) -> Credentials | None:
    """The DICOMweb credentials to use, or None for an open server.

    Order: ``file`` (a path, e.g. from ``--credentials-file``), then the file named by
    ``CXR_SR_PACS_CREDENTIALS_FILE``, then ``CXR_SR_PACS_TOKEN``, then ``CXR_SR_PACS_USER``
    with ``CXR_SR_PACS_PASSWORD``. Raises ``ValueError`` for incomplete or unreadable ones.
    """
    env = os.environ if environ is None else environ
    file = file or env.get(ENV_CREDENTIALS_FILE)
    if file:
        return read_credentials_file(file)
    if env.get(ENV_TOKEN):
        return Credentials(token=env[ENV_TOKEN])
    user, password = env.get(ENV_USER), env.get(ENV_PASSWORD)
    if user or password:
        if not (user and password is not None):
            raise ValueError(f"set both {ENV_USER} and {ENV_PASSWORD} (or {ENV_TOKEN})")
        return Credentials(user, password)
    return None


@dataclass(frozen=True)
class StudySummary:
    """One QIDO-RS study match (attributes a listing needs)."""

    study_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    modalities: tuple[str, ...]
    description: str
    accession: str
    instances: int | None

    @classmethod
    def from_json(cls, item: dict) -> StudySummary:
        ds = Dataset.from_json(item)
        count = ds.get("NumberOfStudyRelatedInstances")
        modalities = ds.get("ModalitiesInStudy") or ()
        if isinstance(modalities, str):
            modalities = (modalities,)
        return cls(
            study_uid=str(ds.get("StudyInstanceUID", "")),
            patient_id=str(ds.get("PatientID", "")),
            patient_name=str(ds.get("PatientName", "")),
            study_date=str(ds.get("StudyDate", "")),
            modalities=tuple(str(m) for m in modalities),
            description=str(ds.get("StudyDescription", "")),
            accession=str(ds.get("AccessionNumber", "")),
            instances=int(count) if count not in (None, "") else None,
        )


def _check_date(value: str | None, name: str) -> str:
    if value is None:
        return ""
    text = str(value).replace("-", "")
    if len(text) != 8 or not text.isdigit():
        raise ValueError(f"{name} must be a date YYYYMMDD or YYYY-MM-DD, got {value!r}")
    return text


def study_filters(
    *,
    study_uid: str | None = None,
    patient_id: str | None = None,
    modality: str | None = None,
    date_from: str | None = None,
    date_to: str | None = None,
) -> dict[str, str]:
    """QIDO-RS search filters (DICOM attribute keywords) for the given criteria.

    Dates are ``YYYYMMDD`` or ``YYYY-MM-DD``; one bound alone is an open range
    (``StudyDate=20240101-``, PS3.4 C.2.2.2.5).
    """
    filters: dict[str, str] = {}
    if study_uid:
        filters["StudyInstanceUID"] = study_uid
    if patient_id:
        filters["PatientID"] = patient_id
    if modality:
        filters["ModalitiesInStudy"] = modality.upper()
    lo, hi = _check_date(date_from, "date_from"), _check_date(date_to, "date_to")
    if lo and hi and lo > hi:
        raise ValueError(f"date range is empty: {date_from} is after {date_to}")
    if lo or hi:
        filters["StudyDate"] = lo if lo == hi else f"{lo}-{hi}"
    return filters


class DicomWebPacs:
    """A DICOMweb server (``url``: its base, e.g. ``http://host:8042/dicom-web``).

    Args:
        url: http(s) base URL of the QIDO/WADO/STOW services, without credentials.
        credentials: from :func:`credentials_from_env`; None for an open server.
        timeout_s: limit for one HTTP request (connect and each read), seconds; a request
            that fails to connect or gets HTTP 408/429/503/504 is tried :data:`HTTP_ATTEMPTS`
            times in all.
    """

    def __init__(
        self, url: str, credentials: Credentials | None = None, *, timeout_s: float = 120.0
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"DICOMweb URL must be http(s)://host[:port]/path, got {url!r}")
        if parts.username or parts.password:
            raise ValueError(
                "the DICOMweb URL must not carry credentials: set "
                f"{ENV_USER}/{ENV_PASSWORD}, {ENV_TOKEN} or a credentials file"
            )
        self.url = url.rstrip("/")
        self.credentials = credentials
        session = requests.Session()
        if credentials is not None:
            session.auth = credentials.auth()
        self._session = session
        self._client = DICOMwebClient(self.url, session=session, timeout=timeout_s)
        # dicomweb-client retries every failed connection 5 times (a minute of waiting for a
        # PACS that is down); keep a short retry for a passing hiccup
        self._client.set_http_retry_params(
            retry=True, max_attempts=HTTP_ATTEMPTS, wait_exponential_multiplier=500
        )

    def __repr__(self) -> str:
        auth = self.credentials.kind if self.credentials else "no credentials"
        return f"DicomWebPacs({self.url!r}, {auth})"

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> DicomWebPacs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _error(self, e: Exception, action: str) -> PacsError:
        """A PACS error naming the server and the action, never a secret."""
        if isinstance(e, requests.HTTPError) and e.response is not None:
            status = e.response.status_code
            why = {
                401: "authentication refused (check the credentials)",
                403: "access forbidden for these credentials",
                404: "not found",
            }.get(status, e.response.reason or "error")
            message = f"DICOMweb {self.url}: {action}: HTTP {status} {why}"
            return PacsAccessError(message) if status in (401, 403) else PacsError(message)
        if isinstance(e, (requests.ConnectionError, requests.Timeout)):
            kind = "timed out" if isinstance(e, requests.Timeout) else "connection failed"
            return PacsUnreachableError(f"DICOMweb {self.url}: {action}: no answer ({kind})")
        return PacsError(f"DICOMweb {self.url}: {action}: {type(e).__name__}: {e}")

    def _call(self, action: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (requests.RequestException, ValueError) as e:
            raise self._error(e, action) from None

    def find_studies(
        self,
        *,
        study_uid: str | None = None,
        patient_id: str | None = None,
        modality: str | None = None,
        date_from: str | None = None,
        date_to: str | None = None,
        limit: int | None = None,
    ) -> list[StudySummary]:
        """QIDO-RS study search; every criterion given must match (see :func:`study_filters`)."""
        filters = study_filters(
            study_uid=study_uid,
            patient_id=patient_id,
            modality=modality,
            date_from=date_from,
            date_to=date_to,
        )
        fields = ["ModalitiesInStudy", "NumberOfStudyRelatedInstances", "StudyDescription"]
        found = self._call(
            "search for studies",
            self._client.search_for_studies,
            search_filters=filters,
            fields=fields,
            limit=limit,
        )
        return [StudySummary.from_json(item) for item in found]

    def ping(self) -> None:
        """Raise :class:`PacsUnreachableError` / :class:`PacsError` unless QIDO-RS answers."""
        self._call("search for studies", self._client.search_for_studies, limit=1)

    def retrieve_study(self, study_uid: str) -> list[Dataset]:
        """Every instance of a study (WADO-RS), as datasets with pixel data."""
        found = self._call(f"retrieve study {study_uid}", self._client.retrieve_study, study_uid)
        if not found:
            raise PacsError(f"DICOMweb {self.url}: study {study_uid} has no instances")
        return found

    def iter_study(self, study_uid: str) -> Iterator[Dataset]:
        """Every instance of a study (WADO-RS), one at a time as the response streams in
        (memory bounded by one instance, not the study)."""
        action = f"retrieve study {study_uid}"
        n = 0
        try:
            for ds in self._client.iter_study(study_uid):
                n += 1
                yield ds
        except (requests.RequestException, ValueError) as e:
            raise self._error(e, action) from None
        if n == 0:
            raise PacsError(f"DICOMweb {self.url}: study {study_uid} has no instances")

    def store(self, datasets: Sequence[Dataset]) -> int:
        """STOW-RS the datasets (one request per study); returns how many were stored.

        Raises :class:`PacsError` naming each instance the server refused, and why.
        """
        by_study: dict[str, list[Dataset]] = {}
        for ds in datasets:
            by_study.setdefault(str(ds.StudyInstanceUID), []).append(ds)
        stored = 0
        for study_uid, group in by_study.items():
            action = f"store {len(group)} instance(s) in study {study_uid}"
            response = self._call(
                action, self._client.store_instances, group, study_instance_uid=study_uid
            )
            failed = _stow_failures(response)
            if failed:
                raise PacsError(f"DICOMweb {self.url}: {action}: refused {'; '.join(failed)}")
            stored += len(group)
        return stored


def _stow_failures(response: Dataset | None) -> list[str]:
    """``"<SOP Instance UID> (reason 0xNNNN)"`` for each failure in a STOW-RS response."""
    if response is None or _FAILED_SOP_SEQUENCE not in response:
        return []
    out = []
    for item in response.FailedSOPSequence:
        reason = item.get(_FAILURE_REASON)
        code = f"reason 0x{int(reason):04X}" if reason is not None else "no reason given"
        out.append(f"{item.get('ReferencedSOPInstanceUID', '?')} ({code})")
    return out
