"""The CUDA executor's kernels and host code run on the CPU by the emulator (backend
"cuda_emulated", csrc/emu): the emulator's own model (warp collectives, barriers, shared memory,
the faults it must report), the memory checks (poisoned fresh buffers, guard pages), and the
deterministic paths bitwise equal under several schedules. The op tests of test_ops.py,
saes/test_gated.py and test_properties.py run this executor too (it is in CPU_BACKENDS), and
`make test` runs them again under another schedule."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import (
    CPU_BACKENDS,
    LOSS_TOL,
    default_emulated_schedule,
    emulated_schedule,
    make_params,
    make_x,
    rel_err,
)
from gsae_fast import backends, ops, reference

pytestmark = pytest.mark.skipif("cuda_emulated" not in CPU_BACKENDS,
                                reason="the C++ extension (with the emulator) is not built")

SCHEDULES = [("forward", 0), ("reverse", 0), ("shuffle", 1), ("shuffle", 2)]


@pytest.fixture
def schedule():
    """Sets the emulator's schedule for one test and restores this run's default after."""
    yield emulated_schedule
    emulated_schedule(*default_emulated_schedule())


def selftest(case, n=0):
    """One of the emulator's own cases (csrc/emu/selftest.cpp), input [n] floats (no zeros)."""
    return torch.ops.gsae_fast_emu.selftest(case, n, torch.arange(max(n, 1)) * 0.37 + 1.0)


# ------------------------------------------------------------------------ the emulator's model

def test_warp_collectives(schedule):
    t = torch.arange(64)
    lane, warp_base = t % 32, t // 32 * 32
    for order, seed in SCHEDULES:
        schedule(order, seed)
        out = selftest("warp").view(64, 6)
        warp_sum = (warp_base * 32 + 31 * 32 // 2).float()  # sum of the warp's thread ids
        assert torch.equal(out[lane == 0, 0], warp_sum[lane == 0])  # shuffle down: lane 0
        assert (out[lane != 0, 0] == -1).all()
        assert torch.equal(out[:, 1], warp_sum)  # butterfly (xor): every lane
        assert torch.equal(out[:, 2], (warp_base + 3).float())  # broadcast of lane 3
        ballot = [sum(1 << i for i in range(32) if (w * 32 + i) % 3 == 0) for w in (0, 1)]
        as_f32 = torch.tensor(ballot, dtype=torch.float32)  # the kernel stores it as a float
        assert out[0, 3] == as_f32[0] and out[32, 3] == as_f32[1]
        assert out[:32, 4].eq(0).all() and out[32:, 4].eq(1).all()  # any(t == 40)
        assert out[:32, 5].eq(1).all() and out[32:, 5].eq(0).all()  # all(t < 48)


def test_block_barrier_and_a_race(schedule):
    """A shared-memory tree sum is right under every schedule; without its barriers the result
    depends on the schedule: the race shows."""
    x = torch.arange(1024) * 0.37 + 1.0
    expected = x.view(4, 256).sum(1)
    racy = set()
    for order, seed in SCHEDULES:
        schedule(order, seed)
        assert torch.allclose(selftest("block_sum", 1024), expected, rtol=1e-6)
        racy.add(tuple(selftest("block_sum_racy", 1024).tolist()))
    assert len(racy) > 1


def test_unwritten_memory_is_poisoned():
    # Shared memory no thread of the block wrote, and a fresh output element the kernel skipped.
    assert selftest("shared_unwritten").isnan().all()
    out = selftest("unwritten", 300)
    assert out[:-1].isfinite().all() and out[-1].isnan()


def test_exited_lanes_take_no_part_in_a_vote():
    # lanes 20..31 exited: a full-mask ballot counts the 20 others, and "all" is over them
    assert selftest("exited_vote")[:20].eq(20 + 100).all()


@pytest.mark.parametrize("case,message", [
    ("shared_out_of_range", r"shared-memory array buf indexed at 64, outside \[0, 64\)"),
    ("diverged", "lanes of a warp diverged: one is at __ballot_sync.*lane 16 at __shfl_down_sync"),
    ("exited", r"__shfl_down_sync reads lane 16, which has exited .* thread \(8,0,0\)"),
    ("deadlock", "deadlock: a thread waits at __shfl_down_sync for lanes that wait at "
                 "__syncthreads"),
    ("barrier_diverged", r"threads of a block wait at different __syncthreads \(.*selftest.cpp:"),
    ("barrier_after_exit", "__syncthreads at .*selftest.cpp:.* after 32 threads of the block "
                           "exited"),
    ("empty_grid", r"invalid launch configuration of kernel exited_vote_kernel: grid \(0,1,1\)"),
    ("write_input", "wrote into its input 2"),
])
def test_kernel_faults_are_launch_errors(case, message):
    with pytest.raises(RuntimeError, match=message):
        selftest(case)
    assert selftest("block_sum", 256).isfinite().all()  # the next launch runs normally


def _crash(code: str, memory: str = "end") -> subprocess.CompletedProcess:
    """Runs code in a fresh process that must die; `memory`: where buffers sit in their pages
    (GSAE_FAST_EMU_MEMORY: against the guard page after them, "end", or before them, "start")."""
    res = subprocess.run([sys.executable, "-c", "import torch, gsae_fast\n" + code],
                         capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.abspath(__file__)),
                         env=dict(os.environ, GSAE_FAST_EMU_MEMORY=memory,
                                  PYTHONPATH=os.path.dirname(os.path.dirname(
                                      os.path.abspath(__file__)))))
    assert res.returncode != 0, res.stdout
    return res


