"""The scalar options of each op, written once: one frozen dataclass per op, and named results.

Below the public functions every layer passes an op's options the same way: after the op's
tensors, the fields of its block in declaration order (a nested block's fields in its place), as
plain float / int / bool arguments. That is the calling convention of the custom ops
`torch.ops.g3dr.*` (whose schemas are generated here with `schema()`), of the C++ ops
`torch.ops.g3dr_C.*` and of the Triton launchers in `g3dr_kernels/triton/`. Only `flat()` and
`split()` know the order. The C++ extension declares the same blocks (csrc/include/g3dr/params.h);
`torch.ops.g3dr_C.params_fields(op)` reports its order and tests/test_params.py compares the two.

Each block validates itself on construction, so a launcher that rebuilds it from the flat values
checks them in one place.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, List, NamedTuple, Sequence, Tuple, Type, TypeVar

from torch import Tensor

from ._types import PLANE_COORDS, DepthKernel

_SCHEMA_TYPES = {float: "float", int: "int", bool: "bool"}
BlockT = TypeVar("BlockT", bound="Block")


def _layout(cls: type) -> Tuple[Tuple[str, type], ...]:
    """(name, type) of each field of dataclass `cls`: float, int, bool or a nested dataclass."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if not (dataclasses.is_dataclass(t) or t in _SCHEMA_TYPES):
            raise TypeError(f"{cls.__name__}.{f.name}: an option block holds float, int, bool or blocks, not {t}")
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))


def _leaves(cls: type) -> Tuple[Tuple[Tuple[str, ...], type], ...]:
    """(attribute path, type) of every scalar field, nested dataclasses expanded in place."""
    out: List[Tuple[Tuple[str, ...], type]] = []
    for name, t in _layout(cls):
        out += [((name, *path), tt) for path, tt in _leaves(t)] if dataclasses.is_dataclass(t) else [((name,), t)]
    return tuple(out)


def _build(cls: type, values: typing.Iterator[Any]) -> Any:
    return cls(**{name: (_build(t, values) if dataclasses.is_dataclass(t) else next(values))
                  for name, t in _layout(cls)})


class Block:
    """What the option blocks share: their flat form, its length, names and schema text."""

    # (attribute path, type) of each flat field, set below at import: torch.compile traces flat() but
    # cannot trace typing.get_type_hints.
    _fields: Tuple[Tuple[Tuple[str, ...], type], ...] = ()

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        """The flat fields' names, in order (what the C++ side must report too)."""
        return tuple(path[-1] for path, _ in cls._fields)

    @classmethod
    def size(cls) -> int:
        return len(cls._fields)

    @classmethod
    def schema(cls) -> str:
        """The flat fields as torch op schema arguments, e.g. "float scale, int plane_axes"."""
        return ", ".join(f"{_SCHEMA_TYPES[t]} {path[-1]}" for path, t in cls._fields)

    def flat(self) -> Tuple[Any, ...]:
        """The field values in order, each converted to its declared type (float(1) is 1.0)."""
        out = []
        for path, t in self._fields:
            v = self
            for name in path:
                v = getattr(v, name)
            out.append(t(v))
        return tuple(out)

    @classmethod
    def split(cls: Type[BlockT], args: Sequence[Any]) -> Tuple[BlockT, Tuple[Any, ...]]:
        """(the block made from the first size() values of args, the values after them)."""
        n = cls.size()
        if len(args) < n:
            raise TypeError(f"{cls.__name__} needs {n} values ({', '.join(cls.field_names())}), got {len(args)}")
        return _build(cls, iter(args[:n])), tuple(args[n:])


@dataclass(frozen=True)
class SampleParams(Block):
    """Options of `sample` (and the sampling half of `render`)."""

    scale: float  # 2 / box_warp: world coordinates -> the planes' [-1, 1]
    plane_axes: int  # the _types.PLANE_AXES code of the plane convention

    def __post_init__(self):
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale (2 / box_warp) must be finite and > 0, got {self.scale!r}")
        if self.plane_axes not in PLANE_COORDS:
            raise ValueError(f"plane_axes must be 0 (eg3d) or 1 (xyz), got {self.plane_axes!r}")


@dataclass(frozen=True)
class CompositeParams(Block):
    """Options of `composite` (and the compositing half of `render`). DepthKernel validates itself."""

    kernel: DepthKernel  # s1, s2, c_min, c_max: scales the density and colour gradients near the target
    density_bias: float  # added to the mid density before softplus
    eps: float  # depth = sum w t / (opacity + eps)
    white_bg: bool  # rgb += 1 - opacity


@dataclass(frozen=True)
class RenderParams(Block):
    """Options of the fused `render`: those of its sampling, then those of its compositing."""

    sample: SampleParams
    composite: CompositeParams


for _cls in (SampleParams, CompositeParams, RenderParams):
    _cls._fields = _leaves(_cls)


class CompositeGrads(NamedTuple):
    """Gradients of `composite`'s backward: sigma [B,R,S], rgb [B,R,S,D]."""

    sigma: Tensor
    rgb: Tensor


class SampleGrads(NamedTuple):
    """Gradients of `sample`'s backward: one per level (its shape), and xyz [B,N,3] (or empty)."""

    levels: List[Tensor]
    xyz: Tensor

    @classmethod
    def from_flat(cls, grads: Sequence[Tensor]) -> "SampleGrads":
        return cls(list(grads[:-1]), grads[-1])


class RenderGrads(NamedTuple):
    """Gradients of `render`'s backward: one per level, then the decoder's."""

    levels: List[Tensor]
    w1: Tensor
    b1: Tensor
    w2: Tensor
    b2: Tensor

    @classmethod
    def from_flat(cls, grads: Sequence[Tensor]) -> "RenderGrads":
        return cls(list(grads[:-4]), *grads[-4:])
