"""Backends: each module builds engines for its target and opens them as sessions with the same ``run``."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

from diffc.errors import InputError, ProfileError


def check_feeds(input_names: Sequence[str], feeds: Mapping[str, object]) -> None:
    """Raise :class:`InputError` naming the inputs a session's ``run`` was not given."""
    missing = [n for n in input_names if n not in feeds]
    if missing:
        raise InputError(f"missing inputs {missing} for this engine (it takes {list(input_names)})")


@dataclasses.dataclass(frozen=True)
class InputProfile:
    """min / opt / max shape of one input: plain data until :func:`_add_profile` hands it to TensorRT."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def input_profiles(inputs: Iterable[Mapping[str, Any]], shape_ranges: Mapping[str, Any], *,
                   static: bool = False) -> dict[str, InputProfile]:
    """Per-axis ranges (``{"batch": [1, 2, 8], "height": [32, 64, 128], ...}``) -> per-input min/opt/max shapes.

    The graph's symbolic dim names (``batch``, ``sequence``, ``height``, ``width`` ...) say which range applies
    to which axis; static dims stay as they are. ``static=True`` collapses every range to its opt value (one
    shape, as a Jetson profile wants). A ``shape_ranges`` key that names an input (``{"sample": {"min": [...],
    "opt": [...], "max": [...]}}``) sets that input's shapes directly.
    """
    out: dict[str, InputProfile] = {}
    for spec in inputs:
        name, dims = spec["name"], list(spec["shape"])
        direct = shape_ranges.get(name)
        if isinstance(direct, Mapping):
            shapes = [tuple(int(v) for v in direct[k]) for k in ("min", "opt", "max")]
            if any(len(s) != len(dims) for s in shapes):
                raise ProfileError(f"shape range for input {name!r} has rank {len(shapes[0])}, the graph's input has "
                                   f"rank {len(dims)}")
        else:
            shapes = [[], [], []]
            for axis, d in enumerate(dims):
                if isinstance(d, int) and d > 0:
                    rng = [d, d, d]
                else:
                    rng = shape_ranges.get(d) if isinstance(d, str) else None
                    if rng is None:
                        known = ", ".join(sorted(k for k, v in shape_ranges.items() if not isinstance(v, Mapping)))
                        raise ProfileError(f"input {name!r} axis {axis} is dynamic ({d!r}) but the shape ranges give "
                                           f"no range for it (they cover: {known or 'nothing'})")
                    if not (len(rng) == 3 and all(isinstance(v, int) and v >= 1 for v in rng)
                            and rng[0] <= rng[1] <= rng[2]):
                        raise ProfileError(f"shape range for axis {d!r} must be [min, opt, max] with "
                                           f"1 <= min <= opt <= max, got {rng!r}")
                for i in range(3):
                    shapes[i].append(int(rng[i]))
            shapes = [tuple(s) for s in shapes]
        if static:
            shapes = [shapes[1]] * 3
        if not all(a <= b <= c for a, b, c in zip(*shapes)):
            raise ProfileError(f"shape range for input {name!r} is not ordered min <= opt <= max: {shapes}")
        out[name] = InputProfile(*shapes)
    return out
