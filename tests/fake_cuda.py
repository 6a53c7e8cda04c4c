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
- The CUDA runtime's host-side calls answer as one GPU would: is_available, device_count,
  is_bf16_supported, get_device_name, synchronize; pin_memory() is a no-op (page-locking needs a driver).
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
from torch._subclasses.fake_tensor import FakeTensorMode

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
        mock.patch("torch.Generator", CudaGenerator),
        mock.patch("torch.multinomial", _checked_multinomial),
        mock.patch.object(torch.Tensor, "pin_memory", lambda self, *args, **kwargs: self),
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
