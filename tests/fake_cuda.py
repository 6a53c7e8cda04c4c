"""Fake GPUs: run the code paths that only a GPU takes, on a machine without one, and fail where a
CPU tensor meets a GPU one (the error a real GPU raises, and only a GPU: on the CPU every tensor is
on the same device, so the ordinary tests cannot see a forgotten `device=`). Two GPUs are faked: a
CUDA one (`fake_cuda()`) and Apple silicon's (`fake_mps()`: torch's MPS backend).

    with fake_cuda():                   # or fake_mps(), or fake_device("mps")
        model = build_on_cuda(...)      # or anything the code under test builds on torch.device("cuda")
        generate(model, ...)            # FakeTensorDeviceMismatchError if a CPU tensor meets a CUDA one

What is real and what is stood in for, on either device:
- Tensors are PyTorch's own FakeTensors (FakeTensorMode): shapes, dtypes, devices and autocast are
  computed by the real dispatcher and the real meta kernels; no numbers exist. Mixing devices raises
  FakeTensorDeviceMismatchError, as CUDA and MPS raise "Expected all tensors to be on the same
  device" (CPU scalars (0-dim) may mix, on a real GPU too). Real CPU tensors entering (a data
  loader's batch, a checkpoint's weights) become fake CPU tensors: they must be moved (`.to(device)`)
  before use.
- Host reads (`.item()`, `.tolist()`, `bool(t)`) of a fake tensor have no number to read: they answer
  0 / 0.0 / False, so the code around them runs; what it computes from them is meaningless and never
  asserted (a real CPU tensor answers with its number). One read answers 1: a fake AdamW step
  counter, which AdamW's single-tensor path (unfused: MPS's) reads to divide by 1 - beta ** step.
- A generator stands for a GPU one (torch.Generator(device="cuda" or "mps") needs the device) but
  remembers the device it was made for: sampling a GPU tensor with a CPU generator raises, as on a GPU.
- pin_memory() is a no-op (page-locking needs a driver), counted in the record the context manager
  yields (`HostCalls.pinned`); so are the device's synchronize calls (`HostCalls.synchronized`).
- torch.save writes each fake tensor as a real zero tensor of its shape and dtype on the CPU, so a
  checkpoint a fake-GPU run saves is a real file that loads (its numbers mean nothing); torch.load
  gives real CPU tensors, as it does on a GPU machine (they must be moved to the device before use).
- Tensor.numpy() refuses a GPU tensor, as CUDA and MPS do, and converts a real CPU one.
- torch.profiler.profile records the CPU side only (CUDA's activity needs CUPTI and a driver): the
  kernel names of the dispatched ops, which is what the code reads from it.
- Autograd's engine cannot run a backward on fake GPU tensors without a driver (pytorch/pytorch#92627):
  `Tensor.backward` is replaced by a stand-in that gives every leaf of the graph a zero gradient of its
  own shape, dtype and device, accumulated as autograd accumulates. What the real backward computes
  is placed by the forward's devices, which the forward under the fake device has checked.

fake_cuda(): the CUDA runtime's host-side calls answer as one 80 GB H100 (sm90) would: is_available,
device_count, is_bf16_supported, get_device_name, get_device_capability, synchronize, mem_get_info
(all free), the RNG state (a real 16-byte CPU tensor, checked on the way back), timing events (1 ms
apart), the peak-memory counters.

fake_mps(): a Mac with Apple silicon, 16 GB of unified memory, macOS 14 or later, and no CUDA
(fake_device("mps", tensors=False): that Mac's answers over real tensors, for code that must not use
the GPU; on this torch a real MPS tensor then fails, "not linked with support for mps devices"):
- torch.cuda.is_available() is False (also on a GPU host running the tests) and
  torch.backends.mps.is_available() / is_built() are True.
- torch.mps answers as that Mac would: synchronize (counted), get_rng_state (a real 44-byte CPU
  uint8 tensor: 7 Philox words, the seed, the offset; set_rng_state checks what comes back as MPS
  does: a CPU uint8 tensor), recommended_max_memory() = 11,453,251,584 bytes (Metal's
  recommendedMaxWorkingSetSize of a 16 GB Mac: about two thirds of it), current / driver allocated
  memory 0 (nothing allocated: fake tensors have no storage), empty_cache.
- MPS has no float64 (Metal has no 64-bit float): making an MPS tensor of float64 raises TypeError,
  as MPS does ("Cannot convert a MPS Tensor to float64 dtype..."). bfloat16 is accepted (macOS 14+).
- scaled_dot_product_attention of MPS tensors runs PyTorch's math kernel, the one MPS trains with,
  after MPS autocast's cast to its dtype (a Linux build has no MPS entry in the kernel chooser, which
  asserts). Which kernels a forced sdpa_kernel([...]) admits on a real Mac is not modelled.
- What a Linux build of torch lacks for MPS, lent while the block runs: MPS's device guard (the one
  autograd and Tensor.to / copy_ / indexing ask for) is the meta device's, which does nothing, as
  there is no current device or stream to set for fake tensors; so that its "current device" (meta)
  is never taken for MPS's, Tensor.to gives "mps" its index 0 first.

Needs the torch of uv.lock (2.15): before ~2.13 making a fake CUDA tensor still asked for a driver
(pytorch/pytorch#122109). Not covered here (see their own tests): numbers (the CPU tests), compiled
graphs (CPU inductor, tests/test_compile.py), collectives (gloo, tests/test_fsdp.py), and what no CPU
can tell: kernels, memory, speed (bench/gpu_check.sh on a GPU; nothing yet on a Mac), and which ops
Metal lacks beyond float64 (an op with no MPS kernel fails on a Mac, or falls back to the CPU under
PYTORCH_ENABLE_MPS_FALLBACK=1: the fake tensors run every op's meta kernel).
"""

