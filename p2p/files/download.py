"""Resumable, verified downloads of the public weight files in ``weights_manifest.json``.

The manifest maps a model name (``sd-v1-5``, ``sd-v1-5-diffusers``, ...) to a list of
files with their URL, byte size and sha256 (``null`` where unknown).  ``download(name,
dest)`` fetches every file into ``dest/<name>/<path>`` and returns what to pass to
``--model``: the single checkpoint file, or the diffusers-style folder.

* Data is written to ``<file>.part`` and resumed with an HTTP ``Range`` request.
* A file gets its final name (``os.replace``) only after its size and sha256 were
  checked, so a partial or corrupt file never sits under the final name.
* Files already present are re-checked, never trusted; files without a known
  sha256 are kept with a warning that they could not be verified.
* ``base_url`` or the ``P2P_DOWNLOAD_BASE_URL`` environment variable replaces the
  ``https://huggingface.co`` prefix (mirrors, tests); ``HF_TOKEN`` is sent as
  ``Authorization: Bearer`` to that first host only, never to redirect targets on
  another host (the hub redirects to a CDN with signed URLs).

Only the standard library (``urllib``, ``hashlib``) and ``tqdm`` are used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from urllib.parse import urlsplit

from tqdm import tqdm

from models.errors import UserError

__all__ = ["DownloadError", "ManifestError", "UnknownModelError", "UnverifiedFileWarning",
           "load_manifest", "validate_manifest", "list_models", "download", "sha256_file"]

HF_BASE_URL = "https://huggingface.co"
BASE_URL_ENV = "P2P_DOWNLOAD_BASE_URL"
TOKEN_ENV = "HF_TOKEN"
MANIFEST_NAME = "weights_manifest.json"
LAYOUTS = ("single-file", "diffusers", "shipped")  # shipped: in this repository, verified, never fetched
FAMILIES = ("sd-v1", "sd-v2", "ldm", "sdxl")
CHUNK = 1 << 20
TIMEOUT_S = 60
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class DownloadError(UserError, RuntimeError):
    """A file could not be fetched, or its content failed verification."""


class ManifestError(UserError):
    """The weights manifest is missing or malformed."""


class UnknownModelError(KeyError, UserError):
    """The requested model name is not in the manifest."""

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0])


class UnverifiedFileWarning(UserWarning):
    """A file was accepted without a sha256 to check it against."""


# --------------------------------------------------------------------------- manifest

def load_manifest(path: str | Path | None = None) -> dict:
    """Read and validate the manifest (default: the repository's ``weights_manifest.json``,
    or a copy installed next to this module as package data)."""
    if path is None:
        package = Path(__file__).resolve().parents[1]  # p2p/
        candidates = [package.parent / MANIFEST_NAME, package / MANIFEST_NAME]
        path = next((p for p in candidates if p.is_file()), candidates[0])
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ManifestError(f"cannot read weights manifest {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ManifestError(f"weights manifest {path} is not valid JSON: {exc}") from exc
    validate_manifest(manifest, source=str(path))
    return manifest


def validate_manifest(manifest: dict, source: str = "manifest") -> None:
    """Raise ``ManifestError`` naming the entry and field at fault, if any."""
    if not isinstance(manifest, dict) or not manifest:
        raise ManifestError(f"{source}: expected a non-empty JSON object of model entries")
    for name, entry in manifest.items():
        where = f"{source}: entry {name!r}"
        if not isinstance(entry, dict):
            raise ManifestError(f"{where}: expected an object")
        for key in ("description", "license"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise ManifestError(f"{where}: {key!r} must be a non-empty string")
        if entry.get("layout") not in LAYOUTS:
            raise ManifestError(f"{where}: 'layout' must be one of {LAYOUTS}")
        if entry.get("family") not in FAMILIES:
            raise ManifestError(f"{where}: 'family' must be one of {FAMILIES}")
        files = entry.get("files")
        if not isinstance(files, list) or not files:
            raise ManifestError(f"{where}: 'files' must be a non-empty list")
        if entry["layout"] == "single-file" and len(files) != 1:
            raise ManifestError(f"{where}: a single-file entry must list exactly one file")
        for i, spec in enumerate(files):
            _validate_file(spec, f"{where} file #{i}", shipped=entry["layout"] == "shipped")


def _validate_file(spec: dict, where: str, shipped: bool = False) -> None:
    if not isinstance(spec, dict):
        raise ManifestError(f"{where}: expected an object")
    path = spec.get("path")
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path \
            or ".." in path.split("/"):
        raise ManifestError(f"{where}: 'path' must be a relative POSIX path without '..'")
    if shipped:
        if not (isinstance(spec.get("size"), int) and isinstance(spec.get("sha256"), str)):
            raise ManifestError(f"{where} ({path}): a shipped file needs its size and sha256")
    elif not isinstance(spec.get("url"), str) or not spec["url"].startswith(("http://", "https://")):
        raise ManifestError(f"{where} ({path}): 'url' must be an http(s) URL")
    size, sha = spec.get("size"), spec.get("sha256")
    if size is not None and (type(size) is not int or size < 0):
        raise ManifestError(f"{where} ({path}): 'size' must be a non-negative integer or null")
    if sha is not None and (not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha)):
        raise ManifestError(f"{where} ({path}): 'sha256' must be 64 lowercase hex chars or null")
    if (size is None or sha is None) and not spec.get("note"):
        raise ManifestError(f"{where} ({path}): a null size/sha256 needs a 'note' saying why")


def list_models(manifest: dict | None = None) -> list[str]:
    """Names of the downloadable models, sorted."""
    return sorted(load_manifest() if manifest is None else manifest)


# --------------------------------------------------------------------------- download

def download(name: str, dest: str | Path, *, manifest: dict | None = None,
             progress: bool = True, base_url: str | None = None) -> Path:
    """Fetch and verify every file of model ``name`` into ``dest/name/``.

    Returns the path for ``--model``: the checkpoint file for ``single-file`` entries,
    the folder ``dest/name`` otherwise.  Raises ``UnknownModelError`` for an unknown
    name and ``DownloadError`` for network failures and verification mismatches.
    """
    manifest = load_manifest() if manifest is None else manifest
    if name not in manifest:
        raise UnknownModelError(f"unknown model {name!r}; known models: "
                                f"{', '.join(sorted(manifest))}")
    entry = manifest[name]
    validate_manifest({name: entry})
    if entry["layout"] == "shipped":
        return verify_shipped(name, entry)
    base = base_url or os.environ.get(BASE_URL_ENV) or None
    root = Path(dest) / name
    for spec in entry["files"]:
        _download_file(spec, root, base, progress)
    if entry["layout"] == "single-file":
        return root / entry["files"][0]["path"]
    return root


def verify_shipped(name: str, entry: dict) -> Path:
    """A model that ships inside this repository (the embedded default): nothing to fetch; its files are
    checked against the manifest and its folder (`--model`) returned."""
    repo = Path(__file__).resolve().parents[2]
    for spec in entry["files"]:
        path = repo / spec["path"]
        problem = _problem(path, spec["size"], spec["sha256"]) if path.is_file() else "missing"
        if problem:
            raise DownloadError(f"{name} ships with p2p at {path}, but that file is {problem}; restore it with "
                                f"`git checkout -- {spec['path']}` (or retrain: {entry.get('note', 'p2p.world.train')})")
    return repo / Path(entry["files"][0]["path"]).parent


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_file(spec: dict, root: Path, base: str | None, progress: bool) -> None:
    rel, size, sha = spec["path"], spec["size"], spec["sha256"]
    final = root / rel
    part = final.with_name(final.name + ".part")
    if final.is_file():
        if _problem(final, size, sha) is None:
            _warn_unverified(rel, sha, "kept the existing file")
            return
        final.unlink()  # present but wrong: never trusted, fetched again
    final.parent.mkdir(parents=True, exist_ok=True)
    url = _resolve_url(spec["url"], base)
    if part.is_file() and size is not None and part.stat().st_size > size:
        part.unlink()  # longer than the real file: cannot be a prefix of it
    if not (part.is_file() and size is not None and part.stat().st_size == size):
        _fetch(url, part, rel, size, progress)
    problem = _problem(part, size, sha)
    if problem is not None:
        part.unlink()
        raise DownloadError(f"{rel}: {problem} (from {url}). The downloaded data was deleted; "
                            "re-run the download to fetch it again.")
    _warn_unverified(rel, sha, "downloaded")
    os.replace(part, final)


def _problem(path: Path, size: int | None, sha: str | None) -> str | None:
    """Why ``path`` does not match the manifest, or None if it matches (as far as known)."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return f"size mismatch: expected {size} bytes, got {actual_size} bytes"
    if sha is not None:
        actual = sha256_file(path)
        if actual != sha:
            return f"sha256 mismatch: expected {sha}, got {actual}"
    return None


