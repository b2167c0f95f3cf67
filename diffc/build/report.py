"""The build's JSON files (``build_report.json``, ``export_report.json``) and the report's table for people.

JSON is written strictly: Python's ``json`` writes a bare ``NaN`` / ``Infinity`` by default, which is not JSON
and which other readers refuse. A NaN in a report is a bug upstream and fails the write naming where it is;
an infinite value (the PSNR of two identical images) is written as the string ``"inf"`` / ``"-inf"``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from diffc.errors import DiffcError


def non_finite_at(value: Any, where: str = "") -> str | None:
    """The path (``components.unet.parity.max_abs_err``) of the first NaN or infinity in ``value``, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "the top level"
    if isinstance(value, dict):
        items = ((f"{where}.{k}" if where else str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for path, v in items:
        found = non_finite_at(v, path)
        if found is not None:
            return found
    return None


def _infinities_as_strings(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _infinities_as_strings(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_infinities_as_strings(v) for v in value]
    return value


def write_json(path: Path, data: Any, *, infinities: bool = False) -> Path:
    """Write ``data`` as strict JSON (``allow_nan=False``). ``infinities``: write infinite floats as the strings
    ``"inf"`` / ``"-inf"`` (reports); otherwise any non-finite number raises :class:`DiffcError` naming it."""
    if infinities:
        data = _infinities_as_strings(data)
    bad = non_finite_at(data)
    if bad is not None:
        raise DiffcError(f"{path.name}: {bad} is not a finite number; diffc does not write NaN into JSON. This is "
                         "a bug in diffc (or a non-finite value in the profile): please report it")
    path.write_text(json.dumps(data, indent=2, allow_nan=False))
    return path


def format_build_report(report: dict[str, Any]) -> str:
    """The build report as a table: per component, the passes in order with what fired, and the op counts."""
    lines = [f"profile {report['profile']}: " + " -> ".join(p["name"] for p in report.get("pass_order", []))]
    for name, comp in report["components"].items():
        rep = comp.get("passes")
        if not rep:
            continue
        before, after = rep["op_counts_before"], rep["op_counts_after"]
        lines.append(f"{name}: {sum(before.values())} -> {sum(after.values())} nodes")
        for p in rep["passes"]:
            fired = ", ".join(f"{k}={v}" for k, v in p["fired"].items() if v) or "-"
            lines.append(f"  {p['name']:16s} {p['seconds']:7.3f}s  {fired}")
        ops = sorted(set(before) | set(after), key=lambda o: -max(before.get(o, 0), after.get(o, 0)))
        changed = [f"{o} {before.get(o, 0)}->{after.get(o, 0)}" for o in ops if before.get(o, 0) != after.get(o, 0)]
        if changed:
            lines.append("  ops: " + ", ".join(changed))
        split = comp.get("cache_split")
        if split:
            lines.append(f"  cache_reuse branch {split['branch']}: full {split['nodes']['full']} nodes, shallow "
                         f"{split['nodes']['shallow']} ({100 * split['shallow_fraction']:.0f} %), shallow vs full "
                         f"max_abs_err {split['shallow_check']['max_abs_err']:.3g}")
    return "\n".join(lines)
