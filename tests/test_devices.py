"""Device names: cpu, cuda (the current one; cuda:LOCAL_RANK under torchrun), cuda:N, mps. The CUDA
and MPS calls are mocked, so every rule is checked on this CPU-only machine."""

from __future__ import annotations

import pytest
import torch

import fbrain
from fbrain import devices
from fbrain.devices import DeviceError, default_device, resolve_device


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with cuda:0 and cuda:1, cuda:1 current; records set_device calls."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_cpu_and_none_and_device_objects():
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device(None) == resolve_device(default_device())  # SpeechBrain 1.1: the accelerator, else cpu
    assert default_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(" cpu ") == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "", 0])
def test_a_name_that_is_not_a_device_says_which_names_are(bad):
    with pytest.raises(DeviceError, match="device"):
        resolve_device(bad)


def test_cuda_without_cuda_names_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA is not available.*device='cpu'"):
        resolve_device("cuda")


def test_cuda_means_the_current_device_and_cuda_n_that_one(two_gpus):
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device(torch.device("cuda")) == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="has 2 CUDA device.*cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_under_torchrun_every_rank_gets_its_local_device(two_gpus, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_device("cuda") == resolve_device("cuda:0") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(DeviceError, match="LOCAL_RANK=3.*sees 2 CUDA device.*--nproc_per_node"):
        resolve_device("cuda")


def test_mps(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="MPS is not available"):
        resolve_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")


def test_the_brain_makes_cuda_concrete_and_current(two_gpus):
    # fbrain 0.2 called torch.cuda.set_device(torch.device("cuda")), which needs an index: "cuda"
    # (SpeechBrain's usual spelling) could never work.
    brain = fbrain.Brain(modules={}, run_opts={"device": "cuda"})
    assert brain.device == "cuda:1" and brain.device_type == "cuda"
    assert two_gpus == [torch.device("cuda", 1)]
    with pytest.raises(DeviceError, match="cuda:7.*has 2 CUDA device"):
        fbrain.Brain(modules={}, run_opts={"device": "cuda:7"})


def test_ddp_init_group_gives_each_rank_its_device(two_gpus, monkeypatch):
    joined = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(fbrain.distributed, "init_from_environment", lambda backend, device: joined.append((backend, device)))
    run_opts = {"device": "cuda"}
    fbrain.distributed.ddp_init_group(run_opts)
    assert run_opts["device"] == "cuda:1" and joined == [("nccl", "cuda:1")] and two_gpus == [torch.device("cuda", 1)]
    run_opts = {"device": "cpu", "distributed_backend": "nccl"}
    fbrain.distributed.ddp_init_group(run_opts)
    assert joined[-1] == ("gloo", "cpu")  # nccl needs GPUs


def test_use_device_leaves_other_kinds_alone(two_gpus):
    devices.use_device(torch.device("cpu"))
    assert two_gpus == []
