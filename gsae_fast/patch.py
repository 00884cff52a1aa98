"""One-line switch: make existing SAELens / dictionary_learning Gated SAEs run on gsae_fast.

    import gsae_fast
    gsae_fast.patch_sae_lens()            # SAELens GatedSAE / GatedTrainingSAE
    gsae_fast.patch_dictionary_learning() # GatedAutoEncoder / GatedSAETrainer
    ...                                   # existing code, unchanged
    gsae_fast.unpatch_sae_lens(); gsae_fast.unpatch_dictionary_learning()

The patched methods compute the same values through the sparse kernels (tests/test_patch.py
checks outputs, losses and gradients against the unpatched classes). Whenever a call uses
something the kernels do not implement, the original method runs instead, so results never
change: SAELens hooks attached to the SAE's hook points, ``use_error_term``, input normalisation
or ``hook_z`` reshaping, ``apply_b_dec_to_input=False``; dictionary_learning's
``normalize_decoder=True`` and hooks on the autoencoder's ``encoder`` / ``decoder``. (Hooks on the
SAE module itself run either way: they wrap ``forward``.)

What differs by design: SAELens' ``training_forward_pass`` returns ``feature_acts`` as a sparse COO
tensor (its trainer accepts that: it calls ``.bool()``, ``.sum`` and ``.to_dense()``), and
``hidden_pre`` holds the magnitude pre-activations of the open gates only (COO): the dense
``[tokens, d_sae]`` matrices are what the kernels avoid. ``to_dense()`` of ``feature_acts`` equals
the unpatched value.
"""
from __future__ import annotations

from collections import namedtuple

import torch

from . import interop, ops, reference
from .saes.base import capacity_hint, hinted_encode, remember_capacity
from .types import SparseActs

_saved: dict = {}  # (class, method name) -> the class's own attribute before patching (or None)


def _patch(cls, name, fn):
    if (cls, name) not in _saved:
        _saved[(cls, name)] = cls.__dict__.get(name)
    setattr(cls, name, fn)


def _unpatch(classes):
    for (cls, name), original in list(_saved.items()):
        if cls in classes:
            if original is None:
                delattr(cls, name)
            else:
                setattr(cls, name, original)
            del _saved[(cls, name)]


def _original(cls, name):
    """The method as it was before patching, for ``cls`` or any subclass of a patched class."""
    for base in cls.__mro__:
        if (base, name) in _saved and _saved[(base, name)] is not None:
            return _saved[(base, name)]
        if name in base.__dict__ and (base, name) not in _saved:
            return base.__dict__[name]
    raise AttributeError(name)


# A patched object keeps its capacity hint (gsae_fast.saes.base, as GatedSAE keeps its own)
# under this attribute.
_HINT = "_gsae_fast_capacity"


def _sparse(x, params, holder, backend) -> SparseActs:
    """Sparse encode with the patched object's capacity hint."""
    return hinted_encode(holder, x, params, backend, attr=_HINT)


def _has_module_hooks(*modules) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
               or getattr(m, "_backward_pre_hooks", None) for m in modules)


def _coo(acts: SparseActs, values) -> torch.Tensor:
    mask = acts.mask()
    rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    return torch.sparse_coo_tensor(torch.stack([rows, acts.idx[mask].long()]), values[mask],
                                   acts.shape, check_invariants=False)


# The backend each library's patched methods use (set by patch_*).
_backend = {"sae_lens": "auto", "dictionary_learning": "auto"}

# ------------------------------------------------------------------------------------- SAELens


def _sae_lens_ok(sae) -> bool:
    """True when the kernels compute exactly what this SAELens SAE's own methods would."""
    try:
        interop.check_sae_lens_cfg(interop.sae_lens_cfg_dict(sae))
    except interop.UnsupportedSAEError:
        return False
    if getattr(sae, "use_error_term", False):
        return False
    hook_points = list(sae.hook_dict.values())
    return not (any(h.fwd_hooks or h.bwd_hooks for h in hook_points)
                or _has_module_hooks(*hook_points))


def _sl_params(sae):
    return sae.W_enc, sae.b_dec, sae.b_gate, sae.r_mag, sae.b_mag


def _sl_encode(self, x):
    if not _sae_lens_ok(self):
        return _original(type(self), "encode")(self, x)
    acts = _sparse(x.to(self.dtype), _sl_params(self), self, _backend["sae_lens"])
    return acts.to_dense(dtype=self.dtype)


def _sl_forward(self, x):
    if not _sae_lens_ok(self):
        return _original(type(self), "forward")(self, x)
    acts = _sparse(x.to(self.dtype), _sl_params(self), self, _backend["sae_lens"])
    return ops.sparse_decode(acts, self.W_dec, self.b_dec, backend=_backend["sae_lens"])


def _sl_training_forward_pass(self, step_input):
    if not _sae_lens_ok(self):
        return _original(type(self), "training_forward_pass")(self, step_input)
    from sae_lens.saes.sae import TrainStepOutput
    x = step_input.sae_in.to(self.dtype)
    out = ops.gated_sae_loss(x, self.W_enc, self.W_dec, self.b_dec, self.b_gate, self.r_mag,
                             self.b_mag, step_input.coefficients["l1"], sparsity="decoder_norm",
                             aux="shared", backend=_backend["sae_lens"],
                             capacity=capacity_hint(self, _HINT))
    remember_capacity(self, out.max_count, self.cfg.d_sae, _HINT)
    with torch.no_grad():
        if out.acts is not None:
            acts = out.acts
            z = acts.pi_gate - self.b_gate.to(acts.pi_gate.dtype)[acts.idx.long()]
            pre_mag = torch.exp(self.r_mag.to(z.dtype))[acts.idx.long()] * z + \
                self.b_mag.to(z.dtype)[acts.idx.long()]
            feature_acts = _coo(acts, acts.f.to(self.dtype))
            hidden_pre = _coo(acts, pre_mag.to(self.dtype))
        else:  # the dense path ran (L0 near d_sae): dense values, as SAELens returns them
            pi_gate, hidden_pre = reference.pre_activations(x, *_sl_params(self))
            feature_acts = ((pi_gate > 0) * torch.relu(hidden_pre)).to(self.dtype)
    return TrainStepOutput(sae_in=step_input.sae_in, sae_out=out.x_hat, feature_acts=feature_acts,
                           hidden_pre=hidden_pre, loss=out.loss,
                           losses={"mse_loss": out.mse, "l1_loss": out.sparsity,
                                   "auxiliary_reconstruction_loss": out.aux})


