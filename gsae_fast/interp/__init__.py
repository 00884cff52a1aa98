"""Circuit analysis with SAEs spliced into a ``transformers`` model (Sparse Feature Circuits,
Marks et al. 2024): splicing with an error node, node effects by attribution patching (AtP),
integrated gradients (IG) and exact activation patching, feature ablation and steering.

The graph
---------
Splicing an SAE into layer ``L`` (a block, attention or MLP output, named as
:func:`gsae_fast.hooks.resolve_hook` names it: ``"resid:3"``, ``"mlp:0"``,
``"transformer.h.2"``, ...) replaces that layer's output ``x`` by

    out_L = decode(a_L) + err_L,      a_L = encode(x),      err_L = x - decode(a_L)

so the model computes exactly what it did (``out_L = x`` up to one rounding), but ``out_L`` is
now a function of *nodes*: the feature activations ``a_L`` (all ``d_sae`` of them, per token;
inactive ones are 0) and the error node ``err_L`` (what the SAE misses). With several layers
spliced, a downstream SAE encodes the upstream layer's spliced output. Every SAE here has an
affine decoder, ``decode(a) = sum_i a_i W_dec[i] + b_dec`` (TopK SAEs with
``rescale_acts_by_decoder_norm`` use the rows ``W_dec[i] / |W_dec[i]|``), which the estimators
below rely on.

Modules
-------
``splice`` (:func:`splice`, :class:`Splice`, :class:`LayerRecord`), ``nodes``
(:func:`node_effects` by AtP, IG and exact patching), ``jump_ig`` (jump-aware IG),
``edges`` (:func:`edge_effects`), ``interventions`` (:func:`ablate`, :func:`steer`,
:func:`mean_activations`), and ``run``, what the batched analyses share.
"""
from .edges import EdgeEffects, edge_effects
from .interventions import ABLATION_MODES, ablate, mean_activations, steer
from .nodes import IG_ALPHAS, METHODS, OTHER_ERRORS, NodeEffects, node_effects

# Last, so that ``gsae_fast.interp.splice`` is the function, not the submodule of that name.
from .splice import LayerRecord, Splice, splice

__all__ = ["splice", "Splice", "LayerRecord", "NodeEffects", "node_effects", "EdgeEffects",
           "edge_effects", "ablate", "steer", "mean_activations", "METHODS", "IG_ALPHAS",
           "OTHER_ERRORS", "ABLATION_MODES"]
