"""Linear-attention token mixers for the hybrid zoo (spec `linear_attention.md`).

- `ops`: pure JAX chunked and token-by-token ops for gated linear attention with scalar or vector decay (RetNet,
  GLA, HGRN-2) and the HGRN vector recurrence; `delta`: the (gated) delta rule (DeltaNet, Gated DeltaNet). Each
  chunked op equals its recurrence, takes an initial state and returns the final one.
- `conv`: the short causal depthwise convolution with its decode cache.
- `layers` / `delta_layers`: the six mixers (projections, gates, norms, inits of the reference layers), each with a
  training call, `init_cache` and a decode `step`; `LowerBound`, HGRN's model-level forget-gate floor.
"""

from scalezoo.models.linear.delta import chunk_delta_rule, recurrent_delta_rule
from scalezoo.models.linear.delta_layers import DeltaNetMixer, GatedDeltaNetMixer
from scalezoo.models.linear.layers import (LINEAR_MIXERS, GLAMixer, HGRN2Mixer, HGRNMixer, LowerBound, RetNetMixer,
                                           make_linear_mixer, mixer_dims)
from scalezoo.models.linear.ops import chunk_gla, hgrn_scan, recurrent_gla, recurrent_hgrn

__all__ = ["chunk_delta_rule", "recurrent_delta_rule", "chunk_gla", "recurrent_gla", "hgrn_scan", "recurrent_hgrn",
           "LINEAR_MIXERS", "RetNetMixer", "GLAMixer", "HGRNMixer", "HGRN2Mixer", "DeltaNetMixer",
           "GatedDeltaNetMixer", "LowerBound", "make_linear_mixer", "mixer_dims"]
