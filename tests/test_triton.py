"""The Triton executor's own cases (the op tests in test_ops.py also run it, on CPU tensors under
the interpreter): capacity edges, both decoder-gradient scatters, determinism, the row sort and
the shared-memory prune of the encode; ahead of time, without a GPU, every kernel through the
real compiler for sm_90 and sm_80 (tests/triton_aot.py, once, in a subprocess); and, marked
``gpu``, the prune on a real device."""
import importlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import GPU_TOL, loss_and_grads_twice, make_params, make_x, params64, rel_err
from gsae_fast import GatedSAE, SparseActs, available_backends, backends, ops, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu = the Triton interpreter
pytestmark = pytest.mark.skipif("triton" not in available_backends(DEVICE),
                                reason="triton is not installed")


@pytest.fixture
def scatter():
    """Sets the grad W_dec scatter mode for one test and restores it after."""
    yield backends.set_scatter
    backends.set_scatter(None)


def dense_ref(x, p):
    x, p = x.double(), params64(p)
    pi_gate, _ = reference.pre_activations(x, *p.values())
    return reference.encode(x, *p.values()), pi_gate


def test_capacity_edges_are_exact():
    """A capacity equal to the largest row count, one less (overflow: re-run) and zero."""
    p, _ = make_params(21, 70, torch.float32, l0_frac=0.2, device=DEVICE)
    x = make_x((45, 21), torch.float32, device=DEVICE)
    f_ref, pi_ref = dense_ref(x, p)
    true_max = int((pi_ref > 0).sum(-1).max())
    for capacity in (true_max, true_max - 1, 0):
        acts = ops.gated_encode(x, *p.values(), capacity=capacity, backend="triton")
        assert acts.max_count == true_max and acts.capacity == true_max, capacity
        assert rel_err(acts.to_dense(), f_ref) < 1e-5


