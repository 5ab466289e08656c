"""A simulated two-node Ray cluster running DDP pretraining across its nodes; run in its own process
by tests/test_multinode.py (one process cannot hold two Ray clusters, and the test session has one).

    python tests/two_node_cluster.py CORPUS STORAGE_DIR PORT   # prints one line: RESULT {json}

(Ray's own warnings may follow it on stdout, hence the prefix.)

Head: 1 CPU, no accelerator. Two worker nodes: 2 CPUs and 2 of a fake accelerator resource each
(`FAKE_NPU`, not the literal `NPU`, which would make Ray Train import torch_npu). Two training
workers ask for one FAKE_NPU each with SPREAD placement: each could fit on one node, so only the
placement puts them on different nodes; gloo carries the DDP traffic between them.
"""

from __future__ import annotations

import json
import sys


def main(corpus: str, storage: str, port: int) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from geneformer_ray.train.config import PretrainConfig
    from geneformer_ray.settings import load_config
    from geneformer_ray.train.pretrain import pretrain

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "gcs_server_port": port, "include_dashboard": False})
    try:
        accelerator_nodes = [cluster.add_node(num_cpus=2, resources={"FAKE_NPU": 2}) for _ in range(2)]
        ray.init(address=cluster.address, log_to_driver=False)
        cfg = load_config(PretrainConfig, None, [
            f"data.corpus={corpus}", "data.batch_size=4", "model.flavour=tiny",
            "train.num_workers=2", "train.max_steps=4", "train.log_every=2", "train.checkpoint_every=100",
            "train.placement_strategy=SPREAD", "train.max_failures=0", f"train.storage_path={storage}",
            "train.run_name=two_nodes", "accelerator.type=cpu", "accelerator.worker_resources={FAKE_NPU: 1}",
            "tracking.uri=none"])
        summary = pretrain(cfg)
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        print("RESULT " + json.dumps({"worker_nodes": summary["metrics"]["worker_nodes"], "num_nodes": summary["metrics"]["num_nodes"],
                          "accelerator_nodes": sorted(n.node_id for n in accelerator_nodes),
                          "head_node": cluster.head_node.node_id, "cluster_nodes": len(nodes),
                          "step": summary["metrics"]["step"], "first_loss": summary["metrics"]["first_loss"],
                          "final_loss": summary["metrics"]["final_loss"],
                          "weights_identical_across_ranks": summary["metrics"]["weights_identical_across_ranks"]}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