def patch_sae_lens(backend: str = "auto") -> None:
    """Route SAELens' GatedSAE / GatedTrainingSAE encode, forward and training forward pass
    through gsae_fast (``backend`` as everywhere in gsae_fast). Idempotent."""
    from sae_lens.saes.gated_sae import GatedSAE, GatedTrainingSAE
    _backend["sae_lens"] = backend
    for cls in (GatedSAE, GatedTrainingSAE):
        _patch(cls, "encode", _sl_encode)
        _patch(cls, "forward", _sl_forward)
    _patch(GatedTrainingSAE, "training_forward_pass", _sl_training_forward_pass)


def unpatch_sae_lens() -> None:
    from sae_lens.saes.gated_sae import GatedSAE, GatedTrainingSAE
    _unpatch((GatedSAE, GatedTrainingSAE))


# --------------------------------------------------------------------------- dictionary_learning


def _dl_ok(ae, normalize_decoder) -> bool:
    return not normalize_decoder and not _has_module_hooks(ae.encoder, ae.decoder)


def _dl_input(ae, x):
    # The original computes encoder(x - decoder_bias): torch promotes x (e.g. bf16 activations
    # into an fp32 autoencoder); the kernels take one dtype, so promote the same way.
    return x.to(torch.result_type(x, ae.encoder.weight))


def _dl_params(ae):
    # nn.Linear weights are the transposes of ours; ops make them contiguous (a copy per call).
    return ae.encoder.weight.T, ae.decoder_bias, ae.gate_bias, ae.r_mag, ae.mag_bias


def _dl_encode(self, x, return_gate=False, normalize_decoder=False):
    if not _dl_ok(self, normalize_decoder):
        return _original(type(self), "encode")(self, x, return_gate, normalize_decoder)
    acts = _sparse(_dl_input(self, x), _dl_params(self), self, _backend["dictionary_learning"])
    dtype = self.encoder.weight.dtype
    f = acts.to_dense(dtype=dtype)
    return (f, acts.to_dense(dtype=dtype, values="pi_gate")) if return_gate else f


def _dl_forward(self, x, output_features=False, normalize_decoder=False):
    if not _dl_ok(self, normalize_decoder):
        return _original(type(self), "forward")(self, x, output_features, normalize_decoder)
    acts = _sparse(_dl_input(self, x), _dl_params(self), self, _backend["dictionary_learning"])
    x_hat = ops.sparse_decode(acts, self.decoder.weight.T, self.decoder_bias,
                              backend=_backend["dictionary_learning"])
    return (x_hat, acts.to_dense(dtype=self.encoder.weight.dtype)) if output_features else x_hat


def _dl_trainer_loss(self, x, step, logging=False, **kwargs):
    ae = self.ae
    if not _dl_ok(ae, False):
        return _original(type(self), "loss")(self, x, step, logging=logging, **kwargs)
    x = _dl_input(ae, x)
    coef = self.l1_penalty * self.sparsity_warmup_fn(step)
    out = ops.gated_sae_loss(x, ae.encoder.weight.T, ae.decoder.weight.T, ae.decoder_bias,
                             ae.gate_bias, ae.r_mag, ae.mag_bias, coef, sparsity="unit",
                             aux="frozen", backend=_backend["dictionary_learning"],
                             capacity=capacity_hint(ae, _HINT))
    remember_capacity(ae, out.max_count, ae.dict_size, _HINT)
    if not logging:
        return out.loss
    with torch.no_grad():
        if out.acts is not None:
            f = out.acts.to_dense(dtype=x.dtype)
            l1 = out.acts.pi_gate.sum(-1).mean()
        else:
            f, gate = _original(type(ae), "encode")(ae, x, return_gate=True)
            l1 = gate.sum(-1).mean()
    return namedtuple("LossLog", ["x", "x_hat", "f", "losses"])(
        x, out.x_hat, f, {"mse_loss": out.mse.item(), "sparsity_loss": l1.item(),
                          "aux_loss": out.aux.item(), "loss": out.loss.item()})


def patch_dictionary_learning(backend: str = "auto") -> None:
    """Route dictionary_learning's GatedAutoEncoder encode / forward and GatedSAETrainer.loss
    through gsae_fast. Idempotent."""
    from dictionary_learning.dictionary import GatedAutoEncoder
    from dictionary_learning.trainers.gdm import GatedSAETrainer
    _backend["dictionary_learning"] = backend
    _patch(GatedAutoEncoder, "encode", _dl_encode)
    _patch(GatedAutoEncoder, "forward", _dl_forward)
    _patch(GatedSAETrainer, "loss", _dl_trainer_loss)


def unpatch_dictionary_learning() -> None:
    from dictionary_learning.dictionary import GatedAutoEncoder
    from dictionary_learning.trainers.gdm import GatedSAETrainer
    _unpatch((GatedAutoEncoder, GatedSAETrainer))
