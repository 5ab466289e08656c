"""Run-time set-up: join or start Ray, and the accelerator decisions: NPU (torch_npu, HCCL), CUDA (NCCL)
or CPU (gloo).

    plan = plan_cluster(AcceleratorConfig(type="auto"), num_workers=8)   # Ray joined or started, plan checked
    TorchTrainer(..., torch_config=torch_config(plan), scaling_config=ScalingConfig(**scaling_kwargs(plan, 8)))
    # in each worker:
    device = worker_device(plan)

Every decision (device type, backend, Ray resource, autocast dtype, environment) is made here on the
driver from plain values, so it is tested without hardware. The only hardware calls are behind
``import_torch_npu`` and ``_current_device``; torch_npu is imported only when an NPU is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import time
from pathlib import Path
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import ray
from pydantic import ConfigDict, Field, model_validator

from geneformer_ray.console import console_open, notice, progress_from_count
from geneformer_ray.settings import Settings

# torch and Ray Train/Data are imported inside the functions that use them: the tokenize tasks and the
# CLI's checks use this module too, and these imports cost ~3.6 s in every process that makes them.

BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}
HCCL_DEFAULTS = {"HCCL_CONNECT_TIMEOUT": "120", "HCCL_EXEC_TIMEOUT": "1836"}


class AcceleratorConfig(Settings):
    model_config = ConfigDict(coerce_numbers_to_str=True)  # env values such as HCCL_BUFFSIZE: 200 are text

    type: str = "auto"  # auto | npu | cuda | cpu
    npu_resource: str = "NPU"  # Ray resource naming one NPU (another name simulates NPU nodes on CPU boxes)
    cpus_per_worker: int = 1
    precision: str = "auto"  # auto (bf16 on NPU/CUDA, fp32 on CPU) | bf16 | fp32
    timeout_s: int = 2400  # process-group timeout; must exceed the HCCL timeouts
    env: dict[str, str] = Field(default_factory=dict)  # extra worker env, e.g. HCCL_SOCKET_IFNAME, HCCL_BUFFSIZE
    # custom Ray resources each worker / model actor also asks for: pin work to labelled nodes, or
    # simulate accelerator nodes on CPU boxes ({"FAKE_NPU": 1} on nodes started with that resource)
    worker_resources: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self):
        for name, amount in self.worker_resources.items():
            if name in ("CPU", "GPU", "memory") or not amount or float(amount) <= 0:
                raise ValueError(f"accelerator.worker_resources[{name!r}]={amount!r}: name a custom Ray resource with a "
                                 "positive amount (CPUs: accelerator.cpus_per_worker; GPUs/NPUs: accelerator.type)")
        if self.type not in ("auto", *BACKENDS):
            raise ValueError(f"accelerator.type={self.type!r}: use auto, npu, cuda or cpu")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"accelerator.precision={self.precision!r}: use auto, bf16 or fp32")
        if self.cpus_per_worker < 1:
            raise ValueError(f"accelerator.cpus_per_worker={self.cpus_per_worker} must be at least 1")
        return self


@dataclass(frozen=True)
class AcceleratorPlan:
    """What every worker does; crosses the Ray boundary as ``asdict(plan)``."""

    kind: str  # npu | cuda | cpu
    backend: str  # hccl | nccl | gloo
    resource: str | None  # Ray resource requested per worker besides CPUs (None on CPU)
    cpus_per_worker: int
    autocast_dtype: str | None  # "bfloat16" or None
    timeout_s: int
    env: dict[str, str]
    ray_sets_visible_devices: bool  # Ray pins one device per worker (ASCEND_RT_/CUDA_VISIBLE_DEVICES)
    extra_resources: dict[str, float] = field(default_factory=dict)  # custom resources per worker / actor

    def to_dict(self) -> dict:
        return asdict(self)


def plan_accelerator(config: AcceleratorConfig, cluster_resources: dict[str, float], *, check_npu_import: bool = True) -> AcceleratorPlan:
    """Decide the accelerator from the config and the cluster's resources (``ray.cluster_resources()``)."""
    kind = config.type
    if kind == "auto":
        kind = "npu" if cluster_resources.get(config.npu_resource, 0) > 0 else "cuda" if cluster_resources.get("GPU", 0) > 0 else "cpu"
    resource = {"npu": config.npu_resource, "cuda": "GPU", "cpu": None}[kind]
    if resource and cluster_resources.get(resource, 0) <= 0:
        raise ValueError(
            f"accelerator.type={kind} but the Ray cluster has no {resource!r} resource "
            f"(it has {sorted(k for k in cluster_resources if not k.startswith('node:'))}); start the nodes with "
            + (f"`ray start --resources='{{\"{resource}\": 8}}'`" if kind == "npu" else "GPUs visible")
            + " or use accelerator.type=cpu"
        )
    if kind == "npu" and check_npu_import and importlib.util.find_spec("torch_npu") is None:
        raise ValueError(
            "accelerator.type=npu but torch_npu is not installed here; install the project with its npu extra "
            "(pip install 'geneformer-ray[npu]') and `source /usr/local/Ascend/ascend-toolkit/set_env.sh`"
        )
    env = dict(config.env)
    if kind == "npu":
        env = {**HCCL_DEFAULTS, **{k: v for k, v in os.environ.items() if k.startswith("HCCL_")}, **env}
        slowest = max(int(env["HCCL_CONNECT_TIMEOUT"]), int(env["HCCL_EXEC_TIMEOUT"]))
        if config.timeout_s <= slowest:
            raise ValueError(
                f"accelerator.timeout_s={config.timeout_s} must exceed the HCCL timeouts (HCCL_EXEC_TIMEOUT / "
                f"HCCL_CONNECT_TIMEOUT up to {slowest} s), or a hung collective is reported as a generic timeout; "
                f"raise accelerator.timeout_s above {slowest}"
            )
    precision = config.precision if config.precision != "auto" else ("fp32" if kind == "cpu" else "bf16")
    if kind == "cpu" and precision == "bf16":
        _warn_cpu_bf16()
    return AcceleratorPlan(
        kind=kind, backend=BACKENDS[kind], resource=resource, cpus_per_worker=config.cpus_per_worker,
        autocast_dtype="bfloat16" if precision == "bf16" else None, timeout_s=config.timeout_s, env=env,
        ray_sets_visible_devices=kind == "cuda" or resource == "NPU",
        extra_resources={k: float(v) for k, v in config.worker_resources.items()},
    )


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512-BF16 and AMX; Arm's BF16 extension (Features)


