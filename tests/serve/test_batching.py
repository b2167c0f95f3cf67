"""The Triton model's batching, without Triton: requests -> checked rows -> pipeline calls -> one answer each.

These run everywhere (no server binary needed); tests/serve/test_triton_serve.py runs the same code inside a
real server."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from diffc.errors import InputError
from diffc.runtime.pipeline import to_uint8
from diffc.serve.batching import execute, parse_request


@pytest.fixture(scope="module")
def pipe(demo_cpu_artifact):
    import diffc

    return diffc.load(demo_cpu_artifact, progress=False)


def _req(prompts, **cols):
    out = {"prompt": np.array([[p.encode()] for p in prompts], dtype=object)}
    dtypes = {"seed": np.int64, "guidance": np.float32, "height": np.int32, "width": np.int32}
    for name, values in cols.items():
        out[name] = np.array([[v.encode()] for v in values], dtype=object) if name == "negative_prompt" else \
            np.array([[v] for v in values], dtype=dtypes[name])
    return out


def test_rows_of_many_requests_each_get_their_own_image(pipe):
    requests = [_req(["digit 1"], seed=[5], guidance=[7.5]),
                _req(["digit 2", "digit 3"], seed=[6, 7], guidance=[2.0, 7.5]),
                _req(["digit 4"], seed=[8], guidance=[1.0], height=[24], width=[40]),
                _req(["digit 5"], seed=[9], negative_prompt=["blurry"])]
    results = execute(pipe, requests)
    assert [len(r) for r in results] == [1, 2, 1, 1]
    expected = [[("digit 1", 5, 7.5, {})], [("digit 2", 6, 2.0, {}), ("digit 3", 7, 7.5, {})],
                [("digit 4", 8, 1.0, {"height": 24, "width": 40})],
                [("digit 5", 9, None, {"negative_prompt": "blurry"})]]
    for images, rows in zip(results, expected, strict=True):
        for img, (prompt, seed, g, kw) in zip(images, rows, strict=True):
            ref = to_uint8(pipe(prompt, seed=seed, guidance=g, **kw))[0]
            assert img.shape == ref.shape
            assert np.abs(img.astype(int) - ref.astype(int)).max() <= 1, (prompt, seed, g)


@pytest.mark.parametrize(("cols", "message"), [
    ({"prompt": [" "]}, "prompt is empty"),
    ({"height": [36]}, "height 36 is not a multiple of 8"),
    ({"width": [8]}, r"width 8 is outside this artifact's range \[16, 64\]"),
    ({"guidance": [math.nan]}, "guidance must be a finite number"),
    ({"guidance": [math.inf]}, "guidance must be a finite number"),
    ({"guidance": [-1.0]}, "guidance must be a finite number"),
    ({"seed": [-3]}, "seed must be an integer from 0"),
    ({"prompt": ["digit"] * 5}, r"5 rows is outside this artifact's batch range \[1, 4\]"),
])
def test_a_bad_request_gets_diffcs_message_and_the_others_their_images(pipe, cols, message):
    prompts = cols.pop("prompt", ["digit 1"])
    bad = _req(prompts, **cols)
    good = _req(["digit 6"], seed=[4])
    results = execute(pipe, [good, bad, good])
    assert isinstance(results[1], InputError)
    assert re.search(message, str(results[1])), str(results[1])
    ref = to_uint8(pipe("digit 6", seed=4))[0]
    for k in (0, 2):
        assert np.abs(results[k][0].astype(int) - ref.astype(int)).max() <= 1


def test_missing_optional_inputs_take_the_artifacts_defaults(pipe):
    rows = parse_request(pipe, _req(["digit 9"]))
    assert rows[0].seed == 0 and rows[0].guidance is None and (rows[0].height, rows[0].width) == pipe.default_size
    with pytest.raises(InputError, match="no 'prompt' input"):
        parse_request(pipe, {"seed": np.array([[1]], np.int64)})
    with pytest.raises(InputError, match="not UTF-8"):
        parse_request(pipe, {"prompt": np.array([[b"\xff\xfe"]], dtype=object)})
    with pytest.raises(InputError, match="one value per row"):
        parse_request(pipe, {**_req(["a", "b"]), "seed": np.array([[1]], np.int64)})