@pytest.mark.parametrize("mode", ["grouped", "atomic"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_decoder_gradient_scatter_modes(scatter, mode, dtype):
    scatter(mode)
    p, W_dec = make_params(19, 83, dtype, l0_frac=0.3, device=DEVICE)
    x = make_x((41, 19), dtype, device=DEVICE)
    acts = ops.gated_encode(x, *p.values(), backend="triton")
    W = W_dec.clone().requires_grad_()
    val = acts.f.detach().requires_grad_()
    a = SparseActs(acts.idx, val, acts.pi_gate, acts.counts, acts.d_sae)
    g = make_x((41, 19), dtype, seed=5, device=DEVICE)
    (ops.sparse_decode(a, W, backend="triton") * g).sum().backward()
    dense = acts.to_dense(torch.float64)
    grad_W_ref = dense.t() @ g.double()
    grad_val_ref = (g.double() @ W_dec.double().t()).gather(1, acts.idx.long()) * acts.mask()
    tol = {torch.float64: 1e-13, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    assert rel_err(W.grad, grad_W_ref) < tol
    assert rel_err(val.grad, grad_val_ref) < tol


def test_one_scatter_setting_derived_from_deterministic_mode(scatter, monkeypatch):
    """"auto" follows torch's deterministic mode; an explicit mode wins outside it; deterministic
    mode always gets the grouped scatter; the environment variable is the default."""
    before = torch.are_deterministic_algorithms_enabled()
    monkeypatch.delenv("GSAE_FAST_SCATTER", raising=False)
    try:
        for det in (False, True):
            torch.use_deterministic_algorithms(det)
            scatter(None)
            assert backends.deterministic_scatter() is det
            scatter("auto")
            assert backends.deterministic_scatter() is det
            scatter("atomic")
            assert backends.deterministic_scatter() is det
            scatter("grouped")
            assert backends.deterministic_scatter() is True
        torch.use_deterministic_algorithms(False)
        scatter(None)
        monkeypatch.setenv("GSAE_FAST_SCATTER", "grouped")
        assert backends.deterministic_scatter() is True
        scatter("atomic")  # the call wins over the environment
        assert backends.deterministic_scatter() is False
    finally:
        torch.use_deterministic_algorithms(before)
    with pytest.raises(ValueError, match="scatter mode"):
        scatter("fast")
    scatter(None)
    monkeypatch.setenv("GSAE_FAST_SCATTER", "fast")
    with pytest.raises(ValueError, match="GSAE_FAST_SCATTER"):
        backends.deterministic_scatter()


def test_grouped_backward_is_bitwise_reproducible():
    # "unit": decoder_norm's per-feature sum is torch's index_add, atomic on CUDA
    runs = loss_and_grads_twice("triton", (40, 24, 100), device=DEVICE, sparsity="unit")
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_module_runs_on_triton():
    sae = GatedSAE(16, 64, backend="triton", device=DEVICE)
    ref = GatedSAE(16, 64, backend="reference", device=DEVICE)
    ref.load_state_dict(sae.state_dict())
    x = torch.randn(33, 16, device=DEVICE)
    assert rel_err(sae(x), ref(x)) < 1e-5
    out = sae.loss(x, 0.1)
    out.loss.backward()
    assert all(p.grad is not None for p in sae.parameters())


# --------------------------------------------------------------------------------------------
# On a GPU: real sizes, fp32 / bf16 / fp16, against the float64 reference on the same inputs.
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,m,transposed", [(0, 5, False), (6, 0, False), (7, 13, False),
                                            (3000, 5, True),
                                            (300, 200, False)])
def test_vec_mat_matches_torch(n, m, transposed):
    """The GEMV behind b_dec @ W_enc and W_enc @ grad: split reductions, any strides."""
    from gsae_fast.kernels import _common
    g = torch.Generator().manual_seed(0)
    A = torch.randn(m, n, generator=g, dtype=torch.float64).t() if transposed else \
        torch.randn(n, m, generator=g, dtype=torch.float64)
    v = torch.randn(n, generator=g, dtype=torch.float64)
    A, v = A.to(DEVICE), v.to(DEVICE)
    out = _common.vec_mat(v, A)
    assert out.shape == (m,) and out.dtype == torch.float64
    assert torch.allclose(out, v @ A, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# The encode's row sort and shared-memory prune (plain torch and Python: no kernel runs).
# --------------------------------------------------------------------------------------------

def _encode_module():
    # the package exports the function gated_encode under the module's name
    return importlib.import_module("gsae_fast.kernels.gated_encode")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [0, 1, 2, 7])
def test_row_sort_zeroes_padding_whatever_the_buffers_held(dtype, K):
    """Active slots in scrambled order, padding slots full of garbage (NaN, inf, huge values,
    indices out of range): the sort orders the active slots by feature, keeps each slot's
    (feature, f, pi_gate) together, and leaves exactly 0 in every padding slot."""
    _sort_rows = _encode_module()._sort_rows
    g = torch.Generator().manual_seed(K)
    B, d_sae = 9, 50
    counts = torch.tensor([0, 1, K, K + 3, max(K - 1, 0), 2, K, 0, 1], dtype=torch.int32)[:B]
    idx = torch.randint(-2 ** 31, 2 ** 31 - 1, (B, K), generator=g).to(torch.int32)
    junk = torch.tensor([float("nan"), float("inf"), -float("inf"), 3e38, -1.0, 7.0], dtype=dtype)
    f = junk[torch.randint(0, len(junk), (B, K), generator=g)]
    pi = junk[torch.randint(0, len(junk), (B, K), generator=g)]
    for b in range(B):
        n = min(int(counts[b]), K)
        feats = torch.randperm(d_sae, generator=g)[:n].to(torch.int32)  # distinct, any order
        idx[b, :n] = feats
        f[b, :n] = feats.to(dtype) * 0.5 + b
        pi[b, :n] = -feats.to(dtype) - 1
    idx, f, pi, counts = (t.to(DEVICE) for t in (idx, f, pi, counts))
    s_idx, s_f, s_pi = _sort_rows(idx, f, pi, counts, d_sae)
    assert s_idx.dtype == torch.int32 and s_f.dtype == dtype and s_pi.dtype == dtype
    valid = torch.arange(K, device=DEVICE) < counts[:, None]
    assert (s_idx[~valid] == 0).all() and (s_f[~valid] == 0).all() and (s_pi[~valid] == 0).all()
    for b in range(B):
        n = min(int(counts[b]), K)
        got = s_idx[b, :n]
        assert torch.equal(got, idx[b, :n].sort().values)
        assert torch.equal(s_f[b, :n], got.to(dtype) * 0.5 + b)
        assert torch.equal(s_pi[b, :n], -got.to(dtype) - 1)


class _FakeCudaTensor:
    """What the prune reads of a CUDA tensor argument, without a GPU."""
    is_cuda = True
    device = torch.device("cuda", 0)

    def __init__(self, dtype):
        self.dtype = dtype

    def data_ptr(self):
        return 1 << 20


def _encode_named_args(dtype, d_in=256, x=None):
    """The encode kernel's non-constexpr arguments, by name, as the autotuner hands them over."""
    enc = _encode_module()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    types = dict(c_ptr=acc, f_ptr=acc, pi_ptr=acc, idx_ptr=torch.int32, counts_ptr=torch.int32,
                 status_ptr=torch.int32)
    ints = dict(B=1000, d_in=d_in, d_sae=4096, K=64)
    names = [n for n in enc._gated_encode_kernel.fn.arg_names
             if n not in ("ACC", "PRECISION", "UPCAST", "BM", "BN", "BK", "GROUP_M", "EPI_N")]
    out = {n: ints[n] if n in ints else _FakeCudaTensor(types.get(n, dtype)) for n in names}
    if x is not None:
        out["x_ptr"] = x
    return out


def _config_key(meta, num_warps, num_stages):
    return (meta["BM"], meta["BN"], meta["BK"], num_warps, num_stages)


@pytest.fixture
def prune(monkeypatch):
    """The encode's prune with fake compiled sizes and a fake device limit: returns
    ``run(sizes, limit, dtype, **kw) -> kept configs`` and the list of compile calls."""
    enc = _encode_module()
    monkeypatch.setattr(enc, "_prune_cache", {})
    calls = []

    def run(sizes, limit, dtype=torch.bfloat16, configs=None, clear=True, **named):
        """The prune for one call; ``clear``: forget earlier decisions (the limit is per device,
        and a fake one changes)."""
        configs = configs or enc._gpu_configs()
        if clear:
            enc._prune_cache.clear()

        def compiled(config, args, kwargs):
            assert "grid" not in kwargs and "warmup" not in kwargs and kwargs["UPCAST"] is False
            assert len(args) == 15  # the positional arguments, in order
            calls.append((config, dtype))
            return sizes[_config_key(config.kwargs, config.num_warps, config.num_stages)]

        monkeypatch.setattr(enc, "_compiled_shared", compiled)
        monkeypatch.setattr(enc, "_shared_memory_limit", lambda device: limit)
        return enc._fits_in_shared_memory(configs, _encode_named_args(dtype, **named),
                                          grid=lambda meta: (1,), warmup=False,
                                          ACC="fp32", PRECISION="tf32", UPCAST=False)

    return run, calls


def test_prune_keeps_exactly_the_configs_whose_compiled_size_fits(prune):
    enc = _encode_module()
    run, calls = prune
    configs = enc._gpu_configs()
    keys = [_config_key(c.kwargs, c.num_warps, c.num_stages) for c in configs]
    sizes = {k: 40_000 * (i % 5 + 1) for i, k in enumerate(keys)}  # 40 kB .. 200 kB
    for limit in (40_000, 101_376, 166_912, 232_448):
        expect = [c for c in configs if sizes[_config_key(c.kwargs, c.num_warps,
                                                          c.num_stages)] <= limit]
        calls.clear()
        assert run(sizes, limit, dtype=torch.float16) == expect
        assert len(calls) == len(configs)  # every config compiled once, for this call's types
    # None fits: the smallest; an unknown size (a cache hook compiled it) counts as fitting.
    assert run({**sizes, keys[3]: 1}, 0) == [configs[3]]
    assert run({**sizes, keys[5]: None}, 0) == [configs[5]]
    # a config the compiler rejects for resources (size inf) is dropped
    assert run({**sizes, keys[5]: float("inf")}, 10 ** 6) == configs[:5] + configs[6:]


def test_prune_compiles_once_per_key_and_never_on_cpu(prune):
    run, calls = prune
    enc = _encode_module()
    configs = enc._gpu_configs()
    sizes = {_config_key(c.kwargs, c.num_warps, c.num_stages): 50_000 for c in configs}
    kept = run(sizes, 101_376)
    n = len(calls)
    assert n == len(configs) and kept == configs
    # the same types and alignments (d_in 256 and 512: both multiples of 16): cached
    assert run(sizes, 101_376, clear=False) is kept
    assert run(sizes, 101_376, clear=False, d_in=512) is kept
    assert len(calls) == n
    # another dtype or alignment: compiled
    run(sizes, 101_376, clear=False, dtype=torch.float32)
    run(sizes, 101_376, clear=False, d_in=100)
    assert len(calls) == 3 * n
    # CPU tensors (the interpreter): every config, nothing compiled
    assert run(sizes, 0, configs=configs, x=torch.zeros(2, 2)) is configs
    assert len(calls) == 3 * n


# --------------------------------------------------------------------------------------------
# Ahead of time, without a GPU: every kernel and autotune configuration through the real
# compiler (PTX and cubin) for sm_90 and sm_80 in fp32, bf16, fp16 and fp64. One subprocess
# (tests/triton_aot.py, minutes) writes a JSON report that the tests below read.
# --------------------------------------------------------------------------------------------

AOT_ARCHS = (90, 80)
AOT_DTYPES = ("fp32", "bf16", "fp16", "fp64")
# opt-in shared memory per block: sm_86/sm_89 (the smallest), A100, H100/H200
SHARED_LIMITS = (101_376, 166_912, 232_448)
aot = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="ahead-of-time compile check for CI machines without a GPU (minutes of compiling): "
           "a GPU run compiles and runs the kernels for real")


