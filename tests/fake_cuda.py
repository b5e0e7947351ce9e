"""A `cuda` device on a CPU-only torch, for the gpu_path tier: code runs with its tensors on
"cuda:0" and computes real values (on the CPU underneath), training included, and an op that
mixes cuda and CPU tensors raises as it would on a GPU.

Why not torch's FakeTensorMode: it has shapes but no values, so `.item()`, `int(t.max())`,
`torch.bincount` and every data-dependent branch of a PPO update raise before the update can
reach the line that mixes devices; and a CPU-only torch refuses to index its cuda tensors.

How: each tensor on the fake device is a `FakeCudaTensor`, a wrapper that reports
`device == cuda:0` around a CPU tensor, `inner`. A torch-function mode sees every torch call
before autograd does: it unwraps the arguments, checks their devices, runs the call on the CPU
tensors (so autograd records the graph there, and `backward` runs there: a CPU-only torch's
autograd engine cannot run on a cuda device) and wraps what comes back. The wrapper itself is
never part of a graph; its `grad`, `requires_grad` and `data` are those of its CPU tensor.

The device rule is CUDA's: tensors of one op must all be on one device, except that a 0-dim CPU
tensor (a "CPU scalar") may stand beside cuda tensors, CPU index tensors may index a cuda tensor,
and copies move between the two. torch.cuda's queries answer as for one GPU (is_available,
device_count, current_device, the RNG states), so the code takes its GPU branches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
Tensor = torch.Tensor


class DeviceMixError(RuntimeError):
    """What CUDA raises: "Expected all tensors to be on the same device"."""


class FakeCudaTensor(Tensor):
    """A tensor on "cuda:0" whose data (and autograd graph) is the CPU tensor `inner`."""

    inner: Tensor

    @staticmethod
    def __new__(cls, inner: Tensor) -> FakeCudaTensor:
        wrapper = Tensor._make_wrapper_subclass(
            cls,
            inner.shape,
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            layout=inner.layout,
            device=CUDA,
            requires_grad=False,  # the graph is the inner tensor's
        )
        wrapper.inner = inner
        return wrapper

    def __repr__(self) -> str:
        return f"FakeCudaTensor({self.inner!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        """Ops torch's own C++ code runs on a wrapper, below the function mode (no autograd)."""
        return _call(func, args, kwargs or {})


def _is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _unwrap(x):
    return x.inner if isinstance(x, FakeCudaTensor) else x


def _wrap(x):
    return FakeCudaTensor(x) if type(x) in (Tensor, torch.nn.Parameter) else x


def _devices(tree) -> dict[str, str]:
    """Device type -> an example shape, of the tensors in `tree` (CPU scalars left out)."""
    seen: dict[str, str] = {}

    def look(x):
        if isinstance(x, FakeCudaTensor):
            seen["cuda"] = str(tuple(x.shape))
        elif isinstance(x, Tensor) and x.dim() > 0 and x.device.type == "cpu":
            seen["cpu"] = str(tuple(x.shape))

    tree_map(look, tree)
    return seen


# Copies between devices, which CUDA allows
_MOVES = {Tensor.copy_, torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default}


def _check(func, tree) -> dict[str, str]:
    seen = _devices(tree)
    if len(seen) > 1 and func not in _MOVES:
        raise DeviceMixError(
            "Expected all tensors to be on the same device, but found at least two devices, "
            f"cuda:0 (shape {seen['cuda']}) and cpu (shape {seen['cpu']}) in {func}"
        )
    return seen


def _call(func, args, kwargs):
    """Check the devices, run `func` on the CPU tensors, and put its tensors on cuda when an
    input was there (or it was asked to make them there). In-place ops return their wrapper."""
    seen = _check(func, (args, kwargs))
    to_cuda = _is_cuda(kwargs.get("device"))
    if to_cuda:
        kwargs = {**kwargs, "device": CPU}
    wrappers = {}
    tree_map(lambda x: wrappers.setdefault(id(_unwrap(x)), x), (args, kwargs))
    out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
    if not (to_cuda or "cuda" in seen):
        return out

    def wrap(x):
        known = wrappers.get(id(x))
        return known if isinstance(known, FakeCudaTensor) else _wrap(x)

    return tree_map(wrap, out)


def _to(x: Tensor, device, dtype, copy: bool = False) -> Tensor:
    """`x.to(device, dtype)`: itself when nothing changes; autograd records the copy."""
    device = x.device if device is None else torch.device(device)
    dtype = x.dtype if dtype is None else dtype
    if device.type == x.device.type and dtype == x.dtype and not copy:
        return x
    inner = _unwrap(x).to(dtype=dtype, copy=True)
    return FakeCudaTensor(inner) if device.type == "cuda" else inner