def _warn_unverified(rel: str, sha: str | None, action: str) -> None:
    if sha is None:
        warnings.warn(f"{rel}: {action}, but it could not be verified (no sha256 in the "
                      "manifest)", UnverifiedFileWarning, stacklevel=4)


def _resolve_url(url: str, base: str | None) -> str:
    if base and url.startswith(HF_BASE_URL + "/"):
        return base.rstrip("/") + url[len(HF_BASE_URL):]
    return url


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follow redirects; keep ``Authorization`` only while the host stays the same."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        auth = req.unredirected_hdrs.get("Authorization")
        if new is not None and auth and urlsplit(newurl).netloc == urlsplit(req.full_url).netloc:
            new.add_unredirected_header("Authorization", auth)
        return new


_OPENER = urllib.request.build_opener(_RedirectHandler)


def _open(url: str, offset: int):
    request = urllib.request.Request(url, headers={"User-Agent": "p2p-download/1"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    token = os.environ.get(TOKEN_ENV)
    if token:
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    return _OPENER.open(request, timeout=TIMEOUT_S)


def _fetch(url: str, part: Path, rel: str, size: int | None, progress: bool) -> None:
    """Append the missing bytes of ``url`` to ``part`` (restarting it when needed)."""
    offset = part.stat().st_size if part.is_file() else 0
    try:
        try:
            response = _open(url, offset)
        except urllib.error.HTTPError as exc:
            if exc.code != 416 or not offset:
                raise
            # Range Not Satisfiable: the part is complete if the server says so.
            total = (exc.headers.get("Content-Range") or "").rpartition("/")[2]
            exc.close()
            if not total.isdigit() or int(total) == offset:
                return
            part.unlink()
            offset, response = 0, _open(url, 0)
        with response:
            if response.status == 206:
                start = (response.headers.get("Content-Range") or "").removeprefix("bytes ")
                if start.partition("-")[0] != str(offset):
                    raise DownloadError(f"{rel}: server answered an unexpected range "
                                        f"{start!r} for 'bytes={offset}-' (from {url})")
            else:  # 200: the server ignored Range, start again from byte 0
                offset = 0
            length = response.headers.get("Content-Length")
            expected = offset + int(length) if length and length.isdigit() else size
            _copy(response, part, offset, expected, rel, progress)
    except urllib.error.HTTPError as exc:
        raise DownloadError(_http_message(rel, url, exc.code, exc.reason)) from exc
    except (urllib.error.URLError, OSError) as exc:  # also resets, timeouts, short reads
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"{rel}: network error while downloading {url}: {reason}. "
                            f"Partial data is kept in {part.name}; re-run to resume.") from exc


def _copy(response, part: Path, offset: int, expected: int | None, rel: str,
          progress: bool) -> None:
    received = offset
    with open(part, "ab" if offset else "wb") as out, \
            tqdm(total=expected, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                 desc=rel, file=sys.stderr, disable=not progress, leave=False) as bar:
        for block in iter(lambda: response.read(CHUNK), b""):
            out.write(block)
            received += len(block)
            bar.update(len(block))
    if expected is not None and received < expected:
        raise ConnectionError(f"connection closed after {received} of {expected} bytes")


def _http_message(rel: str, url: str, code: int, reason) -> str:
    message = f"{rel}: HTTP {code} {reason} for {url}."
    if code in (401, 403, 404):
        message += (" Some hub repositories are gated: accept the model licence on "
                    "huggingface.co while logged in, then set the HF_TOKEN environment "
                    "variable (it is sent as 'Authorization: Bearer <token>').")
    if code == 404:
        message += " Also check the manifest's repository, revision and file path."
    return message
