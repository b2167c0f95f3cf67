"""Cache schedules (per-step full/shallow masks) and the UNet branch geometry, as pure data."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from diffc.errors import ProfileError
from diffc.exporter.unet_blocks import branch_info, unet_branches
from diffc.runtime.cache import full_steps, schedule_summary

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _sd15 import SD15_UNET  # noqa: E402


def test_sd15_branches_follow_deepcache():
    branches = unet_branches(SD15_UNET)
    # 12 skip features (conv_in + 3 x (2 layers + downsampler) + 2 layers); the last up layer is no branch
    assert [b["branch"] for b in branches] == list(range(11))
    # branch 0 = DeepCache's (block 0, layer 0): the last up block's second layer, concatenated with s_1
    assert branches[0] | {} == {"branch": 0, "feature": "cache_feature_0", "up_block": 3, "layer": 1, "skip": 1,
                                "level": 0, "channels": 320}
    assert branches[-1]["up_block"] == 0 and branches[-1]["layer"] == 0 and branches[-1]["channels"] == 1280
    assert [b["level"] for b in branches] == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_branch_out_of_range_names_the_range():
    with pytest.raises(ProfileError, match="branches 0 to 10"):
        branch_info(SD15_UNET, 11)


@pytest.mark.parametrize("steps,interval,expected", [(4, 2, "F.F."), (8, 3, "F..F..F."), (5, 1, "FFFFF"),
                                                     (3, 10, "F..")])
def test_interval(steps, interval, expected):
    assert schedule_summary(full_steps({"kind": "interval", "interval": interval}, steps)) == expected


@pytest.mark.parametrize("steps,interval", [(50, 5), (20, 2), (20, 3), (250, 10), (8, 2)])
def test_nonuniform_keeps_the_full_step_count_and_clusters_at_the_center(steps, interval):
    mask = full_steps({"kind": "nonuniform", "interval": interval}, steps)
    assert mask[0] and sum(mask) == math.ceil(steps / interval)
    full = [i for i, m in enumerate(mask) if m]
    gaps = [b - a for a, b in zip(full, full[1:])]
    center = steps // 2
    near = min(range(len(gaps)), key=lambda k: abs(full[k] - center))
    assert gaps[near] <= min(gaps[0], gaps[-1])  # denser around the center than at the ends


def test_mask_schedule():
    assert full_steps({"kind": "mask", "mask": [1, 0, 0, 1]}, 4) == [True, False, False, True]
    with pytest.raises(ProfileError, match="4 steps"):
        full_steps({"kind": "mask", "mask": [1, 0]}, 4)
    with pytest.raises(ProfileError, match="start with 1"):
        full_steps({"kind": "mask", "mask": [0, 1]}, 2)