from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.optim import adam

try:
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError
except ImportError:  # torch < 2.13: a plain RuntimeError ("Unhandled FakeTensor Device Propagation")
    FakeTensorDeviceMismatchError = RuntimeError
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["DeviceMismatch", "HostCalls", "fake_cuda", "fake_device", "fake_mps", "is_fake"]

DEVICE_NAME = "fake CUDA device (tests/fake_cuda.py)"
# Metal's recommendedMaxWorkingSetSize on a 16 GB Apple-silicon Mac, as llama.cpp logs it there.
MPS_RECOMMENDED_MAX_MEMORY = 11_453_251_584


class GeneratorDeviceMismatch(RuntimeError):
    """A random draw for a tensor on one device from a generator of another (CUDA: "Expected a 'cuda'
    device type for generator")."""


# What the kit raises where a real GPU would refuse to mix devices.
DeviceMismatch = (FakeTensorDeviceMismatchError, GeneratorDeviceMismatch)


@dataclass
class HostCalls:
    """What the code under test asked of the host side of the fake device (the context's `as` value)."""

    device: str  # "cuda" or "mps"
    pinned: int = 0  # Tensor.pin_memory() calls
    synchronized: int = 0  # torch.cuda.synchronize / torch.mps.synchronize calls


class FakeGenerator(torch.Generator):
    """torch.Generator(device=...) that needs no driver: a CPU generator remembering its device."""

    def __new__(cls, device="cpu"):
        generator = super().__new__(cls, "cpu")
        generator.fake_device = torch.device(device)
        return generator

    def __init__(self, device="cpu"):
        pass


def _device_of(generator: torch.Generator) -> torch.device:
    device = getattr(generator, "fake_device", generator.device)
    return torch.device(device.type, 0) if device.type in ("cuda", "mps") and device.index is None else device


class HostReads(TorchDispatchMode):
    """Answers host reads of fake tensors with placeholders (of real ones with their numbers)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            tensor = args[0]
            if not is_fake(tensor):  # a real CPU tensor (a checkpoint's step counter) has its number
                with unset_fake_temporarily():
                    return tensor.item()
            return False if tensor.dtype == torch.bool else 0.0 if tensor.dtype.is_floating_point else 0
        return func(*args, **(kwargs or {}))


def _on_mps(*values) -> bool:
    """Whether any of `values` is an MPS tensor or device."""
    devices = [v.device if isinstance(v, torch.Tensor) else v for v in values]
    return any(isinstance(d, (torch.device, str)) and torch.device(d).type == "mps" for d in devices)


NO_MPS_DTYPES = (torch.float64, torch.complex128)


class NoFloat64OnMps(TorchDispatchMode):
    """Refuses an MPS tensor of float64, as MPS does (Metal has no 64-bit float)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and _on_mps(tensor) and tensor.dtype in NO_MPS_DTYPES:
                raise TypeError(
                    f"Cannot convert a MPS Tensor to {tensor.dtype} dtype as the MPS framework doesn't support float64 "
                    f"({func}; tests/fake_cuda.py). Please use float32 instead."
                )
        return out