@pytest.fixture(scope="module")
def aot_report(tmp_path_factory):
    """One run of tests/triton_aot.py (no TRITON_INTERPRET): (completed process, records)."""
    script = os.path.join(os.path.dirname(__file__), "triton_aot.py")
    path = tmp_path_factory.mktemp("triton_aot") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, script, "--json", str(path)]
    for arch in AOT_ARCHS:
        cmd += ["--arch", str(arch)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    records = json.loads(path.read_text())["records"] if path.exists() else []
    return res, records


def _encode_sizes(records, arch, dtype):
    return {_config_key(r["meta"], r["num_warps"], r["num_stages"]): r["shared"]
            for r in records if r["kernel"] == "gated_encode" and r["arch"] == arch
            and r["dtype"] == dtype and r["ok"]}


@aot
def test_kernels_compile_for_hopper_and_ampere(aot_report):
    """Every kernel and autotune configuration goes through the real Triton compiler (to PTX and
    cubin, ahead of time: no GPU needed) for sm_90 and sm_80 in fp32, bf16, fp16 and fp64."""
    res, records = aot_report
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert all(r["ok"] for r in records)
    assert len(records) >= len(AOT_ARCHS) * len(AOT_DTYPES) * 24  # archs x dtypes x configs


@aot
def test_atomics_compile_relaxed_without_memory_fences(aot_report):
    """The slot reservation and status flag of the encode and the atomic grad-W_dec scatter are
    relaxed atomics: no acq_rel atomic and no memory fence in any kernel's PTX, and in the SASS
    no GPU-scope MEMBAR, ERRBAR or L1 invalidation (CCTL.IVALL) around them."""
    _, records = aot_report
    bad = []
    for r in (r for r in records if r["ok"]):
        label = f"sm_{r['arch']} {r['dtype']} {r['kernel']} {r['meta']}"
        if r["ptx_fences"]:
            bad.append(f"{label}: fences {r['ptx_fences']}")
        bad += [f"{label}: {op}" for op in r["ptx_atomics"]
                if ".relaxed." not in op or any(s in op for s in ("acq", "release", ".sc."))]
        bad += [f"{label}: SASS {op}" for op in (r.get("sass") or {})
                if (op.startswith("MEMBAR") and ("GPU" in op or "SYS" in op))
                or op.startswith("ERRBAR") or op.startswith("CCTL.IVALL")]
    assert not bad, "\n".join(bad[:20])
    for arch in AOT_ARCHS:
        for dt in AOT_DTYPES:
            ops = {k: set().union(*(r["ptx_atomics"] for r in records
                                    if r["ok"] and r["kernel"] == k and r["arch"] == arch
                                    and r["dtype"] == dt))
                   for k in ("gated_encode", "scatter_atomic")}
            acc = "f64" if dt == "fp64" else "f32"
            assert any(".add.u32" in op for op in ops["gated_encode"]), (arch, dt, ops)
            assert any(".max.s32" in op for op in ops["gated_encode"]), (arch, dt, ops)
            # sm_90 vectorises the scatter's atomics (add.v4.f32)
            assert any(re.search(rf"\.add(\.v\d)?\.{acc}$", op) for op in ops["scatter_atomic"]), \
                (arch, dt, ops)


@aot
def test_encode_has_a_config_that_fits_every_gpu_in_every_dtype(aot_report):
    """The portable tile compiles to at most 99 KB (the smallest opt-in limit of sm_80+ GPUs:
    sm_86/sm_89) of shared memory for sm_80 and sm_90 in every dtype, fp64 included."""
    enc = _encode_module()
    _, records = aot_report
    portable = enc.PORTABLE_SHAPE
    for arch in AOT_ARCHS:
        for dt in AOT_DTYPES:
            sizes = _encode_sizes(records, arch, dt)
            assert sizes.get(portable, 1 << 30) <= enc.MIN_SHARED_OPTIN == 101_376, \
                (arch, dt, sizes)


@aot
def test_prune_on_the_compiled_sizes(aot_report, prune):
    """With each arch's real compiled sizes (from the report) and each GPU's limit, the prune
    keeps exactly the configs that fit, and always at least one."""
    enc = _encode_module()
    _, records = aot_report
    run, _ = prune
    torch_dtype = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16,
                       fp64=torch.float64)
    for arch in AOT_ARCHS:
        for dt in AOT_DTYPES:
            # (the configs the register rule leaves for this dtype: the ones compiled)
            configs = [c for c in enc._gpu_configs() if enc.fits_registers(c, torch_dtype[dt])]
            sizes = _encode_sizes(records, arch, dt)
            assert len(sizes) == len(configs), (arch, dt)
            for limit in SHARED_LIMITS:
                kept = run(sizes, limit, dtype=torch_dtype[dt], configs=configs)
                assert kept == [c for c in configs if sizes[_config_key(
                    c.kwargs, c.num_warps, c.num_stages)] <= limit], (arch, dt, limit)
                assert kept


