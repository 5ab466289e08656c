"""Ring 3, multi-node: a simulated two-node cluster (ray.cluster_utils) with a fake accelerator
resource per node; SPREAD placement puts one training worker on each node and DDP trains across them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import forget_ray_address, free_port

HELPER = Path(__file__).parent / "two_node_cluster.py"


def test_ddp_pretraining_spread_across_two_nodes(pbmc3k_v1_corpus, tmp_path):
    port = free_port()
    try:
        proc = subprocess.run([sys.executable, str(HELPER), str(pbmc3k_v1_corpus), str(tmp_path / "runs"), str(port)],
                              capture_output=True, text=True, timeout=900)
    finally:
        forget_ray_address(port)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]  # Ray may print after it
    result = json.loads(line.removeprefix("RESULT "))
    assert result["cluster_nodes"] == 3
    # one worker on each accelerator node (each node could have held both), none on the head
    assert sorted(result["worker_nodes"]) == result["accelerator_nodes"] and result["num_nodes"] == 2
    assert result["head_node"] not in result["worker_nodes"]
    # DDP across the nodes: all steps done, gradients averaged (identical weights), a finite loss
    assert result["step"] == 4 and result["weights_identical_across_ranks"] is True
    assert 0 < result["final_loss"] < 20
