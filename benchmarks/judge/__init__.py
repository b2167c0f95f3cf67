"""The numpy digit judge of the demo model's quality benchmark (see judge.py)."""

from .judge import JUDGE_WEIGHTS, Judge, load_judge, preprocess

__all__ = ["JUDGE_WEIGHTS", "Judge", "load_judge", "preprocess"]
