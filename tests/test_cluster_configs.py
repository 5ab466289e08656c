"""cluster/: the launcher configs validate against Ray's own cluster-config schema, the KubeRay
manifests parse and agree with the launcher and with the job configs they run, every config is
secure by default, and the environment scripts do what they say."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from geneformer_ray.runtime import AcceleratorConfig, cluster_check, plan_accelerator
from geneformer_ray.train.config import PretrainConfig
from geneformer_ray.settings import load_config

from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHERS = {"npu": CLUSTER / "atlas800t-a2.yaml", "gpu": CLUSTER / "gpu-nodes.yaml"}
KUBERAY = CLUSTER / "kuberay"
NPU_PER_NODE = 8  # Atlas 800T A2


def launcher(kind: str) -> dict:
    return yaml.safe_load(LAUNCHERS[kind].read_text())


def manifests() -> dict[str, dict]:
    """Every KubeRay / Kubernetes object in cluster/kuberay, by file stem and kind."""
    out = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] and doc["metadata"]["name"], path
            out[f"{path.stem}/{doc['kind']}"] = doc
    return out


def start_commands(config: dict, role: str) -> list[str]:
    return config[f"{role}_start_ray_commands"]


def ray_start(config: dict, role: str) -> str:
    (command,) = [c for c in start_commands(config, role) if "ray start" in c]
    return command


def flag(command: str, name: str) -> str | None:
    for token in shlex.split(command):
        if token.startswith(f"--{name}="):
            return token.split("=", 1)[1]
    return None


def env_script(name: str, tmp_path: Path, **env) -> dict[str, str]:
    """The variables a cluster env script exports, sourced in bash with a stand-in CANN install."""
    ascend = tmp_path / "Ascend"
    (ascend / "ascend-toolkit").mkdir(parents=True, exist_ok=True)
    (ascend / "ascend-toolkit" / "set_env.sh").write_text("export ASCEND_TOOLKIT_HOME=/stand-in\n")
    clean = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "ASCEND_HOME": str(ascend), **env}
    out = subprocess.run(["bash", "-c", f"source {CLUSTER / name} && env -0"], env=clean, capture_output=True, text=True,
                         check=True)
    values = dict(item.split("=", 1) for item in out.stdout.split("\0") if "=" in item)
    return {k: v for k, v in values.items() if k not in clean or clean[k] != v}


def job_config(entrypoint: str) -> tuple[Path, list[str]]:
    """The config file and --set overrides of a `python /app/jobs/pretrain.py ...` entrypoint (/app = the repo)."""
    args = shlex.split(entrypoint)
    config = Path(args[args.index("--config") + 1].replace("/app/", f"{REPO}/", 1))
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    return config, overrides


# -- the launcher configs ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(LAUNCHERS))
def test_launcher_config_validates_against_rays_schema(kind):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = launcher(kind)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` does before touching a node
    broken = copy.deepcopy(config)
    broken["head_start_ray_command"] = broken.pop("head_start_ray_commands")  # a typo the schema must catch
    with pytest.raises(Exception, match="head_start_ray_command"):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("kind", sorted(LAUNCHERS))
def test_launcher_is_secure_by_default(kind):
    config = launcher(kind)
    head_ip = config["provider"]["head_ip"]
    for role in ("head", "worker"):
        command = ray_start(config, role)
        assert "RAY_AUTH_MODE=token" in command, f"{role}: token authentication off"
        assert f"MLFLOW_TRACKING_URI=http://{head_ip}:5000" in command, f"{role}: MLflow is not the head's server"
    assert flag(ray_start(config, "head"), "dashboard-host") == "127.0.0.1"
    # the token is copied from a file where `ray up` runs; the key is a path
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert config["auth"]["ssh_private_key"].startswith("~/") and set(config["auth"]) == {"ssh_user", "ssh_private_key"}
    assert any("chmod 600 ~/.ray/auth_token" in c for c in config["setup_commands"])
    # MLflow on the head's private IP, never every interface
    (mlflow,) = [c for c in start_commands(config, "head") if "start_mlflow.sh" in c]
    assert shlex.split(mlflow)[-2:] == [head_ip, "/shared/mlflow"]


def test_npu_launcher_declares_the_npus_and_sets_up_cann():
    config = launcher("npu")
    for role in ("head", "worker"):
        command = ray_start(config, role)
        assert json.loads(flag(command, "resources")) == {"NPU": NPU_PER_NODE}
        assert command.index("hccl_env.sh") < command.index("ray start")  # HCCL settings reach the raylet
    setup = " ".join(config["setup_commands"])
    assert "ascend-toolkit/set_env.sh" in setup and "geneformer-ray[npu]" in setup
    assert any("ascend-toolkit/set_env.sh" in c for c in config["initialization_commands"])
    # the resource every NPU job config asks for is the one the nodes declare
    for path in sorted((REPO / "jobs" / "configs").glob("pretrain_gf*.yaml")):
        cfg = load_config(PretrainConfig, path)
        assert cfg.accelerator.type == "npu" and cfg.accelerator.npu_resource == "NPU", path.name


def test_gpu_launcher_differs_only_where_it_must():
    npu, gpu = launcher("npu"), launcher("gpu")
    for role in ("head", "worker"):
        command = ray_start(gpu, role)
        assert flag(command, "resources") is None  # Ray detects GPUs itself
        assert "nccl_env.sh" in command and "hccl_env.sh" not in command
    setup = " ".join(gpu["setup_commands"])
    assert "[npu]" not in setup and "Ascend" not in setup
    assert set(npu) == set(gpu) and npu["file_mounts"] == gpu["file_mounts"]


# -- environment scripts -------------------------------------------------------------------------------
def test_hccl_env_sets_every_variable_it_explains_and_agrees_with_the_job_configs(tmp_path):
    exported = env_script("hccl_env.sh", tmp_path)
    assert exported["ASCEND_TOOLKIT_HOME"] == "/stand-in"  # CANN's own script was sourced
    for name in ("HCCL_CONNECT_TIMEOUT", "HCCL_EXEC_TIMEOUT", "HCCL_BUFFSIZE", "TASK_QUEUE_ENABLE", "PYTORCH_NPU_ALLOC_CONF"):
        assert exported[name], name
    assert "HCCL_SOCKET_IFNAME" not in exported and "ASCEND_RT_VISIBLE_DEVICES" not in exported
    assert env_script("hccl_env.sh", tmp_path, CLUSTER_IFNAME="bond0")["HCCL_SOCKET_IFNAME"] == "bond0"
    # every exported variable is explained in a comment
    text = (CLUSTER / "hccl_env.sh").read_text()
    for name in re.findall(r"export (\w+)=", text):
        assert re.search(rf"^# .*\b{name}\b", text, re.M), f"{name} is not explained"
    # the NPU job configs accept these timeouts (the process-group timeout stays above HCCL's)
    hccl = {k: v for k, v in exported.items() if k.startswith("HCCL_")}
    for path in sorted((REPO / "jobs" / "configs").glob("pretrain_gf*.yaml")):
        cfg = load_config(PretrainConfig, path)
        old = dict(os.environ)
        try:
            os.environ.update(hccl)
            plan = plan_accelerator(cfg.accelerator, {"NPU": 16, "CPU": 320}, check_npu_import=False)
        finally:
            os.environ.clear()
            os.environ.update(old)
        assert plan.backend == "hccl" and plan.env["HCCL_EXEC_TIMEOUT"] == exported["HCCL_EXEC_TIMEOUT"]


def test_hccl_env_without_cann_names_the_fix(tmp_path):
    proc = subprocess.run(["bash", str(CLUSTER / "hccl_env.sh")], env={"PATH": os.environ["PATH"], "ASCEND_HOME": str(tmp_path)},
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"{tmp_path}/ascend-toolkit/set_env.sh not found" in proc.stderr and "install the CANN toolkit" in proc.stderr


def test_nccl_env_is_the_gpu_counterpart(tmp_path):
    exported = env_script("nccl_env.sh", tmp_path, CLUSTER_IFNAME="eth1")
    assert exported["NCCL_SOCKET_IFNAME"] == exported["GLOO_SOCKET_IFNAME"] == "eth1"
    assert exported["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert not any(k.startswith(("HCCL_", "ASCEND")) for k in exported if k != "ASCEND_HOME")


def test_start_mlflow_serves_on_the_given_interface_only(tmp_path):
    script = str(CLUSTER / "start_mlflow.sh")
    refused = subprocess.run([script, "0.0.0.0", str(tmp_path / "store")], capture_output=True, text=True)
    assert refused.returncode == 2 and "refusing to listen on every interface" in refused.stderr
    port = free_port()
    env = {**os.environ, "MLFLOW_PORT": str(port)}
    store = tmp_path / "store"
    try:
        started = subprocess.run([script, "127.0.0.1", str(store)], env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200
        again = subprocess.run([script, "127.0.0.1", str(store)], env=env, capture_output=True, text=True, timeout=60)
        assert "already serving" in again.stdout
        assert (store / "mlflow.db").exists()
    finally:
        pid = int((store / "server.pid").read_text())
        subprocess.run(["pkill", "-TERM", "-P", str(pid)])
        subprocess.run(["kill", "-TERM", str(pid)])


# -- KubeRay -------------------------------------------------------------------------------------------
def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def ray_resources(group: dict) -> dict:
    raw = group["rayStartParams"].get("resources")
    return json.loads(json.loads(raw)) if raw else {}  # KubeRay's quoting: '"{\"NPU\": 8}"'


def mounts_and_claims(group: dict) -> dict[str, str]:
    """mountPath -> PVC name for the group's persistent volumes."""
    volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in group["template"]["spec"]["volumes"]
               if "persistentVolumeClaim" in v}
    return {m["mountPath"]: volumes[m["name"]] for c in containers(group) for m in c.get("volumeMounts", [])
            if m["name"] in volumes}


