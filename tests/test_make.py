"""`make ui PORT=...`: the MLflow UI of the local store on the port asked for (a real server)."""

from __future__ import annotations

import os
import urllib.request

from conftest import BIN, REPO, ServerProcess, free_port


def test_make_ui_takes_a_port(tmp_path):
    port = free_port()
    # -o: take the venv as set up (BIN: the interpreter running the tests), install nothing; run in
    # tmp_path, so the UI opens (creates) tmp_path/mlruns, not the checkout's store
    server = ServerProcess(
        ["make", "-s", "-f", REPO / "Makefile", "-o", ".venv/.installed", "ui", f"PORT={port}", f"BIN={BIN}"],
        f"http://127.0.0.1:{port}",
        tmp_path / "ui.log",
        env=dict(os.environ),
        cwd=tmp_path,
    )
    try:
        server.wait_ready("/health")
        with urllib.request.urlopen(server.url + "/", timeout=10) as page:
            assert page.status == 200 and b"MLflow" in page.read()
        # MLflow's job execution is off: no huey consumers (seven processes, ~28 s of CPU at start)
        assert not [c for c in server.commands() if "huey" in c], server.commands()
        # one web worker, uvicorn's own process: none of the four worker processes MLflow starts by default
        assert not [c for c in server.commands() if "multiprocessing" in c], server.commands()
    finally:
        server.stop()
