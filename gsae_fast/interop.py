"""Converters and checkpoints between gsae_fast's SAEs (:class:`gsae_fast.GatedSAE`,
:class:`gsae_fast.JumpReLUSAE`, :class:`gsae_fast.TopKSAE`, :class:`gsae_fast.BatchTopKSAE`) and
SAELens and dictionary_learning (table ``ARCHS``: the registry of gsae_fast.saes, where each
architecture's module holds its entry; below, the Gated names, the others are SAELens' names
too).

- SAELens (``sae_lens.saes.gated_sae.GatedSAE`` / ``GatedTrainingSAE``): the same parameter names
  and layouts. On disk: ``cfg.json`` + ``sae_weights.safetensors`` (``SAE.save_model`` /
  ``SAE.load_from_disk``); :func:`save_pretrained` writes that format, :func:`load` reads it.
  The config fields that define an SAE (``k``, ``rescale_acts_by_decoder_norm``,
  ``topk_threshold_lr``) and its buffers (BatchTopK's ``topk_threshold``) travel with it.
- dictionary_learning (``dictionary_learning.dictionary.GatedAutoEncoder``):
  ``encoder.weight = W_enc.T``, ``decoder.weight = W_dec.T``, ``decoder_bias = b_dec``,
  ``gate_bias = b_gate``, ``mag_bias = b_mag``, ``r_mag`` (TopK ones: ``encoder.bias = b_enc``,
  ``b_dec``, buffers ``k`` and ``threshold``). On disk: ``ae.pt`` (a state dict) +
  ``config.json``; :func:`load` reads it.
- EleutherAI sparsify (TopK SAEs): ``cfg.json`` + ``sae.safetensors``; :func:`save_sparsify`
  writes it, :func:`load` reads it (gsae_fast.sparsify_format).

A trained SAE carries SAELens' metadata (:func:`training_metadata`: model, TransformerLens hook
name, context size, dataset) and, trained on scaled inputs, has the scale folded into its weights
as SAELens does (:func:`fold_input_scale`).

``share=True`` makes the new module use the same storage (SAELens: the same ``nn.Parameter``
objects; dictionary_learning: transposed views of its weights, so in-place updates such as an
optimizer step show on both sides); ``share=False`` copies.

Settings gsae_fast does not implement are refused with :class:`UnsupportedSAEError`, never
ignored: SAELens ``apply_b_dec_to_input=False``, any ``normalize_activations`` other than
``"none"`` (fold the scale into the weights first: :func:`fold_input_scale`),
``reshape_activations="hook_z"`` (flatten the heads yourself), ``use_error_term=True``;
architectures other than those of ``ARCHS``; a dictionary_learning TopK SAE with a non-integer
``k`` or decoder-norm rescaling.
The SAELens libraries are imported only by the functions that build their objects.
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Optional, Union

import torch
from torch import nn

# The registry (each architecture's module in gsae_fast.saes holds its class and its Arch) and
# the error; these names stay importable from here.
from .files import atomic_write, write_json

# What a trained SAE carries into SAELens (its own module; these names stay importable here).
from .sae_lens_export import (  # noqa: F401
    TL_HOOKS,
    fold_input_scale,
    training_metadata,
    transformer_lens_hook,
)
from .saes import ARCHS, Arch, UnsupportedSAEError  # noqa: F401

SAE_LENS_CFG, SAE_LENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
DL_CFG, DL_WEIGHTS = "config.json", "ae.pt"
SAE_LENS_FORMAT = "6.0.0"


def _read_json_object(path: str) -> dict:
    """The JSON object (a dict) in the file at ``path``; ValueError naming the file if it is
    not JSON or holds another type."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not valid JSON ({e}): the file is damaged or not a "
                         f"config; restore it or save the SAE again") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, expected an object "
                         f"({{...}} of config fields): not a config file")
    return obj


