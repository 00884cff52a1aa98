"""The model side of getting activations: loading a causal LM, naming one of its layers
(``resid:N``, ``mlp:N``, ``attn:N`` or a module name), reading or replacing that layer's
output, and the LM loss.

    model, tok = load_model("models/gpt2", device="cuda")      # local directory, no download
    x = layer_output(model, tokens, "resid:6")                  # [batch, ctx, d_model]
    with replace_output(model, "mlp:3", torch.zeros_like):      # zero ablation
        loss = ce_loss(model, tokens)

The small helpers ``forward_kwargs``, ``first_output``, ``model_device``, ``torch_dtype`` and
``run_to`` are public because the data and interp packages run models the same way.
transformers is imported only by the functions that need it.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------ models and tokenizers


class ByteTokenizer:
    """Stand-in tokenizer for models without one (random-weight models, tests, no download):
    a text's token ids are its UTF-8 bytes (0..255). Id 256 separates documents when the
    vocabulary has room for it (``vocab_size > 256``), else documents are not separated."""

    def __init__(self, vocab_size: int):
        if vocab_size < 256:
            raise ValueError(f"ByteTokenizer needs a vocabulary of at least 256 ids (one per "
                             f"byte); the model has {vocab_size}: pass its real tokenizer")
        self.vocab_size = vocab_size
        self.bos_token_id = self.eos_token_id = 256 if vocab_size > 256 else None

    def encode(self, text: str, add_special_tokens: bool = False) -> list:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self):
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


# Any of these in a model directory means it has a tokenizer to load.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "spiece.model", "vocab.txt")


def torch_dtype(dtype):
    """``dtype`` as a torch dtype: a torch dtype, or its name such as ``"bfloat16"``; None
    stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"unknown dtype {dtype!r}; use a torch.dtype or a name such as 'bfloat16'")


def load_model(model, *, device=None, dtype=None):
    """A causal LM in eval mode, and its tokenizer (or None): ``(model, tokenizer)``.

    ``model`` is one of:

    - a local model directory (``save_pretrained`` layout): loaded with
      ``AutoModelForCausalLM.from_pretrained(path, local_files_only=True)`` (nothing is
      downloaded), plus ``AutoTokenizer`` when the directory has tokenizer files;
    - a ``transformers.PretrainedConfig``: a model with random weights (``from_config``;
      seed with ``torch.manual_seed`` first for reproducible weights); tokenizer None;
    - an already-built model (``PreTrainedModel`` or any ``nn.Module``): used as is
      (switched to eval mode in place); tokenizer None.

    ``device``: where to put the model; None leaves a given model where it is and puts a
    loaded or new one on the CPU. ``dtype``: a torch dtype or its name; None keeps the weights'.
    Without a tokenizer, :class:`gsae_fast.data.ModelActivations` uses :class:`ByteTokenizer`.
    """
    import transformers

    dtype = torch_dtype(dtype)
    tokenizer = None
    new = True
    if isinstance(model, transformers.PretrainedConfig):
        model = transformers.AutoModelForCausalLM.from_config(model)
    elif isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"no model directory {path!r}: load_model reads local directories only (no "
                f"downloads); save one with model.save_pretrained(path), or pass a config")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path!r} has no config.json: not a transformers model "
                                    f"directory (save one with model.save_pretrained(path))")
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, **kwargs)
        if any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    elif isinstance(model, torch.nn.Module):
        new = False
    else:
        raise TypeError(f"load_model: expected a model directory, a PretrainedConfig or a "
                        f"model, got {type(model).__name__}")
    if device is None and new:
        device = "cpu"
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval(), tokenizer