def cpu_bf16(cpuinfo: str | None = None) -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and why: ``/proc/cpuinfo``'s flags (``cpuinfo`` replaces its
    text). Without bf16 units torch emulates bf16 and a matmul runs hundreds of times slower than in fp32
    (an AVX2-only EPYC: 0.3 GFLOP/s against 171 GFLOP/s at 2048^3, measured 2026-12-04)."""
    if cpuinfo is None:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = {f for line in cpuinfo.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
             for f in line.split(":", 1)[-1].split()}
    found = [f for f in CPU_BF16_FLAGS if f in flags]
    if found:
        return True, f"CPU flags {found}"
    return False, ("this CPU has no bf16 units (no avx512_bf16 / amx_bf16 / bf16 flag in /proc/cpuinfo): bf16 runs "
                   "emulated, far slower than fp32")


def measure_matmul(dtype: str, size: int = 256, repeats: int = 3) -> float:
    """GFLOP/s of a ``size``^3 matmul on this CPU in ``dtype`` (the best of ``repeats``)."""
    import torch

    a = torch.randn(size, size).to(getattr(torch, dtype))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


_warned_cpu_bf16: list[str] = []


def _warn_cpu_bf16() -> None:
    """Once per process: ``accelerator.precision: bf16`` on a CPU without bf16 units, with the rates measured here."""
    supported, why = cpu_bf16()
    if supported or _warned_cpu_bf16:
        return
    rates = f"a 256^3 matmul runs at {measure_matmul('bfloat16'):.1f} GFLOP/s in bf16 against {measure_matmul('float32'):.1f} in fp32"
    _warned_cpu_bf16.append(f"accelerator.precision=bf16 on a CPU: {why}; {rates} here. Use accelerator.precision=fp32 "
                            "(auto is fp32 on CPUs)")
    notice(_warned_cpu_bf16[0])


def scaling_kwargs(plan: AcceleratorPlan, num_workers: int, *, placement_strategy: str = "PACK") -> dict:
    """Arguments of ``ray.train.ScalingConfig``: one accelerator per worker."""
    resources = {"CPU": plan.cpus_per_worker, **plan.extra_resources}
    if plan.kind == "npu":
        resources[plan.resource] = 1
    return {"num_workers": num_workers, "use_gpu": plan.kind == "cuda", "resources_per_worker": resources,
            "placement_strategy": placement_strategy}


def torch_config(plan: AcceleratorPlan):
    """Ray's ``TorchConfig`` with the backend always explicit (Ray picks gloo for NPUs otherwise)."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend=plan.backend, timeout_s=plan.timeout_s)


