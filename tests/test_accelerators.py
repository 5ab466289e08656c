"""Ring 1: NPU / CUDA / CPU decisions, tested without the hardware."""

from __future__ import annotations

import re

import pytest

from geneformer_ray import runtime as acc
from geneformer_ray.runtime import AcceleratorConfig, plan_accelerator, scaling_kwargs

CPU_BOX = {"CPU": 4.0, "memory": 1e10, "node:127.0.0.1": 1.0}
ATLAS = {"CPU": 192.0, "NPU": 8.0}
FAKE_ATLAS = {"CPU": 4.0, "FAKE_NPU": 2.0}
GPU_NODE = {"CPU": 16.0, "GPU": 1.0}


def test_auto_picks_what_the_cluster_has():
    assert plan_accelerator(AcceleratorConfig(), CPU_BOX).kind == "cpu"
    assert plan_accelerator(AcceleratorConfig(), GPU_NODE).kind == "cuda"
    npu = plan_accelerator(AcceleratorConfig(), ATLAS, check_npu_import=False)
    assert (npu.kind, npu.backend, npu.resource, npu.autocast_dtype) == ("npu", "hccl", "NPU", "bfloat16")
    assert npu.ray_sets_visible_devices
    cpu = plan_accelerator(AcceleratorConfig(), CPU_BOX)
    assert (cpu.backend, cpu.resource, cpu.autocast_dtype) == ("gloo", None, None)
    cuda = plan_accelerator(AcceleratorConfig(), GPU_NODE)
    assert (cuda.backend, cuda.autocast_dtype) == ("nccl", "bfloat16")


def test_simulated_npu_resource_name():
    plan = plan_accelerator(AcceleratorConfig(npu_resource="FAKE_NPU", cpus_per_worker=1), FAKE_ATLAS, check_npu_import=False)
    assert plan.kind == "npu" and plan.resource == "FAKE_NPU" and not plan.ray_sets_visible_devices
    assert scaling_kwargs(plan, 2)["resources_per_worker"] == {"CPU": 1, "FAKE_NPU": 1}
    assert acc.worker_device_index(plan, local_rank=1) == 1  # sees every device: picks its own
    real = plan_accelerator(AcceleratorConfig(), ATLAS, check_npu_import=False)
    assert acc.worker_device_index(real, local_rank=5) == 0  # Ray pinned one device


def test_backend_is_always_explicit():
    for resources, backend in ((CPU_BOX, "gloo"), (GPU_NODE, "nccl")):
        config = acc.torch_config(plan_accelerator(AcceleratorConfig(), resources))
        assert config.backend == backend
    hccl = acc.torch_config(plan_accelerator(AcceleratorConfig(), ATLAS, check_npu_import=False))
    assert hccl.backend == "hccl" and hccl.timeout_s == 2400


def test_asking_for_missing_hardware_is_a_clear_error():
    with pytest.raises(ValueError, match="has no 'NPU' resource"):
        plan_accelerator(AcceleratorConfig(type="npu"), CPU_BOX)
    with pytest.raises(ValueError, match="has no 'GPU' resource"):
        plan_accelerator(AcceleratorConfig(type="cuda"), CPU_BOX)
    with pytest.raises(ValueError, match=r"torch_npu is not installed.*geneformer-ray\[npu\].*set_env.sh"):
        plan_accelerator(AcceleratorConfig(type="npu"), ATLAS)  # no torch_npu on this machine
    with pytest.raises(RuntimeError, match="cannot import torch_npu"):
        acc.import_torch_npu()
    with pytest.raises(ValueError, match="accelerator.type='tpu'"):
        AcceleratorConfig(type="tpu")


def test_hccl_timeouts_stay_below_the_process_group_timeout(monkeypatch):
    monkeypatch.setenv("HCCL_EXEC_TIMEOUT", "3000")
    with pytest.raises(ValueError, match="must exceed the HCCL timeouts .* above 3000"):
        plan_accelerator(AcceleratorConfig(), ATLAS, check_npu_import=False)
    plan = plan_accelerator(AcceleratorConfig(timeout_s=3600, env={"HCCL_SOCKET_IFNAME": "eth0"}), ATLAS, check_npu_import=False)
    assert plan.env == {"HCCL_CONNECT_TIMEOUT": "120", "HCCL_EXEC_TIMEOUT": "3000", "HCCL_SOCKET_IFNAME": "eth0"}
    assert plan_accelerator(AcceleratorConfig(), CPU_BOX).env == {}  # no HCCL settings off NPUs


