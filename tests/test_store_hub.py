"""The Hugging Face source against a local stand-in for the Hub, and the store's crash safety:
a pull killed mid-download leaves nothing behind and resumes; concurrent pulls share one download.

`FakeHub` answers the routes huggingface_hub calls: `GET /api/models/{repo}[/revision/{rev}]` (the
file list, with sizes and LFS sha256) and `HEAD`/`GET /{repo}/resolve/{rev}/{file}` with the
headers `hf_hub_download` needs (`X-Repo-Commit`, `ETag`/`X-Linked-Etag`, `Content-Length`) and
HTTP Range for resumed downloads.
"""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llamaherd.errors import HerdError
from llamaherd.store import Store
from test_store import TINY_ARGS, blob_files, file_digest, manifest_files, tiny_gguf, tiny_hf_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """A Hub with `repos[repo_id] = {file name: bytes}`; files of 1 KB or more are LFS files.

    `corrupt[(repo, file)]` is served instead of the listed content; `gated` repos answer 403;
    `throttle` (bytes/second) slows file bodies after their first `throttle_after` bytes; `requests` records (method, path, headers in lower case)."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.corrupt: dict[tuple[str, str], bytes] = {}
        self.gated: set[str] = set()
        self.throttle: int | None = None
        self.throttle_after = 0
        self.requests: list[tuple[str, str, dict]] = []
        self.sent: dict[str, int] = {}  # file -> body bytes sent
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.handle(self, body=False)

            def do_GET(self):
                hub.handle(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def _error(self, h, status, code, message):
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Type", "application/json")
        data = json.dumps({"error": message}).encode()
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def handle(self, h, body: bool):
        path = h.path.split("?")[0]
        self.requests.append((h.command, path, {k.lower(): v for k, v in h.headers.items()}))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(/revision/[^/]+)?", path)
        if m:
            return self._info(h, m[1])
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._file(h, m[1], m[3], body)
        self._error(h, 404, "EntryNotFound", "no such route")

    def _repo(self, h, repo):
        if repo in self.gated and h.headers.get("Authorization") != "Bearer hf_good":
            self._error(h, 403, "GatedRepo", f"Access to model {repo} is restricted.")
            return None
        if repo not in self.repos:
            self._error(h, 404, "RepoNotFound", "Repository not found")
            return None
        return self.repos[repo]

    def _info(self, h, repo):
        files = self._repo(h, repo)
        if files is None:
            return
        siblings = []
        for name, data in sorted(files.items()):
            s = {"rfilename": name, "size": len(data), "blobId": _git_blob_id(data)}
            if len(data) >= 1024:
                s["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            siblings.append(s)
        doc = json.dumps({"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "gated": False,
                          "siblings": siblings, "tags": [], "downloads": 0, "likes": 0}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(doc)))
        h.end_headers()
        h.wfile.write(doc)

    def _file(self, h, repo, name, body):
        files = self._repo(h, repo)
        if files is None:
            return
        if name not in files:
            return self._error(h, 404, "EntryNotFound", f"{name} does not exist")
        listed = files[name]
        data = self.corrupt.get((repo, name), listed)
        etag = hashlib.sha256(listed).hexdigest() if len(listed) >= 1024 else _git_blob_id(listed)
        start = 0
        rng = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
        if rng and body:
            start = int(rng[1])
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("ETag", f'"{etag}"')
        if len(listed) >= 1024:
            h.send_header("X-Linked-Etag", f'"{etag}"')
            h.send_header("X-Linked-Size", str(len(listed)))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(data) - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if not body:
            return
        view = memoryview(data)[start:]
        step = 64 * 1024
        try:
            for i in range(0, len(view), step):
                h.wfile.write(view[i:i + step])
                h.wfile.flush()
                self.sent[name] = self.sent.get(name, 0) + len(view[i:i + step])
                if self.throttle and start + i >= self.throttle_after:
                    time.sleep(step / self.throttle)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (killed)


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HERD_HOME", str(tmp_path / "herd"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.close()


def gguf_repo(tmp_path, seed=0, pad_bytes=0, quants=("Q4_0", "Q8_0")) -> dict[str, bytes]:
    files = {"README.md": b"# tiny\n", "config.json": b"{}"}
    for i, q in enumerate(quants):
        files[f"Tiny-{q}.gguf"] = tiny_gguf(tmp_path / f"{seed}-{q}.gguf", seed=seed + i, pad_bytes=pad_bytes).read_bytes()
    return files


def file_gets(hub, name):
    return [r for r in hub.requests if r[0] == "GET" and r[1].endswith("/" + name)]


def test_pull_a_gguf_repo_by_quantization(hub, tmp_path, monkeypatch):
    hub.repos["test/Tiny-GGUF"] = gguf_repo(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    events = []
    store = Store()
    store.pull("hf.co/test/Tiny-GGUF:q8_0", progress=events.append)

    m = store.resolve("hf.co/test/tiny-gguf:Q8_0")
    assert m.path.read_bytes() == hub.repos["test/Tiny-GGUF"]["Tiny-Q8_0.gguf"]
    assert m.details["parameter_count"] == TINY_ARGS.n_params and m.details["license"] == "tiny-license"
    assert [e.name for e in store.list()] == ["hf.co/test/tiny-gguf:q8_0"]
    # only the chosen file was downloaded, with the user's token
    assert [r[1] for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]] == [
        f"/test/Tiny-GGUF/resolve/{COMMIT}/Tiny-Q8_0.gguf"]
    assert all(r[2].get("authorization") == "Bearer hf_secret" for r in hub.requests if "/test/" in r[1])
    digest = file_digest(m.path)
    pulling = [e for e in events if e["status"] == f"pulling {digest[7:19]}"]
    assert pulling[-1] == {"status": f"pulling {digest[7:19]}", "digest": digest, "total": m.path.stat().st_size,
                           "completed": m.path.stat().st_size}
    assert [e["status"] for e in events][-3:] == ["verifying sha256 digest", "writing manifest", "success"]

    # pulling again downloads nothing; a second name for the same file shares its blob
    hub.requests.clear()
    store.pull("hf.co/test/Tiny-GGUF:Q8_0")
    assert not [r for r in hub.requests if "/resolve/" in r[1]]
    assert len([b for b in blob_files(tmp_path / "herd") if b == digest.replace(":", "-")]) == 1


def test_latest_tag_and_missing_quantization(hub, tmp_path):
    hub.repos["test/one"] = gguf_repo(tmp_path, quants=("Q5_K_S",))
    hub.repos["test/two"] = gguf_repo(tmp_path, seed=5, quants=("Q4_K_M", "Q6_K"))
    store = Store()
    store.pull("hf.co/test/one")  # the only GGUF
    store.pull("hf.co/test/two")  # Q4_K_M, as Ollama picks
    assert store.resolve("hf.co/test/two").path.read_bytes() == hub.repos["test/two"]["Tiny-Q4_K_M.gguf"]
    with pytest.raises(HerdError, match="no GGUF file for quantization 'IQ2_XS'; pick one of: "
                                        "hf.co/test/two:Q4_K_M, hf.co/test/two:Q6_K"):
        store.pull("hf.co/test/two:IQ2_XS")


def test_pull_a_safetensors_repo(hub, tmp_path):
    from llamaherd.weights.hf import load_hf

    src = tiny_hf_dir(tmp_path / "src")
    hub.repos["test/tiny-hf"] = {p.name: p.read_bytes() for p in src.iterdir()}
    store = Store()
    store.pull("hf.co/test/tiny-hf")
    m = store.resolve("hf.co/test/tiny-hf")
    assert m.format == "safetensors" and m.path.is_dir()
    assert sorted(p.name for p in m.path.iterdir()) == ["config.json", "model.safetensors", "tokenizer_config.json"]
    args, sd, _ = load_hf(m.path)
    ref = load_hf(src)[1]
    assert args == TINY_ARGS and all((sd[k] == ref[k]).all() for k in ref)
    assert not file_gets(hub, "README.md")
    store.remove("hf.co/test/tiny-hf")
    assert blob_files(tmp_path / "herd") == set()


def test_a_download_that_does_not_match_its_digest_is_refused(hub, tmp_path):
    files = gguf_repo(tmp_path, quants=("Q4_0",))
    hub.repos["test/bad"] = files
    good = files["Tiny-Q4_0.gguf"]
    hub.corrupt[("test/bad", "Tiny-Q4_0.gguf")] = good[:-4] + b"evil"
    with pytest.raises(HerdError, match="digest mismatch for hf.co/test/bad/Tiny-Q4_0.gguf"):
        Store().pull("hf.co/test/bad:Q4_0")
    root = tmp_path / "herd"
    assert manifest_files(root) == [] and blob_files(root) == set()
    assert not [p for p in (root / "partial").rglob("Tiny-Q4_0.gguf")]


def test_hub_errors(hub, monkeypatch):
    hub.repos["test/gated"] = {"model-Q4_K_M.gguf": b"x" * 2000}
    hub.gated.add("test/gated")
    with pytest.raises(HerdError, match="hf.co/test/missing not found"):
        Store().pull("hf.co/test/missing")
    with pytest.raises(HerdError, match="hf.co/test/gated is gated: .* set HF_TOKEN"):
        Store().pull("hf.co/test/gated")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(HerdError, match="cannot reach the Hugging Face Hub"):
        Store().pull("hf.co/test/any")


def test_a_killed_pull_leaves_the_store_as_it_was_and_resumes(hub, tmp_path):
    # huggingface_hub writes in 10 MiB pieces: send the first ones fast, then crawl, and kill the
    # pull once a piece is on disk.
    hub.repos["test/slow"] = gguf_repo(tmp_path, pad_bytes=12 << 20, quants=("Q4_0",))
    hub.throttle, hub.throttle_after = 512 << 10, 21 << 19
    root = tmp_path / "herd"
    env = {**os.environ, "HERD_HOME": str(root), "HF_ENDPOINT": hub.url}
    proc = subprocess.Popen([sys.executable, "-m", "llamaherd", "pull", "hf.co/test/slow:Q4_0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size for p in root.glob("partial/*/*.partial")):
            assert proc.poll() is None, "the pull ended before it could be killed"
            assert time.monotonic() < deadline, "the download never started"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert manifest_files(root) == [] and blob_files(root) == set()
    assert Store().list() == []
    [partial] = root.glob("partial/*/*.partial")
    kept = partial.stat().st_size

    hub.throttle = None
    Store().pull("hf.co/test/slow:Q4_0")
    m = Store().resolve("hf.co/test/slow:Q4_0")
    assert m.path.read_bytes() == hub.repos["test/slow"]["Tiny-Q4_0.gguf"]
    assert file_gets(hub, "Tiny-Q4_0.gguf")[-1][2].get("range") == f"bytes={kept}-"
    assert not any((root / "partial").iterdir())


def test_concurrent_pulls_of_one_model_download_it_once(hub, tmp_path):
    hub.repos["test/pop"] = gguf_repo(tmp_path, pad_bytes=1 << 20, quants=("Q4_0",))
    hub.throttle = 8 << 20
    errors = []

    def pull():
        try:
            Store().pull("hf.co/test/pop:Q4_0")
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=pull) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    data = hub.repos["test/pop"]["Tiny-Q4_0.gguf"]
    assert Store().resolve("hf.co/test/pop:Q4_0").path.read_bytes() == data
    assert len(file_gets(hub, "Tiny-Q4_0.gguf")) == 1
    assert len(manifest_files(tmp_path / "herd")) == 1
    assert len([b for b in blob_files(tmp_path / "herd")
                if (tmp_path / "herd" / "blobs" / b).stat().st_size == len(data)]) == 1
