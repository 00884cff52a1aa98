"""The ops (gsae_fast.ops) on every CPU executor against the dense float64 reference."""
import pytest
import torch

from conftest import (
    CPU_BACKENDS,
    DTYPES,
    LOSS_TOL,
    loss_and_grads_twice,
    make_params,
    make_x,
    params64,
    rel_err,
)
from gsae_fast import SparseActs, ops, reference

# (B, d_in, d_sae): empty and single-row batches, odd sizes, and sizes that cross the CPU
# kernel's row tiles (128) and feature tiles (~200 features at d_in = 600).
SHAPES = [(0, 7, 13), (1, 7, 13), (37, 19, 53), (150, 600, 500)]


def encode_ref(x, p):
    """Reference f and pi_gate in float64 on the same (rounded) inputs."""
    x, p = x.double(), params64(p)
    pi_gate, _ = reference.pre_activations(x, *p.values())
    return reference.encode(x, *p.values()), pi_gate


def check_sparse_invariants(acts: SparseActs):
    mask = acts.mask()
    idx = acts.idx.long()
    assert (acts.counts <= acts.capacity).all()
    # sorted, strictly increasing on the active slots
    if acts.capacity > 1:
        both = mask[..., 1:] & mask[..., :-1]
        assert ((idx[..., 1:] > idx[..., :-1]) | ~both).all()
    # padding is zero
    assert (idx[~mask] == 0).all() and (acts.f[~mask] == 0).all()
    assert (acts.pi_gate[~mask] == 0).all()
    assert (acts.pi_gate[mask] > 0).all() and (acts.f[mask] >= 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64] + DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_encode_matches_reference(backend, dtype, shape):
    B, d_in, d_sae = shape
    p, _ = make_params(d_in, d_sae, dtype)
    x = make_x((B, d_in), dtype)
    acts = ops.gated_encode(x, *p.values(), capacity=4, backend=backend)
    check_sparse_invariants(acts)
    f_ref, pi_ref = encode_ref(x, p)
    assert torch.equal(acts.counts.long(), (pi_ref > 0).sum(-1))  # the same gates, exactly
    if B:
        tol = 1e-12 if dtype == torch.float64 else 1e-5  # the kernels accumulate in fp32
        assert rel_err(acts.to_dense(), f_ref) < tol
        assert rel_err(acts.to_dense(values="pi_gate"), torch.relu(pi_ref)) < tol
    assert acts.f.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_capacity_overflow_is_exact(backend):
    p, _ = make_params(24, 300, torch.float32, l0_frac=0.5)
    x = make_x((40, 24), torch.float32)
    full = ops.gated_encode(x, *p.values(), capacity=300, backend=backend)
    assert full.max_count > 100
    for cap in (0, 1, 7, full.max_count - 1, full.max_count):  # ..., one short, exact
        acts = ops.gated_encode(x, *p.values(), capacity=cap, backend=backend)
        assert acts.capacity == full.max_count  # re-run with the exact capacity (or none)
        assert torch.equal(acts.counts, full.counts)
        assert torch.equal(acts.to_dense(), full.to_dense())
    # The raw op reports true counts past the capacity and never writes past it.
    f, pi, idx, counts, status = torch.ops.gsae_fast.gated_encode(
        x, *p.values(), 5, backend)
    assert idx.shape == (40, 5)
    assert torch.equal(counts, full.counts) and status[0].item() == full.max_count
    # Which 5 of a longer row are kept is unspecified (GPU tiles finish in any order; the
    # wrapper re-runs anyway): they are 5 distinct active features of that row, sorted.
    active = full.to_dense(values="pi_gate") > 0
    assert active.gather(1, idx.long()).all()
    assert (idx[:, 1:] > idx[:, :-1]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("l0", ["none", "all"])
def test_l0_extremes(backend, l0):
    d_in, d_sae = 11, 37
    p, W_dec = make_params(d_in, d_sae, torch.float32, l0_frac=None)
    p["b_gate"] = torch.full((d_sae,), -100.0 if l0 == "none" else 100.0)
    x = make_x((9, d_in), torch.float32)
    acts = ops.gated_encode(x, *p.values(), backend=backend)
    assert acts.counts.tolist() == [0 if l0 == "none" else d_sae] * 9
    x_hat = ops.sparse_decode(acts, W_dec, p["b_dec"], backend=backend)
    f_ref, _ = encode_ref(x, p)
    assert torch.allclose(x_hat.double(), f_ref @ W_dec.double() + p["b_dec"].double(), atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64] + DTYPES)