SELFTEST = "torch.ops.gsae_fast_emu.selftest('{}', 300, torch.arange(300) * 0.37 + 1.0)"


def test_read_past_a_buffer_fails_loudly():
    res = _crash(SELFTEST.format("read_past_end"))
    assert ("invalid memory access in kernel copy_kernel, block (2,0,0), thread (43,0,0)"
            in res.stderr), res.stderr[-2000:]
    assert "0 bytes past the end of a 1200-byte buffer" in res.stderr


def test_write_before_a_buffer_fails_loudly():
    # buffers end against a guard page: a write just before the start lands in the poisoned
    # slack of its page, found when the buffer is freed
    res = _crash(SELFTEST.format("write_before_start"))
    assert "a write 4 bytes before the start of a 1200-byte buffer" in res.stderr, res.stderr
    # start-aligned buffers (GSAE_FAST_EMU_MEMORY=start) fault on the access itself
    res = _crash(SELFTEST.format("write_before_start"), memory="start")
    assert ("invalid memory access in kernel copy_kernel, block (0,0,0), thread (0,0,0)"
            in res.stderr and "4 bytes before the start of a 1200-byte buffer" in res.stderr), \
        res.stderr[-2000:]


def test_guarded_memory_stays_inside_emulated_ops():
    """Emulated ops on two threads at once: every allocation outside them, afterwards and on
    other threads, is ordinary memory (not poisoned)."""
    import threading
    errors = []

    def work():
        try:
            for _ in range(20):
                assert selftest("block_sum", 512).isfinite().all()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    fresh = torch.empty(1 << 16, dtype=torch.int32)
    assert not (fresh == -1).all()  # not the 0xFF poison


def test_feature_index_out_of_range_fails_loudly_in_the_cuda_kernels():
    """The raw CUDA decode reads W_dec rows by index without a check (the op wrapper validates):
    an index one past the last row reads past W_dec, which the emulator reports."""
    res = _crash(
        "W = torch.randn(16, 8)\n"
        "idx = torch.tensor([[3, 16]], dtype=torch.int32)\n"
        "torch.ops.gsae_fast_emu.sparse_decode(idx, torch.ones(1, 2), "
        "torch.tensor([2], dtype=torch.int32), W, None)\n")
    assert "invalid memory access in kernel decode_kernel" in res.stderr, res.stderr[-2000:]
    assert "past the end of a 512-byte buffer" in res.stderr


# --------------------------------------------------------------- the CUDA executor, bitwise

