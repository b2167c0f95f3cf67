"""The digit judge: a small CNN, trained by tools/train_demo.py on real MNIST digits, run here with numpy only.

It answers "which digit is this?" for the demo model's 32x32 images, so the quality benchmark and the tests
can score prompt accuracy without torch. Architecture (weights in ``judge.npz`` next to this file)::

    32x32 grey in [0, 1]
    conv 5x5 1->16, pad 2, ReLU, max-pool 2     -> 16x16
    conv 5x5 16->32, pad 2, ReLU, max-pool 2    -> 8x8
    conv 3x3 32->64, pad 1, ReLU, max-pool 2    -> 4x4
    flatten (C, H, W) -> dense 1024->128, ReLU -> dense 128->10 -> softmax

Inputs are preprocessed exactly like its training data: RGB averaged to grey, values in [0, 1], digit white on
black, 32x32 (MNIST's 28x28 padded by 2 pixels on each side).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

JUDGE_WEIGHTS = Path(__file__).resolve().parent / "judge.npz"
IMAGE_SIZE = 32

#: (weight name, padding) of the conv layers, in order; each is followed by ReLU and a 2x2 max-pool
CONV_LAYERS = (("conv1", 2), ("conv2", 2), ("conv3", 1))
DENSE_LAYERS = ("fc1", "fc2")


def _conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray, pad: int) -> np.ndarray:
    """(N, C, H, W) * (O, C, k, k) -> (N, O, H', W'), stride 1, cross-correlation like torch."""
    k = w.shape[-1]
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = sliding_window_view(x, (k, k), axis=(2, 3))  # N, C, H', W', k, k
    out = np.tensordot(windows, w, axes=([1, 4, 5], [1, 2, 3]))  # N, H', W', O
    return out.transpose(0, 3, 1, 2) + b[None, :, None, None]


def _maxpool2(x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def preprocess(images: np.ndarray) -> np.ndarray:
    """Float images ``(B, 32, 32, 3)`` (the runtime's output) or ``(B, 32, 32)`` in [0, 1] -> ``(B, 1, 32, 32)``."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 4:
        x = x.mean(axis=-1)
    if x.ndim != 3 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"the judge takes 32x32 images as (B, 32, 32[, 3]); got shape {np.shape(images)}")
    return np.clip(x, 0.0, 1.0)[:, None]


class Judge:
    """``Judge().predict(images)`` -> the digit each image shows (int64 ``(B,)``)."""

    def __init__(self, path: str | Path = JUDGE_WEIGHTS):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"judge weights {path} are missing; they are written by tools/train_demo.py")
        with np.load(path) as z:
            self.params = {k: z[k].astype(np.float32) for k in z.files}
        self.heldout_accuracy = round(float(self.params.pop("heldout_accuracy", np.nan)), 4)

    def logits(self, images: np.ndarray) -> np.ndarray:
        x = preprocess(images)
        p = self.params
        for name, pad in CONV_LAYERS:
            x = _maxpool2(np.maximum(_conv2d(x, p[f"{name}.weight"], p[f"{name}.bias"], pad), 0.0))
        x = x.reshape(x.shape[0], -1)
        x = np.maximum(x @ p["fc1.weight"].T + p["fc1.bias"], 0.0)
        return x @ p["fc2.weight"].T + p["fc2.bias"]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        z = self.logits(images)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.logits(images).argmax(axis=1)


def load_judge(path: str | Path = JUDGE_WEIGHTS) -> Judge:
    return Judge(path)