def _check_floating(tensors: dict, names, where: str) -> None:
    """UnsupportedSAEError unless each of ``names`` in ``tensors`` is a floating-point
    tensor (an SAE's weights; an integer one is a quantised or foreign checkpoint)."""
    for name in names:
        t = tensors.get(name)
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise UnsupportedSAEError(f"{where}: {name} is a {type(t).__name__}, not a tensor")
        if not t.is_floating_point():
            raise UnsupportedSAEError(
                f"{where}: {name} has dtype {_dtype_name(t.dtype)}; SAE weights are floating "
                f"point (a quantised checkpoint?): convert them to float first")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    if name is None or isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def check_sae_lens_cfg(cfg: dict) -> None:
    """Raise UnsupportedSAEError for SAELens settings gsae_fast does not implement."""
    arch = cfg.get("architecture", "gated")
    if arch not in ARCHS:
        raise UnsupportedSAEError(f"SAELens architecture {arch!r}: gsae_fast implements "
                                  f"{sorted(ARCHS)}")
    if not cfg.get("apply_b_dec_to_input", True):
        raise UnsupportedSAEError("SAELens apply_b_dec_to_input=False is not supported: "
                                  "gsae_fast's encoder always centres the input with b_dec")
    norm = cfg.get("normalize_activations", "none") or "none"
    if norm != "none":
        raise UnsupportedSAEError(
            f"SAELens normalize_activations={norm!r} is not supported: gsae_fast takes SAEs on "
            "raw activations; fold the normalisation into the weights (or normalise the inputs "
            "yourself) and set normalize_activations='none'")
    reshape = cfg.get("reshape_activations", "none") or "none"
    if reshape != "none":
        raise UnsupportedSAEError(f"SAELens reshape_activations={reshape!r} is not supported: "
                                  "flatten the heads ([..., n_heads * d_head]) before encoding")


def sae_lens_cfg_dict(sae) -> dict:
    cfg = sae.cfg.to_dict() if hasattr(sae.cfg, "to_dict") else dict(vars(sae.cfg))
    cfg.setdefault("architecture", sae.cfg.architecture())
    return cfg


def _shapes(name: str, d_in: int, d_sae: int) -> tuple:
    return {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}.get(name, (d_sae,))


def _new_module(arch: Arch, params: dict, backend: str, metadata: Optional[dict],
                hyper: Optional[dict] = None, buffers: Optional[dict] = None,
                share_buffers: bool = False):
    """The gsae_fast module of ``arch`` holding ``params`` (Parameters are used as they are,
    tensors wrapped), built with the config values ``hyper``, with the buffers ``buffers``
    (the same tensors with ``share_buffers``, where their dtype is the module's)."""
    d_in, d_sae = params["W_enc"].shape
    for name in arch.params:
        shape = _shapes(name, d_in, d_sae)
        if tuple(params[name].shape) != shape:
            raise UnsupportedSAEError(f"{name} has shape {list(params[name].shape)}, expected "
                                      f"{list(shape)} (d_in={d_in}, d_sae={d_sae})")
    # (a threshold may stay fp32 beside bf16 weights, as SAELens trains it; cast at use)
    same = [n for n in arch.params if n != "threshold"]
    if len({params[n].dtype for n in same}) > 1 or len({params[n].device for n in params}) > 1:
        raise UnsupportedSAEError("the parameters do not share one dtype and device: "
                                  + str({n: (params[n].dtype, str(params[n].device))
                                         for n in params}))
    # A copied half-precision threshold becomes fp32, as JumpReLUSAE keeps it (shared: as is).
    t = params.get("threshold")
    if t is not None and t.dtype in (torch.bfloat16, torch.float16) and \
            not isinstance(t, nn.Parameter):
        params["threshold"] = t.float()
    missing = [n for n in arch.hyper if n not in (hyper or {})]
    if missing and arch.name in ("topk", "batchtopk") and "k" in missing:
        raise UnsupportedSAEError(f"a {arch.name!r} SAE needs its k (missing from the config)")
    sae = arch.cls(d_in, d_sae, device="meta", decoder_init_norm=None,
                   **{k: v for k, v in (hyper or {}).items() if k in arch.hyper})
    for name in arch.params:
        p = params[name]
        setattr(sae, name, p if isinstance(p, nn.Parameter) else nn.Parameter(p))
    for name in arch.buffers:
        value = (buffers or {}).get(name)
        old = getattr(sae, name)
        if value is None:
            value = torch.zeros((), dtype=old.dtype, device=sae.W_enc.device)
        elif share_buffers:
            if value.dtype != old.dtype:
                raise UnsupportedSAEError(f"share=True: {name} is {value.dtype}, gsae_fast keeps "
                                          f"it in {old.dtype}; convert with share=False")
        else:
            value = value.detach().to(sae.W_enc.device, old.dtype).clone()
        setattr(sae, name, value)
    sae.backend = backend
    if backend not in ("auto", "reference"):
        from . import backends
        backends.resolve(backend, sae.W_enc.device)
    sae.sae_lens_metadata = metadata
    return sae


