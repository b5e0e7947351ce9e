"""A `cuda` device on a CPU-only torch, for the gpu_path tier: code runs with its tensors on
"cuda:0" and computes real values (on the CPU underneath), and an op that mixes cuda and CPU
tensors raises as it would on a GPU.

Why not torch's FakeTensorMode: it has shapes but no values, so `.item()`, `int(t.max())`,
`torch.bincount` and every data-dependent branch of a PPO update raise before the update can
reach the line that mixes devices. Here each tensor on the fake device is a wrapper
(`FakeCudaTensor`) around a CPU tensor: it reports `device == cuda:0`, every op unwraps its
arguments, checks their devices, runs on the CPU tensors and wraps what it returns.

The device rule is CUDA's: tensors of one op must all be on one device, except that a 0-dim CPU
tensor (a "CPU scalar") may stand beside cuda tensors, and `copy_`/`_to_copy` move between the
two. torch.cuda's queries answer as for one GPU (is_available, device_count, current_device, the
RNG states), so the code takes its GPU branches.
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
_MOVES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


class DeviceMixError(RuntimeError):
    """What CUDA raises: "Expected all tensors to be on the same device"."""


class FakeCudaTensor(torch.Tensor):
    """A tensor on "cuda:0" whose data is the CPU tensor `inner`."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> FakeCudaTensor:
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls,
            inner.shape,
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            layout=inner.layout,
            device=CUDA,
            requires_grad=False,  # autograd, above the dispatch, sets it on outputs
        )
        wrapper.inner = inner
        return wrapper

    def __repr__(self) -> str:
        return f"FakeCudaTensor({self.inner!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _run(func, args, kwargs):
    """Run an aten op on the CPU tensors under its arguments; wrap its outputs on cuda when
    any input was on cuda (or it was asked to make them there)."""
    seen: dict[str, str] = {}  # device type -> an example shape, for the message
    wrappers: dict[int, FakeCudaTensor] = {}  # id(inner) -> its wrapper: in-place ops return it

    def unwrap(x):
        if isinstance(x, FakeCudaTensor):
            seen["cuda"] = str(tuple(x.shape))
            wrappers[id(x.inner)] = x
            return x.inner
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.device.type == "cpu":
            seen["cpu"] = str(tuple(x.shape))
        return x

    args, kwargs = tree_map(unwrap, (args, kwargs))
    if len(seen) > 1 and func not in _MOVES:
        raise DeviceMixError(
            f"Expected all tensors to be on the same device, but found at least two devices, "
            f"cuda:0 (shape {seen['cuda']}) and cpu (shape {seen['cpu']}) in {func}"
        )
    to_cuda = _is_cuda(kwargs.get("device"))
    if to_cuda:
        kwargs = {**kwargs, "device": CPU}
    out = func(*args, **kwargs)
    if func is torch.ops.aten.copy_.default:
        return wrappers.get(id(out), out)
    to_cpu = kwargs.get("device") is not None and not to_cuda
    if not (to_cuda or ("cuda" in seen and not to_cpu)):
        return out

    def wrap(x):
        if not isinstance(x, torch.Tensor) or isinstance(x, FakeCudaTensor):
            return x
        known = wrappers.get(id(x))
        return FakeCudaTensor(x) if known is None else known

    return tree_map(wrap, out)


class _Dispatch(TorchDispatchMode):
    """Every aten op, so that factories given device="cuda" make wrappers."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


_CASTS = {
    torch.Tensor.bool: torch.bool,
    torch.Tensor.byte: torch.uint8,
    torch.Tensor.int: torch.int32,
    torch.Tensor.long: torch.int64,
    torch.Tensor.half: torch.float16,
    torch.Tensor.bfloat16: torch.bfloat16,
    torch.Tensor.float: torch.float32,
    torch.Tensor.double: torch.float64,
}


# Reading values out to Python: torch copies them to the host first
_READS = {
    torch.Tensor.tolist,
    torch.Tensor.item,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__bool__,
    torch.Tensor.__index__,
}


class _Python(TorchFunctionMode):
    """What a CPU-only torch refuses for a cuda tensor in its Python bindings, before any
    dispatch (it asks for a CUDA device guard): `Tensor.to`/`.cuda()` become the aten copy the
    binding would have called; indexing runs on the CPU tensors underneath."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return torch.ops.aten._to_copy.default(args[0], device=CUDA)
        if func is torch.Tensor.to and (_any_fake(args) or _is_cuda(_target(args, kwargs)[0])):
            return _to(args[0], *_target(args, kwargs), copy=kwargs.get("copy", False))
        if func in (torch.tensor, torch.as_tensor) and _is_cuda(kwargs.get("device")):
            made = func(*args, **{**kwargs, "device": CPU})
            return torch.ops.aten._to_copy.default(made, device=CUDA)
        if func in _CASTS and isinstance(args[0], FakeCudaTensor):
            return _to(args[0], None, _CASTS[func], copy=False)
        if func is torch.Tensor.cpu and isinstance(args[0], FakeCudaTensor):
            return _to(args[0], CPU, None, copy=False)
        if func in _READS and isinstance(args[0], FakeCudaTensor):  # a GPU syncs, then reads
            return func(args[0].inner, *args[1:], **kwargs)
        if func is torch.Tensor.numpy and isinstance(args[0], FakeCudaTensor):
            raise TypeError("can't convert cuda:0 device type tensor to numpy; use .cpu() first")
        if func is torch.Tensor.__invert__ and isinstance(args[0], FakeCudaTensor):
            return torch.ops.aten.bitwise_not.default(args[0])
        if func is torch.Tensor.copy_ and _any_fake(args):
            return torch.ops.aten.copy_.default(*args, **kwargs)
        if func is torch.Tensor.contiguous and isinstance(args[0], FakeCudaTensor):
            return torch.ops.aten.contiguous.default(*args, **kwargs)
        if func is torch.Tensor.new_tensor and isinstance(args[0], FakeCudaTensor):
            made = torch.tensor(*args[1:], **{"dtype": args[0].dtype, **kwargs, "device": CPU})
            return torch.ops.aten._to_copy.default(made, device=CUDA)
        if func is torch.Tensor.__getitem__ and _any_fake(args):
            return _GetItem.apply(args[0], _index_on_cpu(args[0], args[1]))
        if func is torch.Tensor.__setitem__ and _any_fake(args):
            return _set_item(*args)
        return func(*args, **kwargs)