def test_precision_and_cluster_capacity():
    assert plan_accelerator(AcceleratorConfig(precision="bf16"), CPU_BOX).autocast_dtype == "bfloat16"
    assert plan_accelerator(AcceleratorConfig(precision="fp32"), GPU_NODE).autocast_dtype is None
    plan = plan_accelerator(AcceleratorConfig(), CPU_BOX)
    acc.cluster_check(plan, 2, CPU_BOX)
    with pytest.raises(ValueError, match="4 workers need 4 CPU plus 1 CPU left for Ray Data, but the cluster has 4"):
        acc.cluster_check(plan, 4, CPU_BOX)
    npu = plan_accelerator(AcceleratorConfig(npu_resource="FAKE_NPU"), FAKE_ATLAS, check_npu_import=False)
    with pytest.raises(ValueError, match="3 workers need 3 FAKE_NPU"):
        acc.cluster_check(npu, 3, {**FAKE_ATLAS, "CPU": 16.0})


def test_batch_width_multiple_per_accelerator():
    """Accelerators compile per shape (cuDNN attention plans, Ascend operators): widths rounded to 64;
    CPU wastes nothing; an explicit data.pad_to_multiple wins."""
    assert acc.pad_multiple(plan_accelerator(AcceleratorConfig(), CPU_BOX)) == 1
    assert acc.pad_multiple(plan_accelerator(AcceleratorConfig(), GPU_NODE).to_dict()) == 64
    assert acc.pad_multiple(plan_accelerator(AcceleratorConfig(), ATLAS, check_npu_import=False)) == 64
    assert acc.pad_multiple(plan_accelerator(AcceleratorConfig(), GPU_NODE), 8) == 8


def test_cpu_worker_device_and_autocast():
    import torch

    plan = plan_accelerator(AcceleratorConfig(), CPU_BOX)
    assert acc.worker_device(plan.to_dict()) == torch.device("cpu")
    with acc.autocast(plan, torch.device("cpu")):
        assert torch.get_autocast_dtype("cpu") is not None
    bf16 = plan_accelerator(AcceleratorConfig(precision="bf16"), CPU_BOX)
    with acc.autocast(bf16, torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_inference_actor_resources_and_device(monkeypatch):
    import torch

    assert acc.actor_resources(plan_accelerator(AcceleratorConfig(), GPU_NODE)) == {"num_cpus": 1, "num_gpus": 1}
    npu = plan_accelerator(AcceleratorConfig(npu_resource="FAKE_NPU"), FAKE_ATLAS, check_npu_import=False)
    assert acc.actor_resources(npu, cpus=2) == {"num_cpus": 2, "resources": {"FAKE_NPU": 1}}
    cpu = plan_accelerator(AcceleratorConfig(), CPU_BOX)
    assert acc.actor_resources(cpu) == {"num_cpus": 1} and acc.actor_device(cpu) == torch.device("cpu")
    calls = []
    monkeypatch.setattr(acc, "_current_device", lambda kind, index: calls.append((kind, index)))
    assert acc.actor_device(plan_accelerator(AcceleratorConfig(), GPU_NODE)) == torch.device("cuda", 0)
    assert calls == [("cuda", 0)]  # Ray pins one device per actor: it sees index 0

    def no_cann():
        raise RuntimeError("this worker cannot import torch_npu")

    monkeypatch.setattr(acc, "import_torch_npu", no_cann)
    with pytest.raises(RuntimeError, match="cannot import torch_npu"):  # the seam is crossed before any NPU call
        acc.actor_device(npu)
    assert calls == [("cuda", 0)]


AVX2_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
BF16_CPUINFO = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_cpu_bf16_is_read_from_the_cpu_flags_and_bf16_on_a_cpu_without_them_warns_once(monkeypatch):
    import warnings

    from geneformer_ray import runtime

    assert runtime.cpu_bf16(BF16_CPUINFO) == (True, "CPU flags ['avx512_bf16']")
    assert runtime.cpu_bf16(ARM_CPUINFO)[0] and not runtime.cpu_bf16(AVX2_CPUINFO)[0]
    assert "no bf16 units" in runtime.cpu_bf16(AVX2_CPUINFO)[1]
    monkeypatch.setattr(runtime, "cpu_bf16", lambda cpuinfo=None: (False, "this CPU has no bf16 units (test)"))
    monkeypatch.setattr(runtime, "_warned_cpu_bf16", [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_accelerator(AcceleratorConfig(type="cpu", precision="bf16"), {"CPU": 4})
        plan_accelerator(AcceleratorConfig(type="cpu", precision="bf16"), {"CPU": 4})
        plan_accelerator(AcceleratorConfig(type="cpu"), {"CPU": 4})  # auto: fp32 on CPUs, nothing to say
    assert plan.autocast_dtype == "bfloat16"  # what was asked for, with the warning
    (warning,) = caught
    assert re.search(r"accelerator.precision=bf16 on a CPU: this CPU has no bf16 units \(test\); a 256\^3 matmul runs "
                     r"at [\d.]+ GFLOP/s in bf16 against [\d.]+ in fp32 here. Use accelerator.precision=fp32", str(warning.message))
    assert plan_accelerator(AcceleratorConfig(type="cpu"), {"CPU": 4}).autocast_dtype is None