def _expect(arch: Arch, expected: Optional[str]) -> Arch:
    if expected is not None and arch.name != expected:
        raise UnsupportedSAEError(f"this is a {arch.name!r} SAE: load it with "
                                  f"gsae_fast.{arch.cls.__name__} (or gsae_fast.load)")
    return arch


def from_sae_lens(sae, *, share: bool = False, backend: str = "auto",
                  expected: Optional[str] = None):
    """A gsae_fast SAE (GatedSAE, JumpReLUSAE) from a SAELens one (inference or training)."""
    if not hasattr(sae, "cfg") or not hasattr(sae.cfg, "architecture"):
        raise TypeError(f"from_sae_lens: expected a SAELens SAE, got {type(sae).__name__}")
    cfg = sae_lens_cfg_dict(sae)
    check_sae_lens_cfg(cfg)
    arch = _expect(ARCHS[cfg["architecture"]], expected)
    if getattr(sae, "use_error_term", False):
        raise UnsupportedSAEError("SAELens use_error_term=True is not supported (its forward "
                                  "adds the reconstruction error back); set it to False")
    params = {n: getattr(sae, n) if share else getattr(sae, n).detach().clone()
              for n in arch.params}
    return _new_module(arch, params, backend, cfg.get("metadata"),
                       {k: cfg[k] for k in arch.hyper if k in cfg},
                       {n: getattr(sae, n) for n in arch.buffers}, share_buffers=share)


def sae_lens_cfg(gsae, **overrides) -> dict:
    """The SAELens config dict (``cfg.json``) of a gsae_fast SAE."""
    cfg = dict(d_in=gsae.d_in, d_sae=gsae.d_sae, dtype=_dtype_name(gsae.W_enc.dtype),
               device=str(gsae.W_enc.device), apply_b_dec_to_input=True,
               normalize_activations="none", reshape_activations="none",
               metadata=dict(getattr(gsae, "sae_lens_metadata", None) or {}),
               architecture=gsae.ARCH)
    cfg.update({k: getattr(gsae, k) for k in ARCHS[gsae.ARCH].hyper})
    cfg.update(overrides)
    return cfg


def to_sae_lens(gsae, *, training: bool = False, share: bool = False, **cfg_overrides):
    """The SAELens SAE (the training class with ``training=True``; config fields such as
    ``l1_coefficient`` go in ``cfg_overrides``) with this module's parameters."""
    arch = ARCHS[gsae.ARCH]
    if arch.sae_lens[1] is None and not training:  # BatchTopK: saved as its JumpReLU form
        if share:
            raise UnsupportedSAEError(f"SAELens has no inference {arch.name!r} SAE: the JumpReLU "
                                      "it becomes folds the decoder norms, so it cannot share")
        return gsae.to_jumprelu().to_sae_lens(**cfg_overrides)
    mod = importlib.import_module(arch.sae_lens[0])
    cls, cfg_cls = (getattr(mod, n) for n in (arch.sae_lens[3:5] if training else
                                              arch.sae_lens[1:3]))
    cfg = sae_lens_cfg(gsae, **cfg_overrides)
    check_sae_lens_cfg(cfg)
    metadata = cfg.pop("metadata")
    cfg.pop("architecture")
    if not training and "topk_threshold_lr" in cfg:
        cfg.pop("topk_threshold_lr")
    out = cls(cfg_cls(**cfg))
    for k, v in metadata.items():
        out.cfg.metadata[k] = v
    with torch.no_grad():
        for name in arch.params:
            if share:
                setattr(out, name, getattr(gsae, name))
            else:
                getattr(out, name).copy_(getattr(gsae, name))
        for name in arch.buffers:
            if share:
                setattr(out, name, getattr(gsae, name))
            else:
                getattr(out, name).copy_(getattr(gsae, name))
    return out