def _all_outputs(dtype, deterministic):
    """Every output of the four ops and of the loss + backward, on one fixed problem."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        return _outputs(dtype)
    finally:
        torch.use_deterministic_algorithms(before)


def _outputs(dtype):
    p, W_dec = make_params(37, 300, dtype, l0_frac=0.2, seed=4)
    x = make_x((70, 37), dtype, seed=5)
    outs = list(torch.ops.gsae_fast.gated_encode(x, *p.values(), 64, "cuda_emulated"))
    f, pi, idx, counts, _ = outs
    g = make_x(tuple(f.shape), f.dtype, seed=6)
    outs += ops.gated_encode_backward(x, *p.values(), idx, f, pi, counts, g, -g, True,
                                      "cuda_emulated")
    outs.append(torch.ops.gsae_fast.sparse_decode(idx, f, counts, W_dec, p["b_dec"],
                                                  "cuda_emulated"))
    gx = make_x((70, 37), dtype, seed=7)
    outs += torch.ops.gsae_fast.sparse_decode_backward(gx, idx, f, counts, W_dec, True, True,
                                                       backends.deterministic_scatter(),
                                                       "cuda_emulated")
    t = {k: v.clone().requires_grad_() for k, v in dict(p, W_dec=W_dec).items()}
    out = ops.gated_sae_loss(x, t["W_enc"], t["W_dec"], t["b_dec"], t["b_gate"], t["r_mag"],
                             t["b_mag"], 0.1, sparsity="decoder_norm", aux="shared",
                             backend="cuda_emulated", capacity=64)
    out.loss.backward()
    return outs + [out.loss.detach()] + [v.grad for v in t.values()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_deterministic_paths_are_bitwise_equal_under_every_schedule(schedule, monkeypatch, dtype):
    """Grouped scatters (the default, and what deterministic mode forces even when the atomic
    one is asked for): every output of every op, and the loss with all its gradients, bit for
    bit the same whatever order blocks and threads run in."""
    monkeypatch.setenv("GSAE_FAST_SCATTER", "atomic")  # overridden by deterministic mode
    runs = []
    for order, seed in SCHEDULES:
        schedule(order, seed)
        monkeypatch.setenv("GSAE_FAST_SCATTER", "grouped")
        runs.append(_all_outputs(dtype, deterministic=False))
        monkeypatch.setenv("GSAE_FAST_SCATTER", "atomic")
        runs.append(_all_outputs(dtype, deterministic=True))
    for run in runs[1:]:
        assert len(run) == len(runs[0])
        for i, (a, b) in enumerate(zip(runs[0], run)):
            assert a.dtype == b.dtype and torch.equal(a, b), i


def test_atomic_scatter_is_right_under_every_schedule(schedule, monkeypatch):
    """The atomic decoder gradient adds in launch order: right under every schedule (bits may
    differ: that is why deterministic mode does not use it)."""
    p, W_dec = make_params(37, 300, torch.float32, l0_frac=0.2, seed=4)
    x = make_x((70, 37), torch.float32, seed=5)
    f, pi, idx, counts, _ = torch.ops.gsae_fast.gated_encode(x, *p.values(), 64, "cuda_emulated")
    g = make_x((70, 37), torch.float32, seed=7)
    _, ref = torch.ops.gsae_fast.sparse_decode_backward(g, idx, f, counts, W_dec, False, True,
                                                        True, "reference")
    for order, seed in SCHEDULES:
        schedule(order, seed)
        _, grad_W = torch.ops.gsae_fast.sparse_decode_backward(g, idx, f, counts, W_dec, False,
                                                               True, False, "cuda_emulated")
        assert rel_err(grad_W, ref) < 1e-6


def test_emulated_executor_is_never_auto():
    from gsae_fast import backends
    assert backends.resolve("auto", "cpu") != "cuda_emulated"
    with pytest.raises(RuntimeError, match="runs on CPU tensors"):
        backends.resolve("cuda_emulated", "meta")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(48, 64, 512), (40, 37, 301)])
def test_vector_loads_and_element_loads_match_the_reference(dtype, shape):
    """The CUDA gathers and the encode epilogue load 16 bytes at a time when the sizes and the
    buffers allow (d_in a multiple of 16 bytes of W, the feature block a multiple of 4, aligned
    buffers: here every buffer's size is a multiple of 16 bytes, so the emulator's guarded buffers
    are aligned too) and element by element otherwise (the odd shape): the whole loss, its
    gradients and x's gradient against the float64 reference, both ways."""
    B, d_in, d_sae = shape
    p, W_dec = make_params(d_in, d_sae, dtype, l0_frac=0.1, seed=8)
    x = make_x((B, d_in), dtype, seed=9)
    names = ["W_enc", "W_dec", "b_dec", "b_gate", "r_mag", "b_mag"]

    def run(fn, cast):
        t = {k: cast(v).requires_grad_() for k, v in dict(p, W_dec=W_dec, x=x).items()}
        out = fn(t["x"], *[t[k] for k in names], 0.05, aux="shared")
        out.loss.backward()
        return out, {k: t[k].grad for k in names + ["x"]}

    out, grads = run(lambda *a, **k: ops.gated_sae_loss(*a, **k, backend="cuda_emulated"),
                     lambda v: v.clone())
    ref, ref_grads = run(reference.gated_sae_loss, lambda v: v.double())
    tol = LOSS_TOL[dtype]
    assert out.l0.item() == ref.l0.item()
    assert rel_err(out.loss, ref.loss) < tol
    for k in grads:
        assert rel_err(grads[k], ref_grads[k]) < 5 * tol, k
