"""ggml's device registry: an RPC-enabled build must not pass for a GPU one."""

from __future__ import annotations

from specrun.engines.ggml_devices import DEVICE_CPU, DEVICE_GPU, DEVICE_IGPU, Device, devices, has_gpu


def test_rpc_devices_are_not_this_machines_gpus() -> None:
    assert Device("CUDA0", "RTX", DEVICE_GPU, "CUDA").is_gpu
    assert Device("Vulkan0", "iGPU", DEVICE_IGPU, "Vulkan").is_gpu
    assert not Device("RPC0[127.0.0.1:50052]", "remote", DEVICE_GPU, "RPC").is_gpu
    assert not Device("CPU", "cpu", DEVICE_CPU, "CPU").is_gpu


def test_the_registry_lists_the_cpu() -> None:
    found = devices()
    assert any(d.type == DEVICE_CPU and d.backend == "CPU" for d in found)
    assert has_gpu() == any(d.is_gpu for d in found)
