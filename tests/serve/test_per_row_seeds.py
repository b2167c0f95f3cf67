"""``pipe(prompts, seed=[...], guidance=[...])``: each row drawn from its own seed and guided by its own scale,
the same image as calling that row alone -- what lets a server batch requests without changing their answers.
Checked for every sampler the demo can run (LCM included: it injects noise on every step)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from diffc.errors import InputError
from diffc.runtime.sampler import SamplerTables

pytest.importorskip("diffusers", reason="compiling the samplers' tables needs the export extra")


@pytest.fixture(scope="module")
def pipe(demo_cpu_artifact):
    import diffc

    return diffc.load(demo_cpu_artifact, progress=False)


def _with_sampler(pipe, kind: str):
    from diffc.exporter.sampler import compile_sampler

    other = copy.copy(pipe)  # shares the sessions; only the tables differ
    tables = compile_sampler(kind, pipe.manifest["build"]["scheduler_config"], pipe.tables.num_steps)
    other.tables = tables if isinstance(tables, SamplerTables) else SamplerTables.from_dict(tables)
    return other


@pytest.mark.parametrize("kind", ["ddim", "euler", "dpmpp_2m", "lcm"])
def test_each_row_is_the_image_of_its_own_call(pipe, kind):
    p = _with_sampler(pipe, kind)
    if kind == "lcm":
        assert any(v != 0.0 for v in p.tables.next_from_noise), "LCM should inject noise (the case under test)"
    prompts, seeds, guidance = ["digit 1", "digit 2", "digit 3"], [11, 2**64 - 1, 11], [7.5, 1.0, 3.0]
    batched = p(prompts, seed=seeds, guidance=guidance)
    for k in range(3):
        alone = p(prompts[k], seed=seeds[k], guidance=guidance[k])[0]
        np.testing.assert_allclose(batched[k], alone, atol=2e-6, err_msg=f"{kind} row {k}")
    assert not np.allclose(batched[0], batched[2])  # same seed, other guidance: another image


def test_one_seed_for_all_rows_still_means_one_draw(pipe):
    """A single seed keeps its meaning: one draw for the whole batch (not the rows' own calls)."""
    a = pipe(["digit 1", "digit 1"], seed=5)
    b = pipe(["digit 1", "digit 1"], seed=[5, 5])
    np.testing.assert_array_equal(b[0], b[1])
    assert not np.allclose(a[0], a[1])


def test_per_row_values_are_checked(pipe):
    with pytest.raises(InputError, match="2 seeds for 3 prompts"):
        pipe(["a", "b", "c"], seed=[1, 2])
    with pytest.raises(InputError, match=r"seed\[1\] must be an integer"):
        pipe(["a", "b"], seed=[1, -1])
    with pytest.raises(InputError, match=r"guidance\[0\] must be a finite number"):
        pipe(["a", "b"], guidance=[float("nan"), 2.0])
    with pytest.raises(InputError, match="1 guidance scales for 2 prompts"):
        pipe(["a", "b"], guidance=[2.0])