@pytest.mark.parametrize("variant", ["npu", "gpu"])
def test_raycluster_is_secure_and_agrees_with_storage_mlflow_and_launcher(variant, tmp_path):
    objects = manifests()
    cluster = objects[f"raycluster-{variant}/RayCluster"]
    spec = cluster["spec"]
    claim = objects["storage/PersistentVolumeClaim"]
    deployment, service = objects["mlflow/Deployment"], objects["mlflow/Service"]
    head, (workers,) = spec["headGroupSpec"], spec["workerGroupSpecs"]
    # security: token auth (the operator makes the Secret), no public Service anywhere
    assert spec["authOptions"] == {"mode": "token"}
    assert tuple(int(x) for x in spec["rayVersion"].split(".")[:2]) >= (2, 52)  # token auth needs Ray 2.52+
    assert head["serviceType"] == "ClusterIP" and service["spec"]["type"] == "ClusterIP"
    assert all(o.get("spec", {}).get("type") not in ("NodePort", "LoadBalancer") for o in objects.values())
    text = "\n".join(p.read_text() for p in KUBERAY.glob("*.yaml"))
    assert "secretKeyRef" not in text and not re.search(r"\b[0-9a-f]{32,}\b", text)  # no token or key pasted in
    # everything the network policy admits carries its label
    selector = objects["networkpolicy/NetworkPolicy"]["spec"]["podSelector"]["matchLabels"]
    for group in (head, workers, deployment["spec"]):
        assert selector.items() <= group["template"]["metadata"]["labels"].items()
    # one image for head and workers; the shared volume at /shared on every pod, the same claim as MLflow's
    images = {c["image"] for g in (head, workers) for c in containers(g)}
    assert len(images) == 1 and next(iter(images)).endswith(f"-{'npu' if variant == 'npu' else 'cuda'}")
    for group in (head, workers, deployment["spec"]):
        assert mounts_and_claims(group) == {"/shared": claim["metadata"]["name"]}
    # MLflow: the URI every Ray pod gets is the Service, the server runs beside this cluster's head
    port = service["spec"]["ports"][0]["port"]
    for group in (head, workers):
        assert env_of(containers(group)[0])["MLFLOW_TRACKING_URI"] == f"http://{service['metadata']['name']}:{port}"
    affinity = deployment["spec"]["template"]["spec"]["affinity"]["podAffinity"]
    (term,) = affinity["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["labelSelector"]["matchLabels"] == {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    # devices: the NPU variant asks the Ascend device plugin for a whole server and declares it to Ray
    # under the launcher's resource name; its HCCL settings are hccl_env.sh's
    limits = containers(workers)[0]["resources"]["limits"]
    assert containers(workers)[0]["resources"]["requests"] == limits
    if variant == "npu":
        launcher_npus = json.loads(flag(ray_start(launcher("npu"), "worker"), "resources"))
        assert ray_resources(workers) == launcher_npus == {"NPU": limits["huawei.com/Ascend910"]}
        script = env_script("hccl_env.sh", tmp_path)
    else:
        assert ray_resources(workers) == {} and limits["nvidia.com/gpu"] == NPU_PER_NODE
        script = env_script("nccl_env.sh", tmp_path)
    worker_env = {k: v for k, v in env_of(containers(workers)[0]).items() if k != "MLFLOW_TRACKING_URI"}
    assert worker_env and all(script[k] == v for k, v in worker_env.items()), (worker_env, script)
    assert int(workers["rayStartParams"]["num-cpus"]) == int(limits["cpu"])


def test_rayjob_runs_a_valid_job_config_that_fits_the_cluster():
    objects = manifests()
    job, cluster = objects["rayjob-pretrain/RayJob"], objects["raycluster-npu/RayCluster"]
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    (submitter,) = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    assert submitter["image"] == containers(cluster["spec"]["headGroupSpec"])[0]["image"]
    # the entrypoint's config, with its overrides, loads with the project's own loader
    config, overrides = job_config(job["spec"]["entrypoint"])
    assert config.exists(), config
    cfg = load_config(PretrainConfig, config, overrides)
    (workers,) = cluster["spec"]["workerGroupSpecs"]
    npus = workers["replicas"] * ray_resources(workers)["NPU"]
    assert cfg.train.num_workers == npus  # one worker per NPU of the cluster
    # its paths are on the shared volume every pod mounts, and the cluster can place it
    assert cfg.data.corpus.startswith("/shared/") and cfg.train.storage_path.startswith("/shared/")
    resources = {"NPU": npus, "CPU": workers["replicas"] * int(workers["rayStartParams"]["num-cpus"])}
    cluster_check(plan_accelerator(cfg.accelerator, resources, check_npu_import=False), cfg.train.num_workers, resources)
    assert cfg.tracking.uri is None  # MLflow from the pods' MLFLOW_TRACKING_URI


def test_mlflow_server_image_matches_the_clients():
    from importlib.metadata import requires

    deployment = manifests()["mlflow/Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    version = tuple(int(x) for x in container["image"].rsplit(":v", 1)[1].split("."))
    (spec,) = [r for r in requires("geneformer-ray") if r.startswith("mlflow")]
    upper = tuple(int(x) for x in re.search(r"<([\d.]+)", spec).group(1).split("."))
    lower = tuple(int(x) for x in re.search(r">=([\d.]+)", spec).group(1).split("."))
    assert lower <= version < upper, (container["image"], spec)
    assert "--host 0.0.0.0" in " ".join(container["command"])  # pod interfaces, behind the ClusterIP Service


def test_tracking_uri_comes_from_the_cluster_environment(monkeypatch, tmp_path):
    cfg = load_config(PretrainConfig, None, [f"train.storage_path={tmp_path}", "data.corpus=/shared/c"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cfg.tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.1:5000")
    assert cfg.tracking_uri() == "http://10.0.0.1:5000" and cfg.artifact_location() is None
    cfg.tracking.uri = "none"
    assert cfg.tracking_uri() is None  # an explicit setting wins


def test_cluster_check_names_a_missing_custom_resource():
    plan = plan_accelerator(AcceleratorConfig(type="cpu", worker_resources={"FAKE_NPU": 1}), {"CPU": 8})
    with pytest.raises(ValueError, match="2 FAKE_NPU.*has 1; lower train.num_workers or start more nodes with the 'FAKE_NPU'"):
        cluster_check(plan, 2, {"CPU": 8, "FAKE_NPU": 1})
    with pytest.raises(ValueError, match="worker_resources\\['GPU'\\]"):
        AcceleratorConfig(worker_resources={"GPU": 1})