def _dl_arch(names, class_name: Optional[str], expected: Optional[str]) -> Arch:
    """The architecture of a dictionary_learning autoencoder (by class) or state dict (by keys;
    TopK and BatchTopK share theirs, so ``expected`` decides)."""
    if class_name is not None:
        for arch in ARCHS.values():
            if arch.dl_class == class_name:
                return arch
    found = [a for a in ARCHS.values() if all(k in names for k in a.dl_keys)]
    if expected is not None and any(a.name == expected for a in found):
        return ARCHS[expected]
    if len(found) > 1:
        raise UnsupportedSAEError(
            "this state dict fits dictionary_learning's " + " and ".join(a.dl_class for a in found)
            + ", which compute different things: load it with the gsae_fast class it is ("
            + ", ".join(f"{a.cls.__name__}.from_dictionary_learning / .load" for a in found)
            + "), or next to its config.json")
    if found:
        return found[0]
    raise TypeError("expected a dictionary_learning GatedAutoEncoder, JumpReluAutoEncoder, "
                    "AutoEncoderTopK or BatchTopKSAE (or its state dict); got parameters "
                    f"{sorted(names)}")


def from_dictionary_learning(ae, *, share: bool = False, backend: str = "auto",
                             expected: Optional[str] = None):
    """A gsae_fast SAE from a dictionary_learning ``GatedAutoEncoder``, ``JumpReluAutoEncoder``,
    ``AutoEncoderTopK`` or ``BatchTopKSAE`` (or its state dict; a TopK or
    BatchTopK state dict, whose keys are the same, needs ``expected``: call it through
    ``TopKSAE`` / ``BatchTopKSAE``).

    dictionary_learning's JumpReLU encoder does not centre its input by default
    (``apply_b_dec_to_input = False``, also what its ``ae.pt`` files were trained with); gsae_fast's
    always does, so the centring is folded into the bias: ``b_enc + b_dec @ W_enc`` (the same
    activations; not shareable, so ``share=True`` is refused there).
    """
    is_state = isinstance(ae, dict)
    state = ae if is_state else dict(ae.named_parameters())
    extra = ae if is_state else dict(ae.named_buffers())
    arch = _expect(_dl_arch(state, None if is_state else type(ae).__name__, expected), expected)
    default_centred = arch.name != "jumprelu"  # only the JumpReLU autoencoder does not centre
    centred = default_centred if is_state else getattr(ae, "apply_b_dec_to_input", default_centred)
    if not centred and share:
        raise UnsupportedSAEError("share=True needs apply_b_dec_to_input=True: the encoder bias "
                                  "is folded (b_enc + b_dec @ W_enc), so it cannot be shared")
    _check_floating(state, arch.dl_keys, "dictionary_learning state dict")
    params = {}
    for key, (name, transposed) in arch.dl_keys.items():
        t = state[key].detach()
        t = t.t() if transposed else t
        params[name] = t if share else t.clone().contiguous()
    if not centred:
        W, b = params["W_enc"], params["b_dec"]
        params["b_enc"] = (params["b_enc"].double() + b.double() @ W.double()).to(W.dtype)
    hyper, buffers, notes = {}, {}, {}
    for key, name in arch.dl_extra.items():
        if key not in extra:
            continue
        if name in arch.hyper:
            hyper[name] = int(extra[key])
        elif name in arch.buffers:
            buffers[name] = extra[key]
        else:
            notes[name] = float(extra[key])
    sae = _new_module(arch, params, backend, None, hyper, buffers)
    for name, value in notes.items():
        setattr(sae, name, value)
    return sae