@aot
def test_encode_is_spill_free_with_wgmma_on_hopper(aot_report):
    """The encode compiled for sm_90 (as the JIT specialises it): no autotune configuration it
    can pick spills registers (no STL/LDL in the SASS, no stack) in bf16, fp16 or fp32, and every
    16-bit one runs its GEMM on wgmma (HGMMA). The epilogue works in subtiles of EPI_N columns
    for this, and fp32 keeps the tiles with at most 64 accumulators per thread
    (kernels/gated_encode.py); bench/gpu_static.py tabulates every kernel."""
    _, records = aot_report
    enc = _encode_module()
    for dt, torch_dt in (("bf16", torch.bfloat16), ("fp16", torch.float16),
                         ("fp32", torch.float32)):
        recs = [r for r in records if r["ok"] and r["kernel"] == "gated_encode"
                and r["arch"] == 90 and r["dtype"] == dt]
        fitting = [c for c in enc._gpu_configs() if enc.fits_registers(c, torch_dt)]
        assert len(recs) == len(fitting) >= (8 if torch_dt.itemsize == 2 else 4), dt
        for r in recs:
            res = r["resources"]
            if res is None:
                pytest.skip("triton ships no cuobjdump")
            label = (dt, r["meta"], r["num_warps"], res)
            assert res["spills"] == 0 and res["stack"] == 0, label
            if torch_dt.itemsize == 2:
                assert res["mma"].get("HGMMA"), label