def _target(args, kwargs) -> tuple:
    """(device, dtype) that `Tensor.to(*args[1:], **kwargs)` asks for (None: unchanged)."""
    rest = [a.device if isinstance(a, FakeCudaTensor) else a for a in args[1:]]
    kwargs = {k: v for k, v in kwargs.items() if k != "copy"}
    device, dtype, _, _ = torch._C._nn._parse_to(*rest, **kwargs)
    other = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None
    return device, other.dtype if other is not None else dtype


def _to(x: torch.Tensor, device, dtype, copy: bool) -> torch.Tensor:
    """`x.to(device, dtype)` as the binding would do it: itself when nothing changes."""
    device = x.device if device is None else torch.device(device)
    device = CUDA if device.type == "cuda" else device
    dtype = x.dtype if dtype is None else dtype
    if device == x.device and dtype == x.dtype and not copy:
        return x
    return torch.ops.aten._to_copy.default(x, dtype=dtype, device=device)


def _any_fake(tree) -> bool:
    found = []
    tree_map(lambda x: found.append(x) if isinstance(x, FakeCudaTensor) else None, tree)
    return bool(found)


def _inner(x):
    return x.inner if isinstance(x, FakeCudaTensor) else x


def _index_on_cpu(target: torch.Tensor, index):
    """An index of a cuda tensor with every tensor in it on the CPU; indexing a CPU tensor with
    cuda index tensors raises, as torch does."""
    if not isinstance(target, FakeCudaTensor) and _any_fake(index):
        raise DeviceMixError(
            "indices should be either on cpu or on the same device as the indexed tensor (cpu)"
        )
    return tree_map(_inner, index)


class _GetItem(torch.autograd.Function):
    """`x[index]` of a cuda tensor, differentiable: indexing and its backward run on the CPU
    tensor underneath, by autograd itself."""

    @staticmethod
    def forward(ctx, x: FakeCudaTensor, index):
        with torch.enable_grad():
            source = x.inner.detach().requires_grad_(x.requires_grad)
            out = source[index]
        ctx.saved = (source, out)
        return FakeCudaTensor(out.detach())

    @staticmethod
    def backward(ctx, grad: FakeCudaTensor):
        source, out = ctx.saved
        (grad_source,) = torch.autograd.grad(out, source, grad.inner)
        return FakeCudaTensor(grad_source), None


def _set_item(target: torch.Tensor, index, value) -> None:
    if not isinstance(target, FakeCudaTensor):
        raise DeviceMixError("a cuda value or index written into a CPU tensor")
    if target.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("fake_cuda: x[i] = v on a tensor that requires grad")
    target.inner[_index_on_cpu(target, index)] = _inner(value)


@contextmanager
def fake_cuda() -> Iterator[None]:
    """Within: one fake GPU ("cuda:0"); every tensor op checks its devices as CUDA does."""
    patches = {
        "_lazy_init": lambda: None,
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "get_rng_state_all": lambda: [torch.zeros(16, dtype=torch.uint8)],  # on the CPU, as CUDA's
        "set_rng_state_all": lambda states: None,
        "manual_seed_all": lambda seed: None,
    }
    with ExitStack() as stack:
        for name, value in patches.items():
            stack.enter_context(mock.patch.object(torch.cuda, name, value))
        # Module.to then makes new Parameters of the wrappers instead of `param.data = wrapper`,
        # which would keep the Parameter's old Python object (and no CPU tensor under it)
        overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        stack.callback(torch.__future__.set_overwrite_module_params_on_conversion, overwrite)
        stack.enter_context(_Python())
        stack.enter_context(_Dispatch())
        yield
