"""Ring 3: `ray start --head` with token authentication, then `ray job submit` of the tokenize job."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from geneformer_ray.corpus import read_manifest

from conftest import PBMC_SMALL

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def ray_head(env: dict, *, num_cpus: int = 2):
    """A real head node on its own ports and temp dir. Stopped by ending exactly the processes that
    `ray start` created and their children: `ray stop` would also end the test session's Ray, and
    Ray renames its processes, so they cannot be found by command line."""
    import psutil

    temp_dir = Path("/tmp") / f"gfray-head-{uuid.uuid4().hex[:8]}"
    base = 20000 + secrets.randbelow(20000)
    before = set(psutil.pids())
    subprocess.run(["ray", "start", "--head", f"--port={base}", f"--num-cpus={num_cpus}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={base + 1}", f"--dashboard-agent-listen-port={base + 2}",
                    f"--ray-client-server-port={base + 3}", "--include-dashboard=true", f"--temp-dir={temp_dir}",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
    started = [psutil.Process(pid) for pid in set(psutil.pids()) - before if psutil.pid_exists(pid)]
    try:
        yield f"http://127.0.0.1:{base + 1}"
    finally:
        procs = {}
        for proc in started:
            try:
                procs.update({p.pid: p for p in [proc, *proc.children(recursive=True)]})
            except psutil.NoSuchProcess:
                pass
        for proc in procs.values():
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(procs.values()), timeout=10)
        for proc in alive:
            proc.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
        # `ray start` records its address for later `ray.init()` calls: do not leave a dead one behind
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip().endswith(f":{base}"):
            current.unlink()


@pytest.fixture
def token_env(tmp_path):
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_ADDRESS": ""}


def test_tokenize_job_through_ray_job_submit(token_env, tmp_path):
    out = tmp_path / "corpus"
    with ray_head(token_env) as address:
        submit = ["ray", "job", "submit", "--address", address, "--working-dir", str(REPO / "jobs"), "--",
                  "python", "tokenize_corpus.py", str(PBMC_SMALL), "--vocab", "gc104M", "--out", str(out),
                  "--obs", "RNA_snn_res.1=cluster", "--quiet"]
        for _ in range(30):  # the head's job agent registers a few seconds after `ray start` returns
            proc = subprocess.run(submit, env=token_env, capture_output=True, text=True, timeout=300)
            if "No available agent" not in proc.stderr:
                break
            time.sleep(2)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "tokenized 80 of 80 cells" in proc.stdout
        assert read_manifest(out)["num_cells"] == 80
        # a client without the cluster's token is refused
        stranger = {**token_env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "other_token")}
        Path(stranger["RAY_AUTH_TOKEN_PATH"]).write_text(secrets.token_hex(32))
        refused = subprocess.run(["ray", "job", "submit", "--address", address, "--", "echo", "hi"],
                                 env=stranger, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "hi\n" not in refused.stdout
