"""The fetch stage: verified, atomic, resumable download of the pinned collection (offline, real files)."""

from __future__ import annotations

import csv
import hashlib
import http.server
import io
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import BIN, COMMIT, run_until_killed
from covidxray import CovidXrayError
from covidxray.data import download
from covidxray.stages.fetch import main as fetch_main
from covidxray.tools.manifest import manifest_cli, select_images

REPO_NAME = "ieee8023/covid-chestxray-dataset"
BASE_URL = "https://raw.githubusercontent.com"
ABSENT = "images/covid-19-pneumonia-14-PA.png"  # a PA X-ray row whose file the shared mirror lacks


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def picked(collection_dir) -> list[str]:
    """Four small real PA X-ray images of the collection."""
    with open(collection_dir / "metadata.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["modality"] == "X-ray" and r["view"] == "PA"]
    files = {f"images/{r['filename']}" for r in rows if (collection_dir / "images" / r["filename"]).is_file()}
    return sorted(sorted(files, key=lambda p: (collection_dir / p).stat().st_size)[:4])


@pytest.fixture
def mirror(tmp_path, collection_dir, picked) -> Path:
    """A tiny mirror (same layout as ../shared/datasets): the picked images and a metadata.csv with
    their rows, one AP and one CT row (not selected) and one PA row whose file is absent."""
    root = tmp_path / "mirror"
    coll = root / "raw.githubusercontent.com" / REPO_NAME / COMMIT
    (coll / "images").mkdir(parents=True)
    for rel in picked:
        shutil.copyfile(collection_dir / rel, coll / rel)
    with open(collection_dir / "metadata.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows, fields = list(reader), reader.fieldnames
    names = {Path(p).name for p in picked}
    keep = [r for r in rows if r["filename"] in names or f"images/{r['filename']}" == ABSENT]
    keep.append(next(r for r in rows if r["modality"] == "X-ray" and r["view"] == "AP"))
    keep.append(next(r for r in rows if r["modality"] == "CT"))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(keep)
    (coll / "metadata.csv").write_text(out.getvalue(), encoding="utf-8")
    return root


def _coll(mirror: Path) -> Path:
    return mirror / "raw.githubusercontent.com" / REPO_NAME / COMMIT


@pytest.fixture
def manifest(tmp_path, mirror, picked) -> Path:
    """A manifest of the tiny mirror, hashed independently of the code under test."""
    coll = _coll(mirror)
    lines = [f"# repo: {REPO_NAME}", f"# commit: {COMMIT}"]
    lines += [f"{_sha(coll / rel)}  {rel}" for rel in ["metadata.csv", *picked]]
    path = tmp_path / "test.sha256"
    path.write_text("\n".join(lines) + "\n")
    return path


def _source(mirror: Path):
    return download.resolve_source(BASE_URL, REPO_NAME, COMMIT, mirror)


def _fetch(manifest: Path, source, raw: Path, **kw) -> download.FetchStats:
    _, entries = download.read_manifest(manifest)
    return download.fetch_dataset(entries, source, raw, retries=kw.pop("retries", 0), timeout=5, backoff_s=0, **kw)


def _assert_nothing_left(raw: Path) -> None:
    assert not raw.exists()
    assert list(raw.parent.iterdir()) == [], "a temporary folder was left behind"


def test_fetch_success(tmp_path, mirror, manifest, picked):
    raw = tmp_path / "data" / "raw"
    stats = _fetch(manifest, _source(mirror), raw)
    assert stats.fetched == 1 + len(picked) and stats.reused == 0 and stats.bytes_fetched > 0
    coll = _coll(mirror)
    for rel in ["metadata.csv", *picked]:
        assert (raw / rel).read_bytes() == (coll / rel).read_bytes()
    assert [p.name for p in raw.parent.iterdir()] == ["raw"]
    if shutil.which("sha256sum"):  # the manifest format is what `sha256sum -c` reads
        subprocess.run(["sha256sum", "-c", "--strict", "--quiet", str(manifest)], cwd=raw, check=True)


def test_checksum_mismatch_names_file_and_leaves_nothing(tmp_path, mirror, manifest, picked):
    with open(_coll(mirror) / picked[1], "ab") as f:
        f.write(b"corrupt")
    raw = tmp_path / "data" / "raw"
    with pytest.raises(CovidXrayError, match="checksum mismatch") as err:
        _fetch(manifest, _source(mirror), raw)
    assert picked[1] in str(err.value) and str(_coll(mirror)) in str(err.value)
    assert "\n" not in str(err.value)
    _assert_nothing_left(raw)


def test_file_missing_from_source(tmp_path, mirror, manifest, picked):
    (_coll(mirror) / picked[2]).unlink()
    raw = tmp_path / "data" / "raw"
    with pytest.raises(CovidXrayError, match="not found at") as err:
        _fetch(manifest, _source(mirror), raw)
    assert str(_coll(mirror) / picked[2]) in str(err.value)
    _assert_nothing_left(raw)


class _Interrupting:
    """A source that is interrupted (Ctrl-C) partway through the n-th file."""

    def __init__(self, inner, n: int):
        self.inner, self.n, self.seen = inner, n, 0

    def where(self, relpath):
        return self.inner.where(relpath)

    def chunks(self, relpath, timeout):
        self.seen += 1
        if self.seen == self.n:
            yield b"partial bytes"
            raise KeyboardInterrupt
        yield from self.inner.chunks(relpath, timeout)


def test_interrupted_run_leaves_no_partial_output(tmp_path, mirror, manifest):
    raw = tmp_path / "data" / "raw"
    with pytest.raises(KeyboardInterrupt):
        _fetch(manifest, _Interrupting(_source(mirror), 3), raw)
    _assert_nothing_left(raw)


def test_failed_rerun_keeps_previous_copy(tmp_path, mirror, manifest, picked):
    raw = tmp_path / "data" / "raw"
    _fetch(manifest, _source(mirror), raw)
    before = {p: p.read_bytes() for p in raw.rglob("*") if p.is_file()}
    (raw / picked[0]).write_bytes(b"damaged")  # must be fetched again, and the source fails
    before[raw / picked[0]] = b"damaged"
    with pytest.raises(KeyboardInterrupt):
        _fetch(manifest, _Interrupting(_source(mirror), 1), raw)
    assert {p: p.read_bytes() for p in raw.rglob("*") if p.is_file()} == before
    assert [p.name for p in raw.parent.iterdir()] == ["raw"]


def test_a_killed_fetch_leaves_a_scratch_folder_the_next_run_removes(tmp_path, mirror, manifest):
    """SIGKILL mid-fetch (no cleanup code runs): the rerun removes the `.raw.fetch-*` it left."""
    raw = tmp_path / "data" / "raw"
    run_until_killed(
        f"""
        from covidxray.data import download

        class Dying:
            def __init__(self, inner):
                self.inner, self.seen = inner, 0

            def where(self, relpath):
                return self.inner.where(relpath)

            def chunks(self, relpath, timeout):
                self.seen += 1
                if self.seen == 3:
                    die()
                yield from self.inner.chunks(relpath, timeout)

        _, entries = download.read_manifest({str(manifest)!r})
        source = download.resolve_source({BASE_URL!r}, {REPO_NAME!r}, {COMMIT!r}, {str(mirror)!r})
        download.fetch_dataset(entries, Dying(source), {str(raw)!r}, retries=0, timeout=5, backoff_s=0)
    """,
        tmp_path,
    )
    left = [p for p in raw.parent.iterdir()]
    assert len(left) == 1 and left[0].name.startswith(".raw.fetch-") and any(p.is_file() for p in left[0].rglob("*"))
    _fetch(manifest, _source(mirror), raw)
    assert [p.name for p in raw.parent.iterdir()] == ["raw"]


def test_rerun_reuses_verified_files(tmp_path, mirror, manifest, picked):
    raw = tmp_path / "data" / "raw"
    _fetch(manifest, _source(mirror), raw)
    (_coll(mirror) / picked[0]).unlink()  # a reused file must not be read from the source again
    (raw / picked[1]).write_bytes(b"damaged")  # an invalid local copy is fetched again
    (raw / "images" / "stray.jpg").write_bytes(b"not in the manifest")
    stats = _fetch(manifest, _source(mirror), raw)
    assert (stats.reused, stats.fetched) == (len(picked), 1)
    assert (raw / picked[1]).read_bytes() == (_coll(mirror) / picked[1]).read_bytes()
    assert (raw / picked[0]).is_file()
    assert not (raw / "images" / "stray.jpg").exists()
    assert [p.name for p in raw.parent.iterdir()] == ["raw"]


@pytest.mark.parametrize(
    "bad",
    [
        "../evil.jpg",
        "images/../../evil.jpg",
        "/etc/passwd",
        "images//x.jpg",
        "C:/x.jpg",
        "images\\..\\x.jpg",
        "./x.jpg",
    ],
)
def test_path_traversal_rejected(tmp_path, bad):
    path = tmp_path / "m.sha256"
    path.write_text(f"# repo: {REPO_NAME}\n# commit: {COMMIT}\n{'0' * 64}  {bad}\n")
    with pytest.raises(CovidXrayError, match="unsafe file name"):
        download.read_manifest(path)
    metadata = f"modality,view,folder,filename\nX-ray,PA,images,{bad}\n".encode()
    with pytest.raises(CovidXrayError, match="unsafe file name"):
        select_images(metadata, ["PA"])


def test_symlink_in_mirror_rejected(tmp_path, mirror, picked):
    coll = _coll(mirror)
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the mirror")
    (coll / "images" / "link.jpg").symlink_to(secret)
    path = tmp_path / "m.sha256"
    path.write_text(f"# repo: {REPO_NAME}\n# commit: {COMMIT}\n{_sha(secret)}  images/link.jpg\n")
    raw = tmp_path / "data" / "raw"
    with pytest.raises(CovidXrayError, match="symlink"):
        _fetch(path, _source(mirror), raw)
    _assert_nothing_left(raw)


def _cfg(manifest: Path, raw: str = "data/raw", commit: str = COMMIT):
    return OmegaConf.create(
        {
            "paths": {"raw": raw},
            "fetch": {
                "repo": REPO_NAME,
                "commit": commit,
                "base_url": BASE_URL,
                "manifest": str(manifest),
                "retries": 0,
                "timeout_s": 5,
            },
        }
    )


def test_main_refuses_manifest_of_another_commit(tmp_path, monkeypatch, mirror, manifest):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(download.MIRROR_ENV, str(mirror))
    other = "1" * 40
    with pytest.raises(CovidXrayError, match=f"commit {COMMIT}.*fetch.commit is {other}"):
        fetch_main(_cfg(manifest, commit=other))
    assert not (tmp_path / "data" / "raw").exists()
    fetch_main(_cfg(manifest))  # the matching commit goes through
    assert (tmp_path / "data" / "raw" / "metadata.csv").is_file()


def test_manifest_cli_regenerates_from_mirror(tmp_path, monkeypatch, capsys, mirror, picked):
    monkeypatch.setenv(download.MIRROR_ENV, str(mirror))
    out = tmp_path / "out.sha256"
    assert manifest_cli(["--commit", COMMIT, "--views", "PA", "--out", str(out)]) == 0
    assert f"warning: {ABSENT}" in capsys.readouterr().err
    meta, entries = download.read_manifest(out)
    assert (meta["repo"], meta["commit"], meta["views"]) == (REPO_NAME, COMMIT, ["PA"])
    assert meta["unavailable"] == [ABSENT]
    coll = _coll(mirror)
    assert entries == [download.Entry(rel, _sha(coll / rel)) for rel in ["metadata.csv", *picked]]
    # the regenerated manifest is fetchable as is
    stats = download.fetch_dataset(entries, _source(mirror), tmp_path / "raw", retries=0, timeout=5)
    assert stats.fetched == len(entries)


def test_manifest_cli_refuses_short_commit(tmp_path):
    with pytest.raises(CovidXrayError, match="40-digit"):
        manifest_cli(["--commit", "0f7245d", "--out", str(tmp_path / "m")])


def test_find_mirror(tmp_path):
    (tmp_path / "shared" / "datasets").mkdir(parents=True)
    (tmp_path / "repo").mkdir()
    assert download.find_mirror(tmp_path / "repo", {}) == tmp_path / "shared" / "datasets"
    assert download.find_mirror(tmp_path / "repo", {download.MIRROR_ENV: str(tmp_path)}) == tmp_path  # env var first
    assert download.find_mirror(tmp_path / "repo", {download.MIRROR_ENV: ""}) is None  # empty: the network
    assert download.find_mirror(tmp_path, {}) is None
    with pytest.raises(CovidXrayError, match=download.MIRROR_ENV):
        download.find_mirror(tmp_path, {download.MIRROR_ENV: str(tmp_path / "nope")})
    assert isinstance(download.resolve_source(BASE_URL, REPO_NAME, COMMIT, None), download.HttpSource)


# --- the HTTP path, against a local server that serves the tiny mirror --------------------------


@pytest.fixture
def http_mirror(mirror):
    """A local HTTP server for the tiny mirror whose first answer to each file is a 503."""
    seen: set[str] = set()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(mirror / "raw.githubusercontent.com"), **kw)

        def do_GET(self):
            if self.path not in seen:
                seen.add(self.path)
                self.send_error(503)
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_retries_transient_errors(tmp_path, http_mirror, mirror, manifest, picked):
    source = download.resolve_source(http_mirror, REPO_NAME, COMMIT, None)
    raw = tmp_path / "data" / "raw"
    with pytest.raises(CovidXrayError, match="after 1 attempts .*HTTP 503"):
        _fetch(manifest, source, raw, retries=0)
    _assert_nothing_left(raw)
    stats = _fetch(manifest, source, raw, retries=2)  # metadata.csv already had its 503
    assert stats.fetched == 1 + len(picked)
    assert (raw / picked[0]).read_bytes() == (_coll(mirror) / picked[0]).read_bytes()


def test_http_missing_file(tmp_path, http_mirror, mirror, manifest, picked):
    (_coll(mirror) / picked[0]).unlink()
    source = download.resolve_source(http_mirror, REPO_NAME, COMMIT, None)
    with pytest.raises(CovidXrayError, match=f"{picked[0]}: not found at http://127.0.0.1"):
        _fetch(manifest, source, tmp_path / "data" / "raw", retries=1)


# --- the real command and the committed manifest --------------------------------------------------


def test_cli_fetch(tmp_path, mirror, manifest, picked):
    work = tmp_path / "work"
    work.mkdir()
    OmegaConf.save(_cfg(manifest), work / "params.yaml")
    env = {**os.environ, download.MIRROR_ENV: str(mirror)}
    cmd = [str(BIN / "covidxray"), "fetch", "--params", "params.yaml"]
    ok = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "0 files reused, 5 fetched" in ok.stdout
    raw = work / "data" / "raw"
    got = sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file())
    assert got == sorted(["metadata.csv", *picked])

    shutil.rmtree(work / "data")
    with open(_coll(mirror) / picked[3], "ab") as f:
        f.write(b"corrupt")
    bad = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("covidxray fetch: error: ") and picked[3] in lines[0]
    assert not (work / "data" / "raw").exists()


def test_committed_manifest_matches_shared_mirror(repo_root, collection_dir):
    meta, entries = download.read_manifest(repo_root / "manifests" / "covid-chestxray-dataset.sha256")
    assert (meta["repo"], meta["commit"]) == (REPO_NAME, COMMIT)
    assert len(entries) == 294 and entries[0].path == "metadata.csv"
    assert len(meta["unavailable"]) == 5
    bad = [e.path for e in entries if download.sha256_file(collection_dir / e.path) != e.sha256]
    assert bad == []