def to_dictionary_learning(gsae, *, share: bool = False):
    """The dictionary_learning autoencoder with this module's parameters."""
    arch = ARCHS[gsae.ARCH]
    cls = getattr(importlib.import_module(arch.dl_module), arch.dl_class)
    kw = dict(initialization=lambda m: None) if arch.name == "gated" else {}
    if "k" in arch.dl_extra:
        if int(gsae.k) != gsae.k:
            raise UnsupportedSAEError(f"dictionary_learning's {arch.dl_class} needs an integer k, "
                                      f"got {gsae.k}")
        kw["k"] = int(gsae.k)
    if arch.name in ("topk", "batchtopk") and gsae.rescale_acts_by_decoder_norm:
        raise UnsupportedSAEError(
            f"dictionary_learning's {arch.dl_class} has no rescale_acts_by_decoder_norm: fold "
            "the decoder norms first (BatchTopKSAE.to_jumprelu, or scale W_enc, b_enc by them)")
    ae = cls(gsae.d_in, gsae.d_sae, device=gsae.W_enc.device, **kw) if arch.name in (
        "gated", "jumprelu") else cls(gsae.d_in, gsae.d_sae, **kw).to(gsae.W_enc.device)
    ae = ae.to(gsae.W_enc.dtype)
    # dictionary_learning's JumpReLU encoder does not centre (and its ae.pt files cannot say it
    # does): write its convention, b_enc - b_dec @ W_enc, so a saved state dict reloads exactly.
    uncentred = getattr(ae, "apply_b_dec_to_input", True) is False
    if uncentred and share:
        raise UnsupportedSAEError("share=True: dictionary_learning's uncentred encoder needs "
                                  "its own bias (b_enc - b_dec @ W_enc), which cannot be shared")
    for key, (name, transposed) in arch.dl_keys.items():
        t = getattr(gsae, name).detach()
        if uncentred and name == "b_enc":
            W, b = gsae.W_enc.detach(), gsae.b_dec.detach()
            t = (t.double() - b.double() @ W.double()).to(t.dtype)
        t = t.t() if transposed else t
        parent, _, attr = key.rpartition(".")
        setattr(ae.get_submodule(parent) if parent else ae, attr,
                nn.Parameter(t if share else t.clone().contiguous()))
    if arch.dl_extra.get("threshold") is not None:
        value = getattr(gsae, arch.dl_extra["threshold"], None)
        if value is not None:  # in the dtype the autoencoder's .to() gave its own buffer
            ae.threshold = torch.as_tensor(float(value), dtype=ae.threshold.dtype,
                                           device=gsae.W_enc.device)
    return ae


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:
        raise ImportError("SAELens checkpoints need the safetensors package: pip install "
                          "safetensors (or pip install gsae_fast[interop])") from e
    return safetensors.torch


def _load_safetensors(path: str, device) -> dict:
    load_file = _safetensors().load_file
    from safetensors import SafetensorError
    try:
        return load_file(path, device=str(device))
    except SafetensorError as e:
        raise ValueError(f"{path} is not a valid safetensors file ({e}): it is damaged or its "
                         f"writing was cut short; restore it or save the SAE again") from None


def _load_state_dict(path: str, device) -> dict:
    """dictionary_learning's ``ae.pt``: a state dict of tensors (loaded with
    ``weights_only=True``: no code in the file runs)."""
    import pickle
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} is not a state dict of tensors (torch.load(weights_only=True) "
                         f"refused it: a pickled module or other objects, or a damaged file); "
                         f"save ae.state_dict() with torch.save") from None
    except (EOFError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "PytorchStreamReader" not in str(e):
            raise  # not the file's content (e.g. a device it cannot be mapped to)
        why = str(e).strip().splitlines()[0] if str(e).strip() else "the file is empty"
        raise ValueError(f"{path} is damaged or cut short ({why}); restore it or save "
                         f"ae.state_dict() again with torch.save") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state dict "
                         f"(save ae.state_dict() with torch.save)")
    return state


