"""Fake CUDA: run the code paths that only a GPU takes, on a machine without one, and fail where a
CPU tensor meets a CUDA one (the error a real GPU raises, and only a GPU: on the CPU every tensor is
on the same device, so the ordinary tests cannot see a forgotten `device=`).

    with fake_cuda():
        model = build_on_cuda(...)      # or anything the code under test builds on torch.device("cuda")
        generate(model, ...)            # FakeTensorDeviceMismatchError if a CPU tensor meets a CUDA one

What is real and what is stood in for:
- Tensors are PyTorch's own FakeTensors (FakeTensorMode): shapes, dtypes, devices and autocast are
  computed by the real dispatcher and the real meta kernels; no numbers exist. Mixing devices raises
  FakeTensorDeviceMismatchError, as CUDA raises "Expected all tensors to be on the same device" (CPU
  scalars (0-dim) may mix, on a real GPU too). Real CPU tensors entering (a data loader's batch, a
  checkpoint's weights) become fake CPU tensors: they must be moved (`.to(device)`) before use.
- Host reads (`.item()`, `.tolist()`, `bool(t)`) have no number to read: they answer 0 / 0.0 / False,
  so the code around them runs; what it computes from them is meaningless and never asserted.
- A generator stands for a CUDA one (torch.Generator(device="cuda") needs a driver) but remembers
  the device it was made for: sampling a CUDA tensor with a CPU generator raises, as on a GPU.
- The CUDA runtime's host-side calls answer as one 80 GB GPU would: is_available, device_count,
  is_bf16_supported, get_device_name, synchronize, mem_get_info (all free), the RNG state (a real
  16-byte CPU tensor, checked on the way back), timing events (1 ms apart), the peak-memory counters;
  pin_memory() is a no-op (page-locking needs a driver).
- torch.save writes each fake tensor as a real zero tensor of its shape and dtype on the CPU, so a
  checkpoint a fake-CUDA run saves is a real file that loads (its numbers mean nothing); torch.load
  gives real CPU tensors, as it does on a GPU machine (they must be moved to the device before use).
- Tensor.numpy() refuses a CUDA tensor, as CUDA does, and converts a real CPU one.
- torch.profiler.profile records the CPU side only (CUDA's activity needs CUPTI and a driver): the
  kernel names of the dispatched ops, which is what the code reads from it.
- Autograd's engine cannot run a backward on fake CUDA tensors without a driver (pytorch/pytorch#92627):
  `Tensor.backward` is replaced by a stand-in that gives every leaf of the graph a zero gradient of its
  own shape, dtype and device, accumulated as autograd accumulates. What the real backward computes
  is placed by the forward's devices, which the forward under fake CUDA has checked.

Needs the torch of uv.lock (2.15): before ~2.13 making a fake CUDA tensor still asked for a driver
(pytorch/pytorch#122109). Not covered here (see their own tests): numbers (the CPU tests), compiled
graphs (CPU inductor, tests/test_compile.py), collectives (gloo, tests/test_fsdp.py), and what no CPU
can tell: kernels, memory, speed (bench/gpu_check.sh on a GPU).
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

try:
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError
except ImportError:  # torch < 2.13: a plain RuntimeError ("Unhandled FakeTensor Device Propagation")
    FakeTensorDeviceMismatchError = RuntimeError
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["DeviceMismatch", "fake_cuda", "is_fake"]

DEVICE_NAME = "fake CUDA device (tests/fake_cuda.py)"


class GeneratorDeviceMismatch(RuntimeError):
    """A random draw for a tensor on one device from a generator of another (CUDA: "Expected a 'cuda'
    device type for generator")."""


# What the kit raises where a real GPU would refuse to mix devices.
DeviceMismatch = (FakeTensorDeviceMismatchError, GeneratorDeviceMismatch)


class CudaGenerator(torch.Generator):
    """torch.Generator(device=...) that needs no driver: a CPU generator remembering its device."""

    def __new__(cls, device="cpu"):
        generator = super().__new__(cls, "cpu")
        generator.fake_device = torch.device(device)
        return generator

    def __init__(self, device="cpu"):
        pass


def _device_of(generator: torch.Generator) -> torch.device:
    device = getattr(generator, "fake_device", generator.device)
    return torch.device("cuda", 0) if device.type == "cuda" and device.index is None else device


class HostReads(TorchDispatchMode):
    """Answers host reads of fake tensors with placeholders."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            tensor = args[0]
            return False if tensor.dtype == torch.bool else 0.0 if tensor.dtype.is_floating_point else 0
        return func(*args, **(kwargs or {}))


_multinomial = torch.multinomial


def _checked_multinomial(input, num_samples, replacement=False, *, generator=None, **kwargs):
    """torch.multinomial refusing a generator of another device (checked here: the dispatcher hands a
    mode a new Python object for the generator, without what CudaGenerator remembers)."""
    if generator is not None and _device_of(generator) != input.device:
        raise GeneratorDeviceMismatch(f"a generator for {_device_of(generator)} drawing for a tensor on {input.device}")
    return _multinomial(input, num_samples, replacement, generator=generator, **kwargs)


def _backward_stand_in(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
    """Tensor.backward without the autograd engine: a zero gradient for every leaf of the graph."""
    seen, stack = set(), [self.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)  # an AccumulateGrad node: the leaf it feeds
        if leaf is not None:
            zeros = torch.zeros_like(leaf)
            leaf.grad = zeros if leaf.grad is None else leaf.grad + zeros
        stack.extend(next_node for next_node, _ in node.next_functions)


class Event:
    """torch.cuda.Event without a driver: every elapsed_time is 1 ms."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end) -> float:
        return 1.0


_RNG_STATE_BYTES = 16  # what torch.cuda.get_rng_state returns: a seed and an offset


def _get_rng_state(device=None) -> torch.Tensor:
    with unset_fake_temporarily():
        return torch.zeros(_RNG_STATE_BYTES, dtype=torch.uint8)


def _set_rng_state(state: torch.Tensor, device=None) -> None:
    if state.device.type != "cpu" or state.dtype != torch.uint8:  # what CUDA's set_rng_state refuses
        raise TypeError(f"RNG state must be a torch.ByteTensor on the CPU, got {state.dtype} on {state.device}")


_save = torch.save


def _save_real(obj, f, *args, **kwargs):
    """torch.save with every fake tensor replaced by a real CPU zero tensor of its shape and dtype."""
    with unset_fake_temporarily():

        def real(value):
            if isinstance(value, torch.Tensor) and is_fake(value):
                return torch.zeros(value.shape, dtype=value.dtype)
            if isinstance(value, dict):
                return {k: real(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return type(value)(real(v) for v in value)
            return value

        return _save(real(obj), f, *args, **kwargs)


_load = torch.load


def _load_real(*args, **kwargs):
    with unset_fake_temporarily():
        return _load(*args, **kwargs)


_profile = torch.profiler.profile


def _cpu_profile(*args, activities=None, **kwargs):
    cpu_only = [a for a in (activities or []) if a != torch.profiler.ProfilerActivity.CUDA]
    return _profile(*args, activities=cpu_only or [torch.profiler.ProfilerActivity.CPU], **kwargs)


_numpy = torch.Tensor.numpy


def _checked_numpy(self, *args, **kwargs):
    """Tensor.numpy as on a GPU machine: a CUDA tensor refuses (copy it to the CPU first), a real CPU
    tensor (a checkpoint's, a loader's) converts; a fake one has no numbers to give."""
    if self.device.type == "cuda":
        raise TypeError(f"can't convert {self.device} device type tensor to numpy: use Tensor.cpu() first")
    if is_fake(self):
        raise TypeError("a fake tensor has no numbers for numpy (tests/fake_cuda.py)")
    with unset_fake_temporarily():
        return _numpy(self, *args, **kwargs)


def is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


@contextlib.contextmanager
def fake_cuda():
    """Run the block as if one CUDA GPU were present (see the module docstring)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    patches = [
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.device_count", return_value=1),
        mock.patch("torch.cuda.is_bf16_supported", return_value=True),
        mock.patch("torch.cuda.get_device_name", return_value=DEVICE_NAME),
        mock.patch("torch.cuda.synchronize"),
        mock.patch("torch.cuda.mem_get_info", return_value=(80 * 2**30, 80 * 2**30)),
        mock.patch("torch.cuda.get_rng_state", _get_rng_state),
        mock.patch("torch.cuda.set_rng_state", _set_rng_state),
        mock.patch("torch.cuda.Event", Event),
        mock.patch("torch.cuda.reset_peak_memory_stats"),
        mock.patch("torch.cuda.max_memory_allocated", return_value=0),
        mock.patch("torch.cuda.empty_cache"),
        mock.patch("torch.save", _save_real),
        mock.patch("torch.load", _load_real),
        mock.patch("torch.profiler.profile", _cpu_profile),
        mock.patch("torch.Generator", CudaGenerator),
        mock.patch("torch.multinomial", _checked_multinomial),
        mock.patch.object(torch.Tensor, "pin_memory", lambda self, *args, **kwargs: self),
        mock.patch.object(torch.Tensor, "numpy", _checked_numpy),
        mock.patch.object(torch.Tensor, "backward", _backward_stand_in),
        # CUDA-graph capture check of every optimizer step: asks the driver for the current stream.
        mock.patch("torch.optim.Optimizer._accelerator_graph_capture_health_check"),
        # FakeTensorMode itself asks is_available() whether it may touch the device (it may not).
        mock.patch.object(FakeTensorMode, "avoid_device_init", new_callable=mock.PropertyMock, return_value=True),
    ]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        stack.enter_context(HostReads())
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