def cluster_check(plan: AcceleratorPlan, num_workers: int, cluster_resources: dict[str, float]) -> None:
    """Refuse a run the cluster can never place (workers would wait for devices forever), keeping one
    CPU free for Ray Data: a read starves when training workers hold every CPU."""
    need = dict(scaling_kwargs(plan, num_workers)["resources_per_worker"])
    if plan.kind == "cuda":
        need["GPU"] = 1
    for name, per_worker in need.items():
        spare = 1 if name == "CPU" else 0
        have = cluster_resources.get(name, 0)
        if have < per_worker * num_workers + spare:
            raise ValueError(
                f"{num_workers} workers need {per_worker * num_workers:g} {name}"
                + (" plus 1 CPU left for Ray Data" if spare else "")
                + f", but the cluster has {have:g}; lower train.num_workers"
                + (" or accelerator.cpus_per_worker" if name == "CPU" else
                   f" or start more nodes with the {name!r} resource" if name in plan.extra_resources else "")
            )


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def check_placement(strategy: str) -> None:
    """Ray's placement-group strategies for the training workers."""
    if strategy not in PLACEMENT_STRATEGIES:
        raise ValueError(f"train.placement_strategy={strategy!r}: use one of {', '.join(PLACEMENT_STRATEGIES)} "
                         "(SPREAD: one worker per node where it can)")


# -- the driver's Ray --------------------------------------------------------------------------------
def start_ray() -> None:
    """Join the Ray cluster this runs in (``ray job submit`` sets RAY_ADDRESS; a node started with
    ``ray start`` is found); with none, start a local one with at least 4 logical CPUs, because 2
    training workers plus Ray Data need 3+ even on a 2-core machine. A no-op once Ray is up."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    try:
        ray.init(address="auto")
    except ConnectionError:
        # the dashboard (loopback only) serves the State API that Ray Train's placement-group cleaner polls:
        # without it the workers of a stopped run (an ASHA-stopped trial) keep their CPUs for good
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=True, dashboard_host="127.0.0.1")


def plan_cluster(config: AcceleratorConfig | None = None, *, num_workers: int | None = None) -> AcceleratorPlan:
    """The one start of every Ray stage: Ray joined (or started), the accelerator planned from the
    cluster's resources, and, for a training run of ``num_workers``, the cluster checked to fit it."""
    start_ray()
    resources = ray.cluster_resources()
    plan = plan_accelerator(config or AcceleratorConfig(), resources)
    if num_workers is not None:
        cluster_check(plan, num_workers, resources)
    return plan


# -- worker side -----------------------------------------------------------------------------------
def import_torch_npu():
    """The NPU seam: importing torch_npu registers the 'npu' device with torch."""
    try:
        return importlib.import_module("torch_npu")
    except Exception as exc:  # ImportError, or OSError when CANN libraries are missing
        raise RuntimeError(
            f"this worker cannot import torch_npu ({type(exc).__name__}: {exc}); on Ascend hosts install "
            "geneformer-ray[npu] and source /usr/local/Ascend/ascend-toolkit/set_env.sh before `ray start`"
        ) from None


def pad_multiple(plan: AcceleratorPlan | dict, configured: int | None = None) -> int:
    """Batch widths are rounded up to this. On CUDA and NPU every new (batch, width) shape costs a
    kernel plan or a graph compilation (cuDNN attention builds one per sequence length; Ascend
    compiles operators per shape), and length-grouped batches bring a new width nearly every step:
    multiples of 64 bound them to model_input_size / 64 shapes. On CPU no padding is wasted (1)."""
    if configured:
        return configured
    return 1 if _as_plan(plan).kind == "cpu" else 64


def worker_device_index(plan: AcceleratorPlan, local_rank: int) -> int:
    """Ray pins one device per worker when it knows the resource (index 0 of what it sees); with a
    custom resource name each worker sees the whole node and takes its local rank."""
    return 0 if plan.ray_sets_visible_devices else local_rank