def save_pretrained(gsae, path: Union[str, os.PathLike]) -> None:
    """Write ``path/cfg.json`` + ``path/sae_weights.safetensors`` (SAELens' format: loads with
    ``sae_lens.SAE.load_from_disk(path)`` and :func:`load`; a BatchTopK SAE, which SAELens
    only has as a training class, with ``sae_lens.TrainingSAE.load_from_disk``). Both files
    are replaced atomically; on an error (a full disk: OSError(ENOSPC) naming the file) the
    previous checkpoint in ``path`` stays as it was."""
    save = _safetensors().save
    os.makedirs(path, exist_ok=True)
    arch = ARCHS[gsae.ARCH]
    weights = save({n: getattr(gsae, n).detach().contiguous() for n in arch.params + arch.buffers})
    cfg = sae_lens_cfg(gsae)
    if getattr(gsae, "dl_threshold", None) is not None:  # SAELens ignores unknown fields
        cfg["dl_threshold"] = gsae.dl_threshold
    # The version of SAELens' config format written here; without it SAELens reads the file as
    # a pre-6.0 config (which has no BatchTopK architecture).
    cfg["metadata"].setdefault("sae_lens_version", SAE_LENS_FORMAT)
    write_checkpoint(path, SAE_LENS_WEIGHTS, weights, SAE_LENS_CFG, cfg)


def write_checkpoint(path: str, weights_name: str, weights: bytes, cfg_name: str,
                     cfg: dict) -> None:
    """Write ``path/weights_name`` (bytes) and ``path/cfg_name`` (JSON) so that a failure (a
    full disk: OSError(ENOSPC) naming the file) leaves the previous pair as it was: both are
    written in full and fsynced before either replaces an older one."""
    cfg_error = []
    try:
        with atomic_write(os.path.join(path, weights_name)) as f:
            f.write(weights)
            f.flush()
            os.fsync(f.fileno())
            try:
                write_json(cfg, os.path.join(path, cfg_name))
            except OSError as e:
                cfg_error.append(e)
                raise
    except OSError:
        if cfg_error:  # atomic_write would name the weights for the config's full disk
            raise cfg_error[0] from None
        raise