@pytest.mark.parametrize("values", ["f", "pi_gate"])
def test_decode_forward_backward(backend, dtype, values):
    d_in, d_sae = 29, 71
    p, W_dec = make_params(d_in, d_sae, dtype)
    x = make_x((3, 5, d_in), dtype)  # leading dims
    acts = ops.gated_encode(x, *p.values(), backend=backend)
    val = getattr(acts, values).detach().requires_grad_()
    acts.f, acts.pi_gate = (val, acts.pi_gate) if values == "f" else (acts.f, val)
    W = W_dec.clone().requires_grad_()
    bias = p["b_dec"].clone().requires_grad_()
    out = ops.sparse_decode(acts, W, bias, values=values, backend=backend)
    assert out.shape == (3, 5, d_in) and out.dtype == dtype
    g = make_x(out.shape, dtype, seed=7)
    (out.double() * g.double()).sum().backward()

    val64 = val.detach().clone().requires_grad_()
    W64 = W_dec.double().requires_grad_()
    b64 = p["b_dec"].double().requires_grad_()
    dense = torch.zeros(*acts.counts.shape, d_sae, dtype=torch.float64).scatter_add(
        -1, acts.idx.long(), torch.where(acts.mask(), val64, 0).double())
    ref = dense @ W64 + b64
    (ref * g.double()).sum().backward()
    tol = RTOL_OUT[dtype]
    assert rel_err(out, ref) < tol
    assert rel_err(W.grad, W64.grad) < tol
    assert rel_err(bias.grad, b64.grad) < tol
    assert rel_err(val.grad, val64.grad) < (1e-12 if dtype == torch.float64 else 1e-5)
    assert (val.grad[~acts.mask()] == 0).all()


# Outputs stored in the input dtype carry its rounding (fp32 accumulation inside).
RTOL_OUT = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def margin_params(d_in, d_sae, B, seed=0):
    """float64 parameters and x with every pi_gate and active pi_mag at least 1e-2 from zero,
    so that finite differences never cross the Heaviside or the relu."""
    for s in range(seed, seed + 200):
        p, W_dec = make_params(d_in, d_sae, torch.float64, l0_frac=0.4, seed=s)
        x = make_x((B, d_in), torch.float64, seed=s + 1000)
        pi_gate, pi_mag = reference.pre_activations(x, *p.values())
        if pi_gate.abs().min() > 1e-2 and pi_mag[pi_gate > 0].abs().min() > 1e-2:
            return p, W_dec, x
    raise AssertionError("no margin found")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("sparsity", ["unit", "decoder_norm"])
@pytest.mark.parametrize("aux", ["frozen", "shared", "none"])
def test_loss_gradcheck(backend, sparsity, aux):
    p, W_dec, x = margin_params(5, 9, 4)
    inputs = [x.requires_grad_(), p["W_enc"], W_dec, p["b_dec"], p["b_gate"], p["r_mag"],
              p["b_mag"]]
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    # aux="frozen" stops the gradient of the aux term into W_dec and b_dec on purpose, so only
    # the other inputs have the true derivative there; W_dec and b_dec are held fixed.
    free = [0, 1, 4, 5, 6] if aux == "frozen" else list(range(7))

    def fn(*free_args):
        args = list(inputs)
        for i, a in zip(free, free_args):
            args[i] = a
        return ops.gated_sae_loss(*args, 0.3, sparsity=sparsity, aux=aux, backend=backend).loss

    assert torch.autograd.gradcheck(fn, [inputs[i] for i in free], eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_encode_decode_gradcheck(backend):
    p, W_dec, x = margin_params(6, 10, 5, seed=3)
    inputs = [t.detach().clone().requires_grad_() for t in [x, *p.values()]]

    def fn(x, *params):
        acts = ops.gated_encode(x, *params, capacity=10, backend=backend)
        return acts.f, acts.pi_gate

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)

    acts = ops.gated_encode(x, *p.values(), backend=backend)
    val = acts.f.detach().requires_grad_()
    Wd = W_dec.detach().requires_grad_()
    b = p["b_dec"].detach().requires_grad_()

    def dec(val, Wd, b):
        a = SparseActs(acts.idx, val, acts.pi_gate.detach(), acts.counts, acts.d_sae)
        return ops.sparse_decode(a, Wd, b, backend=backend)

    assert torch.autograd.gradcheck(dec, [val, Wd, b], eps=1e-6, atol=1e-7)