def _target(args, kwargs) -> tuple:
    """(device, dtype) that `Tensor.to(*args[1:], **kwargs)` asks for (None: unchanged)."""
    other = args[1] if len(args) > 1 and isinstance(args[1], Tensor) else None
    if other is not None:
        return other.device, other.dtype
    kwargs = {k: v for k, v in kwargs.items() if k not in ("copy", "non_blocking")}
    device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
    return device, dtype


_CASTS = {
    Tensor.bool: torch.bool,
    Tensor.byte: torch.uint8,
    Tensor.int: torch.int32,
    Tensor.long: torch.int64,
    Tensor.half: torch.float16,
    Tensor.bfloat16: torch.bfloat16,
    Tensor.float: torch.float32,
    Tensor.double: torch.float64,
}
_INDEXING = {Tensor.__getitem__, Tensor.__setitem__, Tensor.index_select, Tensor.index_put_}


def _property(func, args):
    """A Tensor property read or written on a wrapper: the device is its own, the autograd
    state (grad, requires_grad, grad_fn, is_leaf) and data are the CPU tensor's."""
    name, wrapper = func.__self__.__name__, args[0]
    inner = wrapper.inner
    if func.__name__ == "__set__":
        value = args[1]
        if name == "data":  # the wrapper's shape and dtype are fixed at its making
            new = _unwrap(value)
            if (new.shape, new.dtype) != (inner.shape, inner.dtype):
                raise NotImplementedError("fake_cuda: `t.data = x` with another shape or dtype")
            wrapper.inner = new
        else:
            setattr(inner, name, _unwrap(value))
        return None
    if name == "device":
        return CUDA
    if name == "is_cuda":
        return True
    if name == "data":
        return FakeCudaTensor(inner.data)
    value = getattr(inner, name)
    return _wrap(value) if isinstance(value, Tensor) else value


class _FakeCuda(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in ("__get__", "__set__"):
            if args and isinstance(args[0], FakeCudaTensor):
                return _property(func, args)
            return func(*args, **kwargs)
        if func is torch._has_compatible_shallow_copy_type:  # a question, not an op
            return func(*args, **kwargs)
        if func is Tensor.cuda:
            return _to(args[0], CUDA, None)
        if func is Tensor.cpu:
            return _to(args[0], CPU, None)
        if func is Tensor.to:
            return _to(args[0], *_target(args, kwargs), copy=kwargs.get("copy", False))
        if func in _CASTS:
            return _to(args[0], None, _CASTS[func])
        if func is Tensor.get_device and isinstance(args[0], FakeCudaTensor):
            return 0
        if func is Tensor.numpy and isinstance(args[0], FakeCudaTensor):
            raise TypeError("can't convert cuda:0 device type tensor to numpy; use .cpu() first")
        if func is Tensor.requires_grad_ and isinstance(args[0], FakeCudaTensor):
            args[0].inner.requires_grad_(*args[1:], **kwargs)
            return args[0]
        if func is Tensor.new_tensor and isinstance(args[0], FakeCudaTensor):
            made = torch.tensor(*args[1:], **{"dtype": args[0].dtype, **kwargs})
            return FakeCudaTensor(made)
        if func in (torch.tensor, torch.as_tensor) and _is_cuda(kwargs.get("device")):
            return FakeCudaTensor(func(*args, **{**kwargs, "device": CPU}))
        if func in _INDEXING:  # CUDA takes CPU index tensors for a cuda tensor
            target, rest = args[0], args[1:]
            if not isinstance(target, FakeCudaTensor) and _devices((rest, kwargs)).get("cuda"):
                raise DeviceMixError(f"indices or values on cuda:0 for a CPU tensor in {func}")
            if isinstance(target, FakeCudaTensor):
                out = func(target.inner, *tree_map(_unwrap, rest), **tree_map(_unwrap, kwargs))
                return target if func is Tensor.__setitem__ or out is target.inner else _wrap(out)
        return _call(func, args, kwargs)


class _Dispatch(TorchDispatchMode):
    """Factories asked for device="cuda" below the function mode (from C++) make wrappers."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _call(func, args, kwargs or {})


@contextmanager
def fake_cuda() -> Iterator[None]:
    """Within: one fake GPU ("cuda:0"); every tensor op checks its devices as CUDA does."""
    patches = {
        "_lazy_init": lambda: None,
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "get_rng_state_all": lambda: [torch.zeros(16, dtype=torch.uint8)],  # CPU, as CUDA's
        "set_rng_state_all": lambda states: None,
        "manual_seed_all": lambda seed: None,
    }
    with ExitStack() as stack:
        for name, value in patches.items():
            stack.enter_context(mock.patch.object(torch.cuda, name, value))
        # Module.to then makes new Parameters of the wrappers instead of `param.data = wrapper`
        overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        stack.callback(torch.__future__.set_overwrite_module_params_on_conversion, overwrite)
        stack.enter_context(_FakeCuda())
        stack.enter_context(_Dispatch())
        yield
