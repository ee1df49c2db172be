"""Which device a run uses: ``cpu``, ``cuda`` (the current one), ``cuda:N``, ``mps`` ...

SpeechBrain users write ``cuda`` or ``cuda:0``. ``cuda`` means the current CUDA device; under torchrun
every rank gets its own, ``cuda:LOCAL_RANK``, whatever index was written (SpeechBrain's rule). A
device this torch cannot use is an error that says what to do, raised when the Brain is built
rather than deep inside the first step.

Example::

    >>> from fbrain.devices import default_device, resolve_device
    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device(None) == resolve_device(default_device())  # the accelerator, or the cpu
    True
"""

from __future__ import annotations

import os

import torch


class DeviceError(ValueError):
    """A device that does not exist or that this torch cannot use."""


def launched_by_torchrun() -> bool:
    """True in a process started by torchrun (its RANK/LOCAL_RANK/WORLD_SIZE environment)."""
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def _parse(spec) -> torch.device:
    if isinstance(spec, torch.device):
        return spec
    if not isinstance(spec, str):
        raise DeviceError(f"device: expected a string such as 'cpu', 'cuda' or 'cuda:0', got {spec!r}")
    try:
        return torch.device(spec.strip())
    except RuntimeError as err:
        raise DeviceError(f"device: {spec!r} is not a device name ({err}); use 'cpu', 'cuda', 'cuda:N' "
                          "or 'mps'") from None


def _cuda(device: torch.device) -> torch.device:
    if not torch.cuda.is_available():
        raise DeviceError(f"device {str(device)!r}: CUDA is not available (torch {torch.__version__}); use "
                          "device='cpu', or install a CUDA build of torch on a machine with a GPU")
    count = torch.cuda.device_count()
    if launched_by_torchrun():
        index = int(os.environ["LOCAL_RANK"])  # one device per rank
        if not 0 <= index < count:
            raise DeviceError(f"torchrun's LOCAL_RANK={index}, but this process sees {count} CUDA device(s): start "
                              "at most that many processes per node (--nproc_per_node), or check CUDA_VISIBLE_DEVICES")
    else:
        index = torch.cuda.current_device() if device.index is None else device.index
    if not 0 <= index < count:
        raise DeviceError(f"device 'cuda:{index}': this machine has {count} CUDA device(s), "
                          f"cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def default_device() -> str:
    """SpeechBrain 1.1's default device: the machine's accelerator (CUDA, MPS ...) if torch sees
    one, else the CPU."""
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return "cpu" if accelerator is None else accelerator.type


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """The device ``spec`` names, made concrete (``cuda`` gets its index); None means
    :func:`default_device`."""
    device = _parse(default_device() if spec is None else spec)
    if device.type == "cuda":
        return _cuda(device)
    if device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise DeviceError(f"device {str(device)!r}: MPS is not available (it needs an Apple-silicon Mac "
                              "and a torch built with MPS); use device='cpu'")
        return device
    if device.type not in ("cpu", "meta"):
        # Other backends (xpu, hpu ...) answer torch.<type>.is_available(); one without that module
        # (xla without torch_xla) is not usable by this torch, and would fail deep inside a step.
        available = getattr(getattr(torch, device.type, None), "is_available", None)
        if available is None or not available():
            raise DeviceError(f"device {str(device)!r}: not available in this torch ({torch.__version__}); "
                              "use device='cpu', 'cuda' or 'mps', or install the backend's torch package")
    return device


def use_device(device: torch.device) -> None:
    """Make ``device`` the current one of its kind (CUDA needs this for its kernels and NCCL)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