SPARSE_BACKENDS = [b for b in CPU_BACKENDS if b != "reference"]  # executors of the sparse path
# The loss with backend="reference" is the dense math in the input dtype: in bf16 its GEMM rounds
# z to bf16 and flips gates near zero, so only the sparse executors (fp32 accumulation) are held
# to the float64 oracle's exact gates in bf16; test_dense_bf16_loss_is_close covers the other.
LOSS_CASES = [(b, d) for b in CPU_BACKENDS for d in (torch.float64, torch.float32, torch.bfloat16)
              if not (b == "reference" and d == torch.bfloat16)]


@pytest.mark.parametrize("backend,dtype", LOSS_CASES)
@pytest.mark.parametrize("sparsity", ["unit", "decoder_norm"])
@pytest.mark.parametrize("aux", ["frozen", "shared", "none"])
def test_loss_matches_reference(backend, dtype, sparsity, aux):
    d_in, d_sae, B = 23, 150, 64
    p, W_dec = make_params(d_in, d_sae, dtype)
    x = make_x((B, d_in), dtype)
    names = ["W_enc", "W_dec", "b_dec", "b_gate", "r_mag", "b_mag"]

    def run(fn, cast):
        t = {k: cast(v).requires_grad_() for k, v in dict(p, W_dec=W_dec).items()}
        out = fn(cast(x), *[t[k] for k in names], 0.05, sparsity=sparsity, aux=aux)
        out.loss.backward()
        return out, {k: t[k].grad for k in names}

    out, grads = run(lambda *a, **k: ops.gated_sae_loss(*a, **k, backend=backend),
                     lambda v: v.clone())
    ref, ref_grads = run(reference.gated_sae_loss, lambda v: v.double())
    # Low-precision inputs: the kernels accumulate in fp32 but x_hat is rounded to the dtype.
    tol = LOSS_TOL[dtype]
    for field in ("loss", "mse", "sparsity", "aux"):
        assert rel_err(getattr(out, field), getattr(ref, field)) < tol, field
    assert out.l0.item() == ref.l0.item()
    for k in names:
        assert rel_err(grads[k], ref_grads[k]) < (tol * 5), k