def test_fp32_keeps_the_tiles_with_at_most_64_accumulators_per_thread(monkeypatch):
    """The register rule of the autotuner's prune, and that the prune applies it only to CUDA
    tensors and never leaves nothing."""
    enc = _encode_module()
    configs = enc._gpu_configs()
    per_thread = {str(c): c.kwargs["BM"] * c.kwargs["BN"] // (32 * c.num_warps) for c in configs}
    for dtype in (torch.float32, torch.float64):
        kept = [c for c in configs if enc.fits_registers(c, dtype)]
        assert kept and all(per_thread[str(c)] <= 64 for c in kept)
        assert len(kept) == sum(v <= 64 for v in per_thread.values())
        assert any(_config_key(c.kwargs, c.num_warps, c.num_stages) == enc.PORTABLE_SHAPE
                   for c in kept)
    for dtype in (torch.bfloat16, torch.float16):
        assert all(enc.fits_registers(c, dtype) for c in configs)
    # CUDA tensors: the register rule, then the shared-memory prune on what is left
    monkeypatch.setattr(enc, "_fits_in_shared_memory", lambda cs, named, **kw: cs)
    assert enc._prune(configs, _encode_named_args(torch.float32)) == \
        [c for c in configs if per_thread[str(c)] <= 64]
    assert enc._prune(configs, _encode_named_args(torch.bfloat16)) == configs
    # CPU tensors (the interpreter): nothing pruned
    named = _encode_named_args(torch.float32, x=torch.zeros(2, 2))
    assert enc._prune(configs, named) is configs


# --------------------------------------------------------------------------------------------
# On a GPU: the prune compiles for the device's own target and the launches reuse it.
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_prune_compiles_once_for_the_device(monkeypatch, dtype):
    """On the device: the prune compiles every config with the call's own types (metadata.shared
    of the real kernel), keeps exactly those within the device's opt-in limit (the portable tile
    among them), and the autotuner's benchmark and the launch reuse those compilations."""
    enc = _encode_module()
    sizes = {}
    compiled = enc._compiled_shared

    def spy(config, args, kwargs):
        sizes[str(config)] = compiled(config, args, kwargs)
        return sizes[str(config)]

    monkeypatch.setattr(enc, "_compiled_shared", spy)
    monkeypatch.setattr(enc, "_prune_cache", {})
    # sizes no other test uses: a fresh autotuning key and specialisation
    d_in, d_sae = {torch.float64: (208, 1040), torch.float32: (224, 1056),
                   torch.bfloat16: (240, 1072)}[dtype]
    p, _ = make_params(d_in, d_sae, dtype, l0_frac=0.05, device="cuda")
    x = make_x((300, d_in), dtype, device="cuda")
    jit = enc._gated_encode_kernel.fn
    kernels = jit.device_caches[torch.cuda.current_device()][0]
    before = len(kernels)
    f, pi_gate, idx, counts, status = enc.gated_encode(x, *p.values(), capacity=128)
    configs = [c for c in enc._gated_encode_kernel.configs if enc.fits_registers(c, dtype)]
    assert set(sizes) == {str(c) for c in configs}
    limit = torch.cuda.get_device_properties(x.device).shared_memory_per_block_optin
    (kept,) = enc._prune_cache.values()
    assert kept == [c for c in configs if sizes[str(c)] <= limit]
    assert any(_config_key(c.kwargs, c.num_warps, c.num_stages) == enc.PORTABLE_SHAPE
               for c in kept)
    assert len(kernels) - before <= len(configs)  # benchmark + launch compiled nothing new
    # and the tuned launch is right: padding zeroed, the dense activations as the reference's
    valid = torch.arange(idx.shape[1], device="cuda") < counts[:, None]
    assert int(counts.max()) <= 128 and not (idx[~valid].any() or f[~valid].any())
    dense = torch.zeros(x.shape[0], d_sae, dtype=torch.float64, device="cuda")
    dense.scatter_add_(1, idx.long(), f.double())
    tol = GPU_TOL[dtype]
    assert rel_err(dense, dense_ref(x, p)[0]) < tol
