"""Tests for p2p.files.download against a local HTTP server (no network)."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from p2p.files import download as dl

HF = "https://huggingface.co"
REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "checkpoints.md"  # beside the checkout, when present
REFERENCE_SD2 = REFERENCE.with_name("sd2-sdxl.md")  # the SD 2.x / SDXL files


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.files`` (url path -> bytes) with optional misbehaviour."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        srv = self.server
        path = self.path.split("?")[0]
        entry = {"path": path, "range": self.headers.get("Range"),
                 "auth": self.headers.get("Authorization"), "host": self.headers.get("Host"),
                 "sent": 0}
        srv.log.append(entry)
        if path in srv.redirect:
            self.send_response(302)
            self.send_header("Location", srv.redirect[path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path in srv.not_found or path not in srv.files:
            self.send_error(404, "Not Found")
            return
        data = srv.files[path]
        if path in srv.corrupt:
            data = bytes(b ^ 0xFF for b in data[:16]) + data[16:]
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", entry["range"] or "")
        if match and not srv.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_after is not None:  # send part of the body, then drop the connection
            body = body[:srv.cut_after]
            srv.cut_after = None
            self.close_connection = True
        self.wfile.write(body)
        entry["sent"] = len(body)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.log, srv.redirect = {}, [], {}
    srv.not_found, srv.corrupt = set(), set()
    srv.ignore_range, srv.cut_after = False, None
    srv.base_url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _blob(n: int, seed: int) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (n // 32) + bytes(n % 32)


def _file(server, rel: str, data: bytes, *, size=True, sha=True) -> dict:
    url_path = f"/test/repo/resolve/main/{rel}"
    server.files[url_path] = data
    spec = {"path": rel, "url": HF + url_path,
            "size": len(data) if size else None,
            "sha256": hashlib.sha256(data).hexdigest() if sha else None}
    if not (size and sha):
        spec["note"] = "unknown in this test"
    return spec


def _entry(layout: str, files: list[dict]) -> dict:
    return {"description": "test model", "layout": layout, "family": "sd-v1",
            "license": "test", "files": files}


@pytest.fixture
def model(server):
    """A diffusers-layout model with two files, and its data."""
    a, b = _blob(300_000, 1), _blob(5_000, 2)
    manifest = {"tiny": _entry("diffusers", [_file(server, "unet/w.safetensors", a),
                                              _file(server, "model_index.json", b)]),
                "other": _entry("single-file", [_file(server, "one.ckpt", _blob(100, 3))])}
    return manifest, {"unet/w.safetensors": a, "model_index.json": b}


def _get(server, manifest, tmp_path, name="tiny", **kw):
    return dl.download(name, tmp_path, manifest=manifest, progress=False,
                       base_url=server.base_url, **kw)


def test_fresh_download_verifies_and_returns_folder(server, model, tmp_path):
    manifest, data = model
    out = _get(server, manifest, tmp_path)
    assert out == tmp_path / "tiny"
    for rel, content in data.items():
        assert (out / rel).read_bytes() == content
    assert not list(out.rglob("*.part"))
    assert [e["range"] for e in server.log] == [None, None]


def test_single_file_returns_the_file_and_env_base_url(server, model, tmp_path, monkeypatch):
    monkeypatch.setenv(dl.BASE_URL_ENV, server.base_url)
    out = dl.download("other", tmp_path, manifest=model[0], progress=False)
    assert out == tmp_path / "other" / "one.ckpt" and out.read_bytes() == _blob(100, 3)


def test_resume_after_cut_connection(server, model, tmp_path):
    manifest, data = model
    server.cut_after = 100_000
    with pytest.raises(dl.DownloadError, match="re-run to resume"):
        _get(server, manifest, tmp_path)
    part = tmp_path / "tiny" / "unet" / "w.safetensors.part"
    assert part.stat().st_size == 100_000
    assert not (tmp_path / "tiny" / "unet" / "w.safetensors").exists()
    server.log.clear()
    out = _get(server, manifest, tmp_path)
    first = server.log[0]
    assert first["range"] == "bytes=100000-" and first["sent"] == 300_000 - 100_000
    assert (out / "unet/w.safetensors").read_bytes() == data["unet/w.safetensors"]
    assert not part.exists()


def test_server_ignoring_range_restarts_from_zero(server, model, tmp_path):
    manifest, data = model
    part = tmp_path / "tiny" / "unet" / "w.safetensors.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage that is not a prefix of the file")
    server.ignore_range = True
    out = _get(server, manifest, tmp_path)
    assert server.log[0]["range"] is not None and server.log[0]["sent"] == 300_000
    assert (out / "unet/w.safetensors").read_bytes() == data["unet/w.safetensors"]


def test_complete_part_without_size_gets_416_and_is_accepted(server, tmp_path):
    data = _blob(1_000, 4)
    manifest = {"m": _entry("single-file", [_file(server, "x.bin", data, size=False)])}
    part = tmp_path / "m" / "x.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data)
    out = _get(server, manifest, tmp_path, name="m")
    assert server.log[0]["range"] == "bytes=1000-" and out.read_bytes() == data


def test_part_longer_than_remote_file_is_restarted(server, tmp_path):
    data = _blob(1_000, 7)
    manifest = {"m": _entry("single-file", [_file(server, "x.bin", data, size=False)])}
    part = tmp_path / "m" / "x.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data + b"tail")
    out = _get(server, manifest, tmp_path, name="m")
    assert [e["range"] for e in server.log] == ["bytes=1004-", None]
    assert out.read_bytes() == data and not part.exists()


def test_progress_bar_goes_to_stderr(server, model, tmp_path, capsys):
    dl.download("other", tmp_path, manifest=model[0], base_url=server.base_url)
    captured = capsys.readouterr()
    assert captured.out == "" and "one.ckpt" in captured.err


def test_complete_part_with_known_size_needs_no_request(server, model, tmp_path):
    manifest, data = model
    for rel, content in data.items():
        part = tmp_path / "tiny" / (rel + ".part")
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_bytes(content)
    _get(server, manifest, tmp_path)
    assert server.log == []


def test_corrupt_content_is_rejected_and_deleted(server, model, tmp_path):
    manifest, data = model
    server.corrupt.add("/test/repo/resolve/main/unet/w.safetensors")
    with pytest.raises(dl.DownloadError) as info:
        _get(server, manifest, tmp_path)
    message = str(info.value)
    bad = bytes(b ^ 0xFF for b in data["unet/w.safetensors"][:16]) + \
        data["unet/w.safetensors"][16:]
    assert "unet/w.safetensors" in message and "re-run" in message
    assert hashlib.sha256(data["unet/w.safetensors"]).hexdigest() in message
    assert hashlib.sha256(bad).hexdigest() in message
    assert not list((tmp_path / "tiny").rglob("w.safetensors*"))


def test_wrong_size_is_rejected(server, tmp_path):
    spec = _file(server, "x.bin", _blob(64, 5))
    spec["size"] = 65
    with pytest.raises(dl.DownloadError, match="expected 65 bytes, got 64 bytes"):
        _get(server, {"m": _entry("single-file", [spec])}, tmp_path, name="m")
    assert not list((tmp_path / "m").iterdir())


def test_404_raises_download_error(server, model, tmp_path):
    manifest, _ = model
    server.not_found.add("/test/repo/resolve/main/model_index.json")
    with pytest.raises(dl.DownloadError, match="HTTP 404") as info:
        _get(server, manifest, tmp_path)
    assert "HF_TOKEN" in str(info.value) and "model_index.json" in str(info.value)


def test_unreachable_server_raises_download_error(model, tmp_path):
    with pytest.raises(dl.DownloadError, match="network error"):
        dl.download("other", tmp_path, manifest=model[0], progress=False,
                    base_url="http://127.0.0.1:9")


def test_present_files_are_skipped(server, model, tmp_path):
    manifest, _ = model
    _get(server, manifest, tmp_path)
    server.log.clear()
    _get(server, manifest, tmp_path)
    assert server.log == []


def test_present_wrong_file_is_replaced(server, model, tmp_path):
    manifest, data = model
    _get(server, manifest, tmp_path)
    target = tmp_path / "tiny" / "model_index.json"
    target.write_bytes(b"x" * len(data["model_index.json"]))  # right size, wrong hash
    server.log.clear()
    _get(server, manifest, tmp_path)
    assert [e["path"] for e in server.log] == ["/test/repo/resolve/main/model_index.json"]
    assert target.read_bytes() == data["model_index.json"]


def test_unknown_sha_warns(server, tmp_path):
    manifest = {"m": _entry("single-file", [_file(server, "x.bin", _blob(10, 6), sha=False)])}
    with pytest.warns(dl.UnverifiedFileWarning, match="could not be verified"):
        _get(server, manifest, tmp_path, name="m")
    with pytest.warns(UserWarning, match="could not be verified"):
        _get(server, manifest, tmp_path, name="m")  # kept, still unverified


def test_unknown_model_lists_names(model, tmp_path):
    with pytest.raises(KeyError) as info:
        dl.download("nope", tmp_path, manifest=model[0], progress=False)
    assert isinstance(info.value, ValueError)
    assert "'nope'" in str(info.value) and "other, tiny" in str(info.value)
    assert dl.list_models(model[0]) == ["other", "tiny"]


def test_token_sent_to_first_host_only(server, model, tmp_path, monkeypatch):
    monkeypatch.setenv(dl.TOKEN_ENV, "secret")
    port = server.server_address[1]
    src = "/test/repo/resolve/main/one.ckpt"
    server.files["/cdn/one.ckpt"] = server.files[src]
    server.redirect[src] = f"http://localhost:{port}/cdn/one.ckpt"
    dl.download("other", tmp_path, manifest=model[0], progress=False, base_url=server.base_url)
    assert [(e["path"], e["auth"]) for e in server.log] == [(src, "Bearer secret"),
                                                           ("/cdn/one.ckpt", None)]


def test_bad_manifest_is_rejected(tmp_path):
    bad = {"m": _entry("diffusers", [{"path": "a", "url": HF + "/a", "size": 1,
                                      "sha256": "ABC"}])}
    with pytest.raises(dl.ManifestError, match=r"entry 'm' file #0 \(a\): 'sha256'"):
        dl.validate_manifest(bad)
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(dl.ManifestError, match="not valid JSON"):
        dl.load_manifest(tmp_path / "m.json")
    no_note = {"m": _entry("single-file", [{"path": "a", "url": HF + "/a", "size": None,
                                            "sha256": None}])}
    with pytest.raises(dl.ManifestError, match="needs a 'note'"):
        dl.validate_manifest(no_note)


# ------------------------------------------------------------------ the real manifest

def test_real_manifest_loads_and_is_well_formed():
    manifest = dl.load_manifest()
    assert manifest == json.loads((REPO_ROOT / "weights_manifest.json").read_text())
    required = {"sd-v1-5", "sd-v1-5-diffusers", "sd-v1-5-diffusers-fp16", "sd-v1-4-diffusers",
                "sd-v1-4-original", "ldm-text2im-large-256"}
    assert required <= set(dl.list_models())
    for name, entry in manifest.items():
        assert {"description", "layout", "family", "license", "files"} <= set(entry), name
        assert entry["layout"] in dl.LAYOUTS and entry["family"] in dl.FAMILIES
        paths = [f["path"] for f in entry["files"]]
        assert len(paths) == len(set(paths)), name
        if entry["layout"] == "shipped":  # in this repository (the embedded model): verified, never fetched
            assert all((REPO_ROOT / f["path"]).is_file() and f["size"] and f["sha256"] for f in entry["files"])
            continue
        for spec in entry["files"]:
            assert {"path", "url", "size", "sha256"} <= set(spec)
            assert spec["sha256"] is None or re.fullmatch(r"[0-9a-f]{64}", spec["sha256"])
            assert spec["url"].startswith(HF + "/") and spec["url"].endswith("/" + spec["path"])
    assert manifest["ldm-text2im-large-256"]["family"] == "ldm"
    assert all(not f["path"].endswith(".safetensors") or ".fp16." in f["path"]
               for f in manifest["sd-v1-5-diffusers-fp16"]["files"])


def test_sd15_single_file_entry_matches_reference():
    (spec,) = dl.load_manifest()["sd-v1-5"]["files"]
    assert spec["path"] == "v1-5-pruned-emaonly.safetensors"
    assert spec["size"] == 4265146304
    assert spec["sha256"] == "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"
    assert "/resolve/451f4fe16113bff5a5d2269ed5ad43b0592e9a14/" in spec["url"]


@pytest.mark.skipif(not REFERENCE.is_file(), reason="reference doc not available")
def test_every_known_hash_and_size_appears_in_reference():
    text = "\n".join(p.read_text(encoding="utf-8") for p in (REFERENCE, REFERENCE_SD2) if p.is_file())
    digits = re.sub(r"(?<=\d),(?=\d{3})", "", text)  # 4,265,146,304 -> 4265146304
    for name, entry in dl.load_manifest().items():
        if entry["layout"] == "shipped":  # ours, hashed in tests/test_embedded.py; not a public file
            continue
        for spec in entry["files"]:
            if spec["sha256"] is not None:
                assert spec["sha256"] in text, (name, spec["path"])
            if spec["size"] is not None:
                assert re.search(rf"(?<!\d){spec['size']}(?!\d)", digits), (name, spec["path"])