def test_dense_bf16_loss_is_close():
    p, W_dec = make_params(23, 150, torch.bfloat16)
    x = make_x((64, 23), torch.bfloat16)
    args = (x, p["W_enc"], W_dec, p["b_dec"], p["b_gate"], p["r_mag"], p["b_mag"], 0.05)
    dense = ops.gated_sae_loss(*args, backend="reference")
    ref = reference.gated_sae_loss(*[a.double() if torch.is_tensor(a) else a for a in args])
    assert rel_err(dense.loss, ref.loss) < 2e-2
    assert abs(dense.l0.item() - ref.l0.item()) < 0.02 * ref.l0.item()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_frozen_aux_does_not_train_decoder(backend):
    """With aux="frozen" the decoder gradient is that of mse + sparsity only."""
    p, W_dec = make_params(13, 40, torch.float64)
    x = make_x((20, 13))
    grads = {}
    for aux in ("frozen", "none"):
        W = W_dec.clone().requires_grad_()
        out = ops.gated_sae_loss(x, p["W_enc"], W, p["b_dec"], p["b_gate"], p["r_mag"],
                                 p["b_mag"], 0.1, aux=aux, backend=backend)
        out.loss.backward()
        grads[aux] = W.grad
    assert torch.allclose(grads["frozen"], grads["none"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", [b for b in ("cpu", "cuda_emulated") if b in CPU_BACKENDS])
def test_compiled_kernels_are_deterministic(backend):
    # crosses the CPU kernel's row and feature tiles, and many CUDA blocks
    runs = loss_and_grads_twice(backend, (300, 40, 700))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_loss_never_reads_padding(backend, monkeypatch):
    """Whatever an executor leaves in the padding slots (NaN, indices out of range), the loss and
    its gradients are those of clean padding."""
    from gsae_fast import backends
    p, W_dec = make_params(13, 300, torch.float64, l0_frac=0.05)  # capacity 40: the sparse path
    x = make_x((25, 13))
    real = backends.executor

    def run():
        t = {k: v.clone().requires_grad_() for k, v in dict(p, W_dec=W_dec).items()}
        out = ops.gated_sae_loss(x, t["W_enc"], t["W_dec"], t["b_dec"], t["b_gate"], t["r_mag"],
                                 t["b_mag"], 0.1, sparsity="decoder_norm", aux="shared",
                                 backend=backend, capacity=40)
        out.loss.backward()
        assert out.acts is not None
        return [out.loss.detach()] + [v.grad for v in t.values()]

    class Dirty:  # the executor with garbage written into every padding slot of the encode
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def gated_encode(self, *args):
            f, pi, idx, counts, status = self.inner.gated_encode(*args)
            pad = ~(torch.arange(idx.shape[1]) < counts.unsqueeze(1))
            assert pad.any()
            return (f.masked_fill(pad, float("nan")), pi.masked_fill(pad, float("nan")),
                    idx.masked_fill(pad, 10_000), counts, status)

    clean = run()
    monkeypatch.setattr(backends, "executor", lambda be: Dirty(real(be)))
    dirty = run()
    for a, b in zip(clean, dirty):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_dense_switch_gives_the_same_loss(backend):
    p, W_dec = make_params(10, 64, torch.float64, l0_frac=0.5)
    x = make_x((30, 10))
    args = (x, p["W_enc"], W_dec, p["b_dec"], p["b_gate"], p["r_mag"], p["b_mag"], 0.1)
    sparse = ops.gated_sae_loss(*args, backend=backend, capacity=8)
    dense = ops.gated_sae_loss(*args, backend=backend, capacity=64)  # > DENSE_SWITCH_FRACTION
    assert sparse.acts is not None and dense.acts is None
    assert sparse.max_count == dense.max_count
    assert torch.allclose(sparse.loss, dense.loss, rtol=1e-12)


def test_next_capacity():
    assert ops.next_capacity(0, 1000) == 16
    assert ops.next_capacity(64, 1000) >= 80
    assert ops.next_capacity(64, 1000) % 16 == 0
    assert ops.next_capacity(990, 1000) == 1000


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    p, W_dec, x = margin_params(6, 10, 5, seed=3)
    p = {k: v.float().requires_grad_() for k, v in p.items()}
    x = x.float()
    torch.library.opcheck(torch.ops.gsae_fast.gated_encode.default,
                          (x, *p.values(), 10, backend))
    f, pi, idx, counts, _ = torch.ops.gsae_fast.gated_encode(x, *p.values(), 10, backend)
    W = W_dec.float().requires_grad_()
    b = p["b_dec"].detach().clone().requires_grad_()
    torch.library.opcheck(torch.ops.gsae_fast.sparse_decode.default,
                          (idx, f.detach().requires_grad_(), counts, W, b, backend))
    torch.library.opcheck(torch.ops.gsae_fast.sparse_decode_backward.default,
                          (torch.randn(5, 6), idx, f.detach(), counts, W.detach(), True, True,
                           True, backend))
    per_slot = torch.randn(4, *f.shape) * ops.slot_mask(idx, counts)
    torch.library.opcheck(torch.ops.gsae_fast.encode_grad_scatter.default,
                          (x, p["b_dec"].detach(), idx, counts, per_slot, 10, backend))


# ---------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_input_is_a_clear_error(backend):
    p, _ = make_params(8, 20, torch.float32)
    x = make_x((4, 8), torch.float32)
    x[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.gated_encode(x, *p.values(), backend=backend)
    x[2, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.gated_encode(x, *p.values(), backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_inputs(backend):
    p, W_dec = make_params(8, 20, torch.float32)
    x = make_x((4, 8), torch.float32)
    enc = lambda x, **kw: ops.gated_encode(x, *dict(p, **kw).values(), backend=backend)  # noqa
    with pytest.raises(ValueError, match=r"x must be \[..., d_in=8\]"):
        enc(make_x((4, 9), torch.float32))
    with pytest.raises(TypeError, match="dtype"):
        enc(x.double())
    with pytest.raises(TypeError, match="floating point"):
        enc(x.int())
    with pytest.raises(ValueError, match="b_gate must have shape"):
        enc(x, b_gate=torch.zeros(19))
    with pytest.raises(ValueError, match="one device"):
        enc(x.to("meta"))
    with pytest.raises(TypeError, match="torch.Tensor"):
        enc(x.numpy())
    with pytest.raises(ValueError, match="capacity"):
        ops.gated_encode(x, *p.values(), capacity=-1, backend=backend)
    acts = enc(x)
    with pytest.raises(ValueError, match="W_dec must be"):
        ops.sparse_decode(acts, W_dec[:-1], backend=backend)
    with pytest.raises(TypeError, match="SparseActs"):
        ops.sparse_decode(acts.to_dense(), W_dec, backend=backend)
    with pytest.raises(ValueError, match="sparsity"):
        ops.gated_sae_loss(x, p["W_enc"], W_dec, p["b_dec"], p["b_gate"], p["r_mag"],
                           p["b_mag"], 0.1, sparsity="l2", backend=backend)
    with pytest.raises(ValueError, match="aux"):
        ops.gated_sae_loss(x, p["W_enc"], W_dec, p["b_dec"], p["b_gate"], p["r_mag"],
                           p["b_mag"], 0.1, aux="detached", backend=backend)
    with pytest.raises(ValueError, match="no tokens"):
        ops.gated_sae_loss(x[:0], p["W_enc"], W_dec, p["b_dec"], p["b_gate"], p["r_mag"],
                           p["b_mag"], 0.1, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs_give_correct_output(backend):
    p, W_dec = make_params(8, 20, torch.float64)
    x = make_x((8, 6)).t()  # [6, 8], non-contiguous
    W_enc_t = p["W_enc"].t().contiguous().t()  # same values, column-major
    acts = ops.gated_encode(x, W_enc_t, p["b_dec"], p["b_gate"], p["r_mag"], p["b_mag"],
                            backend=backend)
    f_ref, _ = encode_ref(x, p)
    assert torch.allclose(acts.to_dense(), f_ref, rtol=1e-12, atol=1e-14)


def test_bad_backend_names(monkeypatch):
    p, _ = make_params(8, 20, torch.float32)
    x = make_x((4, 8), torch.float32)
    with pytest.raises(RuntimeError, match="unknown backend"):
        ops.gated_encode(x, *p.values(), backend="tpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU tensors are then not for Triton
    for be in ("cuda", "triton"):
        with pytest.raises(RuntimeError, match="CUDA tensors"):
            ops.gated_encode(x, *p.values(), backend=be)


def test_cpu_kernel_checks_corrupt_sparse_input():
    """The C++ kernels refuse indices and counts out of range instead of reading past memory."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("C++ extension not built")
    W = torch.randn(10, 4)
    idx = torch.tensor([[3, 12]], dtype=torch.int32)
    val = torch.ones(1, 2)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.gsae_fast_C.sparse_decode(idx, val, torch.tensor([2], dtype=torch.int32), W, None)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.gsae_fast_C.sparse_decode(idx, val, torch.tensor([3], dtype=torch.int32), W, None)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.gsae_fast_C.sparse_decode(idx, val.double(), torch.tensor([1], dtype=torch.int32),
                                            W, None)
