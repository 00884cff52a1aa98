"""Activations to train SAEs on: text in, shuffled activation batches out.

    texts = lambda: read_texts(["data/train.jsonl"])            # a fresh iterator per pass
    model, tok = load_model("models/gpt2", device="cuda")        # gsae_fast.hooks
    acts = ModelActivations(model, tok, texts, "resid:6", context_len=128)
    for batch in MixingBuffer(acts, buffer_tokens=2**19, batch_size=4096, seed=0):
        ...                                                       # [4096, d_model] float32

    write_cache(acts, "cache/gpt2-resid6", d_in=acts.d_in, dtype="bfloat16",
                metadata=acts.metadata(dataset=["data/train.jsonl"]))
    cache = ActivationCache("cache/gpt2-resid6"); cache.check_width(768)
    for batch in cache.batches(4096, seed=0, epochs=2): ...

Modules: ``text`` (:func:`read_texts`), ``hf_datasets`` (:func:`dataset_documents`: a
``save_to_disk`` folder, parquet or arrow files, with the ``datasets`` extra), ``stream``
(:class:`ModelActivations`), ``mixing`` (:class:`MixingBuffer`), ``cache``
(:func:`write_cache`, :class:`ActivationCache`) and ``synthetic`` (features with a known ground
truth, the demo's dataset), and ``sources`` (what the ``gsae-fast`` commands train and evaluate
on: :func:`documents`, :func:`cache_training_batches`, :func:`model_training_batches`,
:func:`write_model_cache`). Loading models and hooking their layers is in
:mod:`gsae_fast.hooks`.
"""
from .cache import (
                    CACHE_DTYPES,
                    CACHE_FORMAT,
                    CACHE_FORMAT_VERSION,
                    META_FILE,
                    ActivationCache,
                    CacheBatches,
                    ProgressFn,
                    write_cache,
)
from .hf_datasets import DatasetDocuments, dataset_documents, is_dataset_path
from .mixing import MixingBuffer
from .sources import (
                    FullBatches,
                    cache_eval_batches,
                    cache_training_batches,
                    documents,
                    model_training_batches,
                    text_activations,
                    write_model_cache,
)
from .stream import ModelActivations
from .synthetic import SyntheticConfig, SyntheticFeatures, feature_recovery
from .text import TEXT_SUFFIXES, PathLike, read_texts

__all__ = ["read_texts", "TEXT_SUFFIXES", "PathLike", "ModelActivations", "MixingBuffer",
           "write_cache", "ActivationCache", "CacheBatches", "ProgressFn", "META_FILE",
           "CACHE_FORMAT", "CACHE_FORMAT_VERSION", "CACHE_DTYPES", "SyntheticConfig",
           "SyntheticFeatures", "feature_recovery", "FullBatches", "text_activations",
           "write_model_cache", "cache_training_batches", "model_training_batches",
           "cache_eval_batches", "documents", "DatasetDocuments", "dataset_documents",
           "is_dataset_path"]