def load(path: Union[str, os.PathLike], *, device: Union[str, torch.device] = "cpu",
         dtype: Union[str, torch.dtype, None] = None, backend: str = "auto",
         expected: Optional[str] = None):
    """A gsae_fast SAE from a SAELens checkpoint folder (``cfg.json`` +
    ``sae_weights.safetensors``), a dictionary_learning one (``ae.pt`` [+ ``config.json``]) or
    an EleutherAI sparsify one (``cfg.json`` + ``sae.safetensors``: a TopKSAE, see
    gsae_fast.sparsify_format). ``dtype`` defaults to the checkpoint's."""
    path = os.fspath(path)
    weights_path = os.path.join(path, SAE_LENS_WEIGHTS)
    if os.path.isfile(weights_path):
        cfg_path = os.path.join(path, SAE_LENS_CFG)
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{path}: has {SAE_LENS_WEIGHTS} but no {SAE_LENS_CFG}")
        cfg = _read_json_object(cfg_path)
        arch_name = cfg.get("architecture", "gated")
        if not isinstance(arch_name, str):
            raise ValueError(f"{cfg_path}: field 'architecture' is {arch_name!r}, expected a "
                             f"name such as 'gated'")
        metadata = cfg.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise ValueError(f"{cfg_path}: field 'metadata' is a {type(metadata).__name__}, "
                             f"expected an object")
        check_sae_lens_cfg(cfg)
        arch = _expect(ARCHS[arch_name], expected)
        state = _load_safetensors(weights_path, device)
        _check_floating(state, arch.params + arch.buffers + ("log_threshold",), weights_path)
        if arch.name == "jumprelu" and "log_threshold" in state and "threshold" not in state:
            state["threshold"] = state.pop("log_threshold").exp()  # older SAELens checkpoints
        missing = [n for n in arch.params if n not in state]
        if missing:
            raise UnsupportedSAEError(f"{path}: {SAE_LENS_WEIGHTS} lacks {missing}")
        extra = [k for k in state if k not in arch.params + arch.buffers and not (
            k == "scaling_factor" and bool((state[k] == 1).all()))]  # legacy, 1 = no scaling
        if extra:
            raise UnsupportedSAEError(f"{path}: {SAE_LENS_WEIGHTS} has tensors gsae_fast does not "
                                      f"implement: {extra}")
        if dtype is None:
            try:
                dtype = _parse_dtype(cfg.get("dtype"))
            except ValueError as e:
                raise ValueError(f"{cfg_path}: field 'dtype': {e}") from None
        else:
            dtype = _parse_dtype(dtype)
    elif os.path.isfile(os.path.join(path, DL_WEIGHTS)):
        cfg_path = os.path.join(path, DL_CFG)
        raw = _load_state_dict(os.path.join(path, DL_WEIGHTS), device)
        weight_keys = {k for a in ARCHS.values() for k in a.dl_keys}
        _check_floating(raw, [k for k in raw if k in weight_keys], os.path.join(path, DL_WEIGHTS))
        if os.path.isfile(cfg_path):
            trainer = _read_json_object(cfg_path).get("trainer", {})
            if not isinstance(trainer, dict):
                raise ValueError(f"{cfg_path}: field 'trainer' is a {type(trainer).__name__}, "
                                 f"expected an object")
            cls = trainer.get("dict_class")
            known = {a.dl_class: a for a in ARCHS.values()}
            if cls is not None and cls not in known:
                raise UnsupportedSAEError(f"{path}: dictionary_learning dict_class {cls!r}; "
                                          f"gsae_fast implements {sorted(known)}")
            if cls is not None and expected is None:
                expected = known[cls].name
        try:
            sae = from_dictionary_learning(raw, backend=backend, expected=expected)
        except (TypeError, UnsupportedSAEError) as e:
            raise UnsupportedSAEError(f"{path}: {DL_WEIGHTS}: {e}") from None
        return sae if dtype is None else sae.to(_parse_dtype(dtype))
    elif os.path.isfile(os.path.join(path, SPARSIFY_WEIGHTS)):
        _expect(ARCHS["topk"], expected)
        return load_sparsify(path, device=device, dtype=dtype, backend=backend)
    elif os.path.isfile(path):
        raise NotADirectoryError(f"{path} is a file: pass the checkpoint folder that holds it "
                                 f"({os.path.dirname(path) or '.'})")
    else:
        raise FileNotFoundError(f"{path}: no SAELens ({SAE_LENS_CFG} + {SAE_LENS_WEIGHTS}), "
                                f"dictionary_learning ({DL_WEIGHTS}) or sparsify "
                                f"({SPARSIFY_CFG} + {SPARSIFY_WEIGHTS}) checkpoint there")
    params = {n: state[n].to(dtype=dtype) if dtype else state[n] for n in arch.params}
    sae = _new_module(arch, params, backend, metadata, {k: cfg[k] for k in arch.hyper if k in cfg},
                      {n: state[n] for n in arch.buffers if n in state})
    if cfg.get("dl_threshold") is not None:
        sae.dl_threshold = float(cfg["dl_threshold"])
    return sae


# sparsify's format has its own module, which builds on the helpers above (gsae_fast imports
# this module first, so they are defined when it is imported).
from .sparsify_format import (  # noqa: E402,F401
    SPARSIFY_CFG,
    SPARSIFY_WEIGHTS,
    load_sparsify,
    save_sparsify,
)