@contextlib.contextmanager
def _mps_device_guard():
    """Lend MPS the meta device's guard (a no-op) while the block runs. A Linux build of torch has no
    MPS guard, and asks for one wherever a tensor's device is made current: autograd's record of
    every tensor that needs a gradient, Tensor.to / copy_ / indexing. A GPU's guard sets the current
    device and stream; fake tensors have neither to set."""
    if torch._C._has_mps:  # a macOS build: MPS has its own
        yield
        return
    libraries = [Path(torch.__file__).parent / "lib" / name for name in ("libc10.so", "libc10.dylib")]
    c10 = ctypes.CDLL(str(next(path for path in libraries if path.exists())))
    mps, meta = int(torch._C._autograd.DeviceType.MPS), int(torch._C._autograd.DeviceType.Meta)
    # c10::impl::device_guard_impl_registry, one (atomic) pointer per device type, Itanium-mangled
    registry = (ctypes.c_void_p * (meta + 1)).in_dll(c10, "_ZN3c104impl26device_guard_impl_registryE")
    registry[mps] = registry[meta]
    try:
        yield
    finally:
        registry[mps] = None


_to = torch.Tensor.to


def _mps_to(self, *args, **kwargs):
    """Tensor.to, with "mps" given its index: `to` fills a missing one in from the device guard's
    current device, and the guard lent to MPS (`_mps_device_guard`) answers "meta"."""
    device, *_ = torch._C._nn._parse_to(*args, **kwargs)
    if device is not None and device.type == "mps" and device.index is None:
        if "device" in kwargs:
            kwargs["device"] = torch.device("mps", 0)
        else:
            args = tuple(
                torch.device("mps", 0) if isinstance(a, (str, torch.device)) and _on_mps(a) else a for a in args
            )
    return _to(self, *args, **kwargs)


_adam_get_value = adam._get_value


def _adam_step_count(value):
    """The step counter single-tensor AdamW reads on the host: 1 for a fake one (0 would divide by zero)."""
    return 1.0 if isinstance(value, torch.Tensor) and is_fake(value) else _adam_get_value(value)


_multinomial = torch.multinomial


def _checked_multinomial(input, num_samples, replacement=False, *, generator=None, **kwargs):
    """torch.multinomial refusing a generator of another device (checked here: the dispatcher hands a
    mode a new Python object for the generator, without what FakeGenerator remembers)."""
    if generator is not None and _device_of(generator) != input.device:
        raise GeneratorDeviceMismatch(f"a generator for {_device_of(generator)} drawing for a tensor on {input.device}")
    return _multinomial(input, num_samples, replacement, generator=generator, **kwargs)


_sdpa = torch.nn.functional.scaled_dot_product_attention


def _sdpa_math_on_mps(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """F.scaled_dot_product_attention with MPS inputs: the math kernel (what MPS trains with), after
    what MPS autocast does to it (on its lower-precision list); other inputs as PyTorch does."""
    if query.device.type != "mps":
        return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, **kwargs)
    if torch.is_autocast_enabled("mps"):
        low = torch.get_autocast_dtype("mps")
        query, key, value, attn_mask = (
            t.to(low) if t is not None and t.is_floating_point() else t for t in (query, key, value, attn_mask)
        )
    return torch.ops.aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, None, scale=scale, **kwargs
    )[0]


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


# What get_rng_state returns: CUDA's Philox seed and offset; MPS's 7 Philox words, seed and offset.
RNG_STATE_BYTES = {"cuda": 16, "mps": 44}


def _rng_state(device: str):
    def get_rng_state(*args, **kwargs) -> torch.Tensor:
        with unset_fake_temporarily():
            return torch.zeros(RNG_STATE_BYTES[device], dtype=torch.uint8)

    def set_rng_state(state: torch.Tensor, *args, **kwargs) -> None:
        if state.device.type != "cpu" or state.dtype != torch.uint8:  # what both backends refuse
            raise TypeError(f"RNG state must be a torch.ByteTensor on the CPU, got {state.dtype} on {state.device}")
        if device == "mps" and state.numel() != RNG_STATE_BYTES["mps"]:
            raise RuntimeError(f"RNG state is wrong size: {state.numel()} bytes, MPS's is {RNG_STATE_BYTES['mps']}")

    return get_rng_state, set_rng_state


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
    """Tensor.numpy as on a GPU machine: a GPU tensor refuses (copy it to the CPU first), a real CPU
    tensor (a checkpoint's, a loader's) converts; a fake one has no numbers to give."""
    if self.device.type in ("cuda", "mps"):
        raise TypeError(f"can't convert {self.device} device type tensor to numpy: use Tensor.cpu() first")
    if is_fake(self):
        raise TypeError("a fake tensor has no numbers for numpy (tests/fake_cuda.py)")
    with unset_fake_temporarily():
        return _numpy(self, *args, **kwargs)


def is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


