"""ParScale over any family: `configs/parscale.py:BASE[:BASE_ARG]` (`parscale:dense:tiny`,
`parscale:hybrid:tiny,mixer=gla,streams=2`, `parscale:moe:tiny,streams=8,prefix_len=16`).

The base config is loaded as `BASE:BASE_ARG` (every model and train key of that family), then wrapped:
`model.family = "parscale"` and `model.parscale` holds base (the wrapped family), streams (P, default 4),
prefix_len (KV prefix tokens per attention layer and stream, 48 as in the paper's code), smoothing (label smoothing
of the aggregation weights, 0.01), init_std (std of the prefixes' and initial states' normal init, 0.02) and
freeze_base (train only ParScale's own parameters, for a recycled model). These may be given in the argument's comma
list; the rest of the list goes to the base config.
"""

from __future__ import annotations

import importlib

from scalezoo.configs.loader import apply_overrides

DEFAULTS = dict(streams=4, prefix_len=48, smoothing=0.01, init_std=0.02, freeze_base=False)


def get_config(arg: str | None = None):
  """The ParScale config wrapping `BASE[:BASE_ARG]` (default `dense:tiny`)."""
  base, _, base_arg = (arg or "dense:tiny").partition(":")
  if base in ("", "parscale"):
    raise ValueError(f"name the family to wrap first, like parscale:dense:tiny (got {arg!r})")
  own, rest = {}, []
  for part in filter(None, base_arg.split(",")):
    key = part.split("=", 1)[0].strip()
    if "=" in part and key in DEFAULTS:
      own[key] = part.split("=", 1)[1].strip()
    else:
      rest.append(part)
  try:
    module = importlib.import_module(f"scalezoo.configs.{base}")
  except ModuleNotFoundError:
    raise ValueError(f"unknown base config {base!r}; wrap a family config like dense, moe, moge, hybrid or "
                     f"tokenformer") from None
  c = module.get_config(",".join(rest) or None)
  c.model.parscale = dict(base=c.model.family, **DEFAULTS)
  c.model.family = "parscale"
  apply_overrides(c, {f"model.parscale.{k}": v for k, v in own.items()})
  return c
