"""What the denoising loop did, step by step: which denoiser evaluation ran, on how many batch rows, and why.

Training-free savings (DeepCache-style reuse, dynamic step caching, adaptive guidance) each change what one step
evaluates. Every call records one :class:`StepRecord` per step into a :class:`RunTrace`
(:attr:`diffc.runtime.pipeline.Pipeline.last_trace`) so a user sees what was saved and a test can replay each
documented decision rule against the values the runtime actually compared.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EVALUATIONS", "RunTrace", "StepRecord"]

#: what a step can evaluate: the whole denoiser, the DeepCache shallow graph on a cached feature, the dynamic
#: cache's head graph alone (the tail's contribution reused or extrapolated)
EVALUATIONS = ("full", "shallow", "head")


@dataclass(frozen=True)
class StepRecord:
    """One sampler step. ``rows``: denoiser batch rows evaluated (2 B under classifier-free guidance, B when only
    the conditional half ran); ``cond_only``: the step ran the conditional half alone although the call guides;
    ``metrics``: each decision rule's compared value on this step (e.g. ``{"rel_l1": 0.03}``, ``{"cosine":
    0.999}``); ``extrapolation_order``: the order of the extrapolation applied to reused values (0: reused as is
    or nothing reused)."""

    step: int
    evaluation: str
    rows: int
    cond_only: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    extrapolation_order: int = 0

    def __post_init__(self) -> None:
        if self.evaluation not in EVALUATIONS:
            raise ValueError(f"evaluation {self.evaluation!r} is not one of {EVALUATIONS}")


@dataclass
class RunTrace:
    """The steps of one call, in order, for a batch of ``images`` images."""

    images: int
    steps: list[StepRecord] = field(default_factory=list)

    def add(self, record: StepRecord) -> None:
        self.steps.append(record)

    def counts(self) -> dict[str, Any]:
        """Denoiser evaluations of the call: steps per evaluation kind, conditional-only steps, and batch rows
        evaluated in all (what the savings save)."""
        kinds = collections.Counter(r.evaluation for r in self.steps)
        return {"steps": len(self.steps), **{k: kinds.get(k, 0) for k in EVALUATIONS},
                "cond_only": sum(r.cond_only for r in self.steps), "batch_rows": sum(r.rows for r in self.steps)}

    def summary(self) -> str:
        """One line for the log, e.g. ``4 steps: 2 full, 2 shallow, 0 head; 1 cond-only; 14 batch rows``."""
        c = self.counts()
        kinds = ", ".join(f"{c[k]} {k}" for k in EVALUATIONS)
        return f"{c['steps']} steps: {kinds}; {c['cond_only']} cond-only; {c['batch_rows']} batch rows"

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "counts": self.counts(),
                "steps": [{"step": r.step, "evaluation": r.evaluation, "rows": r.rows, "cond_only": r.cond_only,
                           "metrics": dict(r.metrics), "extrapolation_order": r.extrapolation_order}
                          for r in self.steps]}