def _cuda_patches(calls: HostCalls) -> list:
    get_rng_state, set_rng_state = _rng_state("cuda")

    def synchronize(*args, **kwargs) -> None:
        calls.synchronized += 1

    return [
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.device_count", return_value=1),
        mock.patch("torch.cuda.is_bf16_supported", return_value=True),
        mock.patch("torch.cuda.get_device_name", return_value=DEVICE_NAME),
        mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)),
        mock.patch("torch.cuda.synchronize", synchronize),
        mock.patch("torch.cuda.mem_get_info", return_value=(80 * 2**30, 80 * 2**30)),
        mock.patch("torch.cuda.get_rng_state", get_rng_state),
        mock.patch("torch.cuda.set_rng_state", set_rng_state),
        mock.patch("torch.cuda.Event", Event),
        mock.patch("torch.cuda.reset_peak_memory_stats"),
        mock.patch("torch.cuda.max_memory_allocated", return_value=0),
        mock.patch("torch.cuda.empty_cache"),
    ]


def _mps_patches(calls: HostCalls) -> list:
    get_rng_state, set_rng_state = _rng_state("mps")

    def synchronize() -> None:
        calls.synchronized += 1

    return [
        # A Mac has no CUDA: said explicitly, so that a GPU host running the tests answers as a Mac.
        mock.patch("torch.cuda.is_available", return_value=False),
        mock.patch("torch.cuda.device_count", return_value=0),
        mock.patch("torch.backends.mps.is_available", return_value=True),
        mock.patch("torch.backends.mps.is_built", return_value=True),
        mock.patch("torch.backends.mps.is_macos_or_newer", return_value=True),  # macOS 14+: Metal has bf16
        mock.patch("torch.mps.device_count", return_value=1),
        mock.patch("torch.mps.synchronize", synchronize),
        mock.patch("torch.mps.get_rng_state", get_rng_state),
        mock.patch("torch.mps.set_rng_state", set_rng_state),
        mock.patch("torch.mps.recommended_max_memory", return_value=MPS_RECOMMENDED_MAX_MEMORY),
        mock.patch("torch.mps.current_allocated_memory", return_value=0),
        mock.patch("torch.mps.driver_allocated_memory", return_value=0),
        mock.patch("torch.mps.empty_cache"),
    ]


@contextlib.contextmanager
def fake_device(device: str, tensors: bool = True):
    """Run the block as if one GPU of kind `device` ("cuda" or "mps") were present (see the module
    docstring); yields its HostCalls. tensors=False: the host's answers only, over real tensors (a
    machine that has the GPU, for code that must not use it: on this torch a real MPS tensor fails,
    "not linked with support for mps devices")."""
    if device not in ("cuda", "mps"):
        raise ValueError(f"fake_device({device!r}): the kit fakes 'cuda' or 'mps'")
    calls = HostCalls(device)
    # Imported before the patches: its import-time tables read the real torch.backends.mps.is_available
    # (FakeTensorMode imports it; so may the code under test).
    import torch._dynamo  # noqa: F401

    def pin_memory(self, *args, **kwargs):
        calls.pinned += 1
        return self

    patches = (_cuda_patches if device == "cuda" else _mps_patches)(calls)
    if tensors:
        patches += [
            mock.patch("torch.save", _save_real),
            mock.patch("torch.load", _load_real),
            mock.patch("torch.profiler.profile", _cpu_profile),
            mock.patch("torch.Generator", FakeGenerator),
            mock.patch("torch.multinomial", _checked_multinomial),
            mock.patch("torch.optim.adam._get_value", _adam_step_count),
            mock.patch.object(torch.Tensor, "pin_memory", pin_memory),
            mock.patch.object(torch.Tensor, "numpy", _checked_numpy),
            mock.patch.object(torch.Tensor, "backward", _backward_stand_in),
            # CUDA-graph capture check of every optimizer step: asks the driver for the current stream.
            mock.patch("torch.optim.Optimizer._accelerator_graph_capture_health_check"),
            # FakeTensorMode itself asks is_available() whether it may touch the device (it may not).
            mock.patch.object(FakeTensorMode, "avoid_device_init", new_callable=mock.PropertyMock, return_value=True),
        ]
    if tensors and device == "mps":
        patches += [
            mock.patch("torch.nn.functional.scaled_dot_product_attention", _sdpa_math_on_mps),
            mock.patch.object(torch.Tensor, "to", _mps_to),
        ]
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        if tensors:
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            stack.enter_context(HostReads())
        if tensors and device == "mps":
            stack.enter_context(_mps_device_guard())
            stack.enter_context(NoFloat64OnMps())
        try:
            yield calls
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def fake_cuda():
    """Run the block as if one CUDA GPU were present (see the module docstring)."""
    return fake_device("cuda")


def fake_mps():
    """Run the block as if on a Mac with Apple silicon, MPS and no CUDA (see the module docstring)."""
    return fake_device("mps")
