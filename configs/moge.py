"""Mixture of Grouped Experts (Pangu Pro MoE): `configs/moge.py:SIZE` (`moge:tiny`).

The experts of `configs/moe.py` in `groups` contiguous groups (one per device under expert parallelism); each
token takes top_k / groups experts in every group from one global softmax, so every device does the same work.
"""

from __future__ import annotations

from scalezoo.configs import moe


def get_config(arg: str | None = None):
  """MoGE config of size `arg` (default `tiny`)."""
  return moe.get_config(arg, family="moge")
