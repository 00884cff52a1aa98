"""Activations from real models: the old home of the model hooks and the data pipeline, kept so
that ``from gsae_fast.activations import ...`` keeps working. The code is in
:mod:`gsae_fast.hooks` (loading models, naming layers, reading and replacing their outputs, the
LM loss) and :mod:`gsae_fast.data` (text reading, :class:`ModelActivations`,
:class:`MixingBuffer`, the on-disk cache).
"""
from .data.cache import (
                         CACHE_DTYPES,
                         CACHE_FORMAT,
                         CACHE_FORMAT_VERSION,
                         META_FILE,
                         ActivationCache,
                         CacheBatches,
                         ProgressFn,
                         write_cache,
)
from .data.mixing import MixingBuffer
from .data.stream import ModelActivations
from .data.text import TEXT_SUFFIXES, PathLike, read_texts
from .hooks import (
                         ALIASES,
                         BLOCK_LAYOUTS,
                         ByteTokenizer,
                         ce_loss,
                         layer_output,
                         load_model,
                         replace_output,
                         resolve_hook,
)

# The old name of hooks.replace_output; gsae_fast.interp.splice is the unrelated SAE splice.
splice = replace_output

__all__ = ["read_texts", "TEXT_SUFFIXES", "PathLike", "ByteTokenizer", "load_model",
           "BLOCK_LAYOUTS", "ALIASES", "resolve_hook", "layer_output", "splice", "replace_output",
           "ce_loss", "ModelActivations", "MixingBuffer", "write_cache", "ActivationCache",
           "CacheBatches", "ProgressFn", "META_FILE", "CACHE_FORMAT", "CACHE_FORMAT_VERSION",
           "CACHE_DTYPES"]