def worker_device(plan: AcceleratorPlan | dict):
    """The torch device of this Ray Train worker (call inside ``train_loop_per_worker``)."""
    plan = _as_plan(plan)
    if plan.kind == "cpu":
        return _select_device(plan, 0)
    import ray.train

    return _select_device(plan, worker_device_index(plan, ray.train.get_context().get_local_rank()))


def _as_plan(plan: AcceleratorPlan | dict) -> AcceleratorPlan:
    """Plans cross the Ray boundary as dicts."""
    return plan if isinstance(plan, AcceleratorPlan) else AcceleratorPlan(**plan)


def _select_device(plan: AcceleratorPlan, index: int):
    """torch's device for the plan, made current (NPU: torch_npu imported first)."""
    import torch

    if plan.kind == "cpu":
        return torch.device("cpu")
    if plan.kind == "npu":
        import_torch_npu()
    _current_device(plan.kind, index)
    return torch.device(plan.kind, index)


def _current_device(kind: str, index: int) -> None:
    import torch

    getattr(torch, kind).set_device(index)


def autocast(plan: AcceleratorPlan | dict, device):
    """bf16 autocast where the plan asks for it; a no-op context otherwise."""
    import torch

    dtype = _as_plan(plan).autocast_dtype
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


# -- inference actors (Ray Data map_batches) ---------------------------------------------------------
def actor_resources(plan: AcceleratorPlan, *, cpus: float = 1) -> dict:
    """``map_batches`` resources of one model actor: one NPU or GPU each, or CPUs only."""
    resources = {"num_cpus": cpus}
    custom = dict(plan.extra_resources)
    if plan.kind == "cuda":
        resources["num_gpus"] = 1
    elif plan.kind == "npu":
        custom[plan.resource] = 1
    if custom:
        resources["resources"] = custom
    return resources


def default_num_actors(plan: AcceleratorPlan, cluster_resources: dict[str, float]) -> int:
    """One model actor per NPU / GPU of the cluster; on CPUs, one per CPU but one (Ray Data reads too)."""
    devices = {"cpu": cluster_resources.get("CPU", 2) - 1, "cuda": cluster_resources.get("GPU", 0),
               "npu": cluster_resources.get(plan.resource or "", 0)}[plan.kind]
    return max(1, int(devices))


def plan_actor_pool(config: AcceleratorConfig | None = None, num_actors: int | None = None) -> tuple[AcceleratorPlan, int]:
    """The accelerator plan and pool size of an inference stage (Ray joined or started first): the
    number asked for, or one actor per NPU / GPU (CPUs: one per CPU but one)."""
    plan = plan_cluster(config)
    return plan, num_actors or default_num_actors(plan, ray.cluster_resources())


def actor_pool(num_actors: int, *, one_block_at_a_time: bool = False):
    """Ray Data's pool of model actors: work starts with the first actor up and the pool grows to
    ``num_actors`` as devices free up (a fixed-size pool waits for all of them on a busy cluster).
    ``one_block_at_a_time``: an actor is handed its next block only when it finished the last, so that
    long compute-bound blocks (perturbation: minutes each) spread over every actor instead of queueing
    behind the first one up (Ray Data hands an actor up to 4 blocks by default)."""
    import ray.data

    if one_block_at_a_time:
        return ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors, initial_size=num_actors,
                                          max_tasks_in_flight_per_actor=1)
    return ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors)


@ray.remote(num_cpus=0)
class Tally:
    """A count that model actors add their finished rows to, for the driver's progress bar."""

    def __init__(self):
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n

    def value(self) -> int:
        return self.count


@contextmanager
def tallied(*, total: int | None, desc: str, unit: str = "cell"):
    """A ``Tally`` actor for the model actors (``tally.add.remote(rows)`` after each batch) and a progress
    bar on the driver that follows it, while a quiet console is open (elsewhere Ray Data's own progress
    display shows, and this yields None)."""
    if not console_open():
        yield None
        return
    tally = Tally.remote()
    try:
        with progress_from_count(lambda: ray.get(tally.value.remote(), timeout=10), total=total, desc=desc, unit=unit):
            yield tally
    finally:
        ray.kill(tally)


def actor_device(plan: AcceleratorPlan | dict):
    """The torch device inside a model actor: Ray pins one device per actor (index 0 of what it sees)."""
    return _select_device(_as_plan(plan), 0)