def model_device(model) -> torch.device:
    """Where the model's parameters are (the CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------- hooking

# Where each model family keeps its blocks (a ModuleList), and what it calls the attention and
# the MLP inside a block: the aliases resid:N, attn:N, mlp:N are read off this table.
BLOCK_LAYOUTS = (
    ("transformer.h", "attn", "mlp"),         # GPT-2, GPT-J, GPT-Neo
    ("model.layers", "self_attn", "mlp"),     # Llama, Mistral, Qwen, Gemma
    ("gpt_neox.layers", "attention", "mlp"),  # Pythia, GPT-NeoX
)
ALIASES = ("resid", "attn", "mlp")


def _find_blocks(modules: dict):
    """(prefix, attention name, MLP name, number of blocks) of the model's block list, or None.
    A base model without the LM head (GPT2Model) has the same names without the first part."""
    for prefix, attn, mlp in BLOCK_LAYOUTS:
        for candidate in (prefix, prefix.split(".", 1)[1]):
            blocks = modules.get(candidate)
            if isinstance(blocks, torch.nn.ModuleList):
                return candidate, attn, mlp, len(blocks)
    return None


def _valid_names_hint(modules: dict) -> str:
    found = _find_blocks(modules)
    if found is not None:
        prefix, attn, mlp, n = found
        names = [f"{prefix}.0", f"{prefix}.0.{attn}", f"{prefix}.0.{mlp}", f"{prefix}.{n - 1}"]
        names += [f"resid:0..{n - 1}", f"attn:0..{n - 1}", f"mlp:0..{n - 1}"]
    else:
        names = [name for name in modules if name][:10]
    return ", ".join(names)


def resolve_hook(model: torch.nn.Module, layer: str):
    """The module that ``layer`` names in ``model``: ``(name, module)``.

    ``layer`` is a name from ``model.named_modules()`` (GPT-2: ``"transformer.h.1"`` = the
    residual stream after block 1, ``"transformer.h.1.mlp"``, ``"transformer.h.1.attn"``;
    Llama: ``"model.layers.0"``, ``"model.layers.0.mlp"``, ...), or an alias ``resid:N``
    (block N's output), ``attn:N`` or ``mlp:N`` (its attention or MLP output, before they are
    added to the residual stream) for the layouts of ``BLOCK_LAYOUTS``. Unknown names raise
    ValueError listing valid ones.
    """
    if not isinstance(layer, str) or not layer:
        raise ValueError(f"layer must be a non-empty module name or alias, got {layer!r}")
    modules = dict(model.named_modules())
    name = layer
    kind, colon, index = layer.partition(":")
    if colon:
        if kind not in ALIASES:
            raise ValueError(f"unknown layer alias {layer!r}: use resid:N, attn:N or mlp:N, or "
                             f"a module name such as {_valid_names_hint(modules)}")
        found = _find_blocks(modules)
        if found is None:
            raise ValueError(f"layer aliases know GPT-2 style (transformer.h) and Llama style "
                             f"(model.layers) models, not {type(model).__name__}: name the "
                             f"module instead, e.g. {_valid_names_hint(modules)}")
        prefix, attn, mlp, n_blocks = found
        try:
            block = int(index)
        except ValueError:
            raise ValueError(f"layer alias {layer!r}: N must be a block number") from None
        if not 0 <= block < n_blocks:
            raise ValueError(f"layer alias {layer!r}: the model has blocks 0..{n_blocks - 1}")
        name = f"{prefix}.{block}" + {"resid": "", "attn": f".{attn}", "mlp": f".{mlp}"}[kind]
    if name not in modules or not name:
        raise ValueError(f"no module {name!r} in {type(model).__name__}; valid names include "
                         f"{_valid_names_hint(modules)} (see model.named_modules())")
    return name, modules[name]


def first_output(output):
    """The activation in a module's output: the output, or its first element if a tuple."""
    return output[0] if isinstance(output, tuple) else output


def forward_kwargs(model) -> dict:
    """The keyword arguments every forward of ``model`` here is run with."""
    # No KV cache: each context is run once, a cache would only cost memory.
    return {"use_cache": False} if hasattr(model, "config") else {}


class _StopForward(BaseException):
    """Raised by the capture hook to end the forward once the hooked layer has run. A
    BaseException, so that no ``except Exception`` in model code can swallow it."""


def run_to(model, module, name: str, tokens: torch.Tensor, stop: bool = True) -> torch.Tensor:
    """``module``'s output [batch, ctx, d] for ``tokens``, under no_grad; with ``stop`` the
    forward ends right after it (the layers above and the LM head never run)."""
    captured = []

    def hook(mod, args, output):
        captured.append(first_output(output))
        if stop:
            raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=tokens, **forward_kwargs(model))
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"layer {name!r} did not run in the model's forward (a container "
                         f"such as a ModuleList?): hook a block, its attention or its MLP")
    out = captured[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != tokens.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"layer {name!r} outputs {shape}, not [batch, ctx, d] activations for "
                         f"tokens {tuple(tokens.shape)}: hook a block, its attention or its MLP")
    return out


def layer_output(model, tokens: torch.Tensor, layer: str, *, stop: bool = True) -> torch.Tensor:
    """The output of ``layer`` (a name or alias, see :func:`resolve_hook`) for ``tokens``
    [batch, ctx]: a [batch, ctx, d] tensor (a tuple output's first element), computed under
    no_grad. With ``stop`` (default) the forward stops after that layer."""
    name, module = resolve_hook(model, layer)
    return run_to(model, module, name, tokens.to(model_device(model)), stop)


@contextmanager
def replace_output(model, layer: str, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Within the ``with`` block, ``layer``'s output is replaced by ``fn(output)``.

    A tuple output keeps its structure (only its first element is replaced). ``fn`` must
    return the shape it is given; its result is cast to the output's dtype (an fp32 SAE spliced
    into a bf16 model). Examples: ``replace_output(model, "resid:3", lambda x: sae(x))``
    (reconstruction), ``replace_output(model, "mlp:3", torch.zeros_like)`` (zero ablation).
    Yields the module's name.
    """
    name, module = resolve_hook(model, layer)

    def hook(mod, args, output):
        act = first_output(output)
        new = fn(act)
        if not isinstance(new, torch.Tensor) or new.shape != act.shape:
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ValueError(f"splice({name!r}): fn returned {got}, expected a tensor of "
                             f"shape {tuple(act.shape)}")
        new = new.to(act.dtype)
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    handle = module.register_forward_hook(hook)
    try:
        yield name
    finally:
        handle.remove()


def ce_loss(model, tokens: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` on ``tokens`` [batch, ctx], computed
    under no_grad in fp32. Combine with :func:`replace_output` for the loss with a layer
    replaced."""
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"ce_loss needs tokens of shape [batch, ctx >= 2], got "
                         f"{tuple(tokens.shape)}")
    tokens = tokens.to(model_device(model))
    with torch.no_grad():
        logits = model(input_ids=tokens, **forward_kwargs(model)).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               tokens[:, 1:].reshape(-1)).item()


