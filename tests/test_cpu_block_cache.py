"""fastvid's cache of big CPU blocks (csrc/cpu_block_cache.h): freed blocks of 256 KiB or more are kept
and handed out again (the most recently freed first, never more than an eighth bigger than asked), up
to FASTVID_CPU_BLOCK_CACHE_MB unused; small ones stay with PyTorch's allocator; the profiler sees every
block; the ops' results are right whatever an earlier tensor left in the block they get."""
import multiprocessing
import os
import subprocess
import sys

import pytest
import torch

import fastvid
from fastvid.bench.measure import peak_memory_bytes
from fastvid.reference.attention import nonlocal_attention as reference_attention
from fastvid.reference.depthwise3d import depthwise_conv3d as reference_depthwise

pytestmark = pytest.mark.skipif(not fastvid.info()["cpu_kernels"], reason="fastvid._C is not built")

OPS = torch.ops.fastvid
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_VALUES = (256 << 10) // 4  # kMinBytes in fp32 values


@pytest.fixture(autouse=True)
def empty_cache():
    """Each test starts with no blocks kept (earlier tests' freed results would otherwise serve its
    allocations)."""
    fastvid.empty_cpu_cache()


def stats():
    limit, kept, hits, misses = OPS._cpu_block_cache_stats()
    return {"limit": limit, "kept": kept, "hits": hits, "misses": misses}


def test_a_freed_block_is_handed_out_again():
    t = OPS._cpu_block_cache_empty([MIN_VALUES * 3])
    address = t.data_ptr()
    del t
    before = stats()
    again = OPS._cpu_block_cache_empty([MIN_VALUES * 3])
    assert again.data_ptr() == address
    assert stats()["hits"] == before["hits"] + 1
    assert again.shape == (MIN_VALUES * 3,) and again.dtype == torch.float32 and again.is_contiguous()


def test_the_most_recently_freed_block_comes_first():
    first, second = OPS._cpu_block_cache_empty([MIN_VALUES * 5]), OPS._cpu_block_cache_empty([MIN_VALUES * 5])
    second_address = second.data_ptr()
    del first, second  # second freed last
    assert OPS._cpu_block_cache_empty([MIN_VALUES * 5]).data_ptr() == second_address


def test_a_block_much_bigger_than_asked_is_not_used():
    big = OPS._cpu_block_cache_empty([MIN_VALUES * 16])
    address = big.data_ptr()
    del big
    before = stats()
    smaller = OPS._cpu_block_cache_empty([MIN_VALUES * 12])  # the kept block is a third bigger
    assert smaller.data_ptr() != address
    assert stats()["misses"] == before["misses"] + 1
    del smaller
    near = OPS._cpu_block_cache_empty([MIN_VALUES * 15])  # within an eighth
    assert near.data_ptr() == address


def test_small_tensors_stay_with_pytorch_allocator():
    before = stats()
    small = OPS._cpu_block_cache_empty([MIN_VALUES - 1024])
    del small
    after = stats()
    assert (after["hits"], after["misses"], after["kept"]) == (before["hits"], before["misses"], before["kept"])


def test_empty_cpu_cache_returns_the_kept_blocks():
    OPS._cpu_block_cache_empty([MIN_VALUES * 2])
    assert stats()["kept"] > 0
    fastvid.empty_cpu_cache()
    assert stats()["kept"] == 0
    assert fastvid.info()["cpu_block_cache_bytes"] == 0


def test_the_profiler_counts_cached_blocks():
    # Peak-memory measurements (fastvid.bench.measure) read the profiler's allocation events.
    n = MIN_VALUES * 8
    OPS._cpu_block_cache_empty([n])  # freed at once: the measured call below reuses it
    assert peak_memory_bytes(lambda: OPS._cpu_block_cache_empty([n])) >= 4 * n


def _run_with_limit(value, code):
    env = dict(os.environ, FASTVID_CPU_BLOCK_CACHE_MB=value)
    return subprocess.run([sys.executable, "-c", "import torch, fastvid\nOPS = torch.ops.fastvid\n" + code], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def test_the_limit_pushes_out_the_longest_unused_blocks():
    proc = _run_with_limit("1", f"""
n = {MIN_VALUES} + 25000  # ~360 KiB: two fit under 1 MiB, three do not
blocks = [OPS._cpu_block_cache_empty([n]) for _ in range(3)]
addresses = [b.data_ptr() for b in blocks]
while blocks:
    blocks.pop(0)  # freed in order 0, 1, 2: block 0 is pushed out
limit, kept, hits, misses = OPS._cpu_block_cache_stats()
assert limit == 1 << 20 and 0 < kept <= limit, (limit, kept)
again = [OPS._cpu_block_cache_empty([n]) for _ in range(2)]
print([t.data_ptr() for t in again] == [addresses[2], addresses[1]])
big = OPS._cpu_block_cache_empty([(2 << 20) // 4])  # bigger than the limit: never kept
del big
print(OPS._cpu_block_cache_stats()[1] <= 1 << 20)
""")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True"]


def test_limit_zero_turns_the_cache_off():
    proc = _run_with_limit("0", f"""
import torch.nn.functional as F
t = OPS._cpu_block_cache_empty([{MIN_VALUES} * 4])
del t
x, w = torch.randn(2, 64, 8, 24, 24), torch.randn(64, 1, 3, 3, 3)
y = OPS.depthwise_conv3d(x, w, None, [1, 1, 1], [1, 1, 1], [1, 1, 1])
torch.testing.assert_close(y, F.conv3d(x, w, padding=1, groups=64), rtol=1e-4, atol=1e-4)
print(OPS._cpu_block_cache_stats(), fastvid.info()["cpu_block_cache_limit_bytes"])
""")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[0,", "0,", "0,", "0]", "0"]


@pytest.mark.parametrize("value", ["lots", "-5", "1.5"])
def test_a_bad_limit_is_a_clear_error(value):
    proc = _run_with_limit(value, f"OPS._cpu_block_cache_empty([{MIN_VALUES} * 4])")
    assert proc.returncode != 0
    assert "FASTVID_CPU_BLOCK_CACHE_MB must be a whole number of MiB" in proc.stderr and value in proc.stderr


@pytest.mark.parametrize("value", [" 3", "3 ", " 3 "])
def test_spaces_around_the_limit_are_ignored(value):
    """As for FASTVID_CPU_ISA: '3 ' was refused (and fastvid.info() raised) while ' 3' was read as 3."""
    proc = _run_with_limit(value, "print(fastvid.info()['cpu_block_cache_limit_bytes'])")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(3 << 20)]


@pytest.mark.parametrize("value", ["8796093022208", "99999999999999999999999"])
def test_a_huge_limit_is_no_limit(value):
    """2^43 MiB and more overflowed the byte count: the limit read as negative and the cache kept nothing
    (fastvid.info() showed -9223372036854775808). Now it is capped at the largest byte count, and blocks
    come back."""
    proc = _run_with_limit(value, f"""
first = OPS._cpu_block_cache_empty([{MIN_VALUES} * 4])
address = first.data_ptr()
del first
print(OPS._cpu_block_cache_empty([{MIN_VALUES} * 4]).data_ptr() == address, fastvid.info()["cpu_block_cache_limit_bytes"])
""")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", str(((1 << 63) - 1) >> 20 << 20)]


def test_out_of_memory_returns_the_kept_blocks_first():
    proc = _run_with_limit("1024", """
import resource
mib = 1 << 20
kept = OPS._cpu_block_cache_empty([400 * mib // 4])
del kept  # 400 MiB kept
size = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (size + 300 * mib, resource.RLIM_INFINITY))  # size counts the kept 400
big = OPS._cpu_block_cache_empty([500 * mib // 4])  # fits only once the 400 MiB are returned
print(big.numel() * 4 // mib, OPS._cpu_block_cache_stats()[1])
""")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["500", "0"]


def _allocate_in_child(queue):
    torch.set_num_threads(1)  # as DataLoader workers do: the parent's OpenMP threads are not in the child
    t = OPS._cpu_block_cache_empty([MIN_VALUES * 4]).fill_(2.0)
    del t
    queue.put(float(OPS._cpu_block_cache_empty([MIN_VALUES * 4]).fill_(3.0).sum()))


def test_a_forked_child_allocates_from_a_cache_of_its_own():
    OPS._cpu_block_cache_empty([MIN_VALUES * 4])  # the parent's cache exists before the fork
    torch.ones(1 << 20).add_(1)  # and its OpenMP threads have run
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_allocate_in_child, args=(queue,))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == 3.0 * MIN_VALUES * 4


# ---- the ops' results do not depend on what a reused block held -----------------------------------------
def poisoned(*tensors):
    """Fills the tensors with NaN and returns their addresses; the caller drops them, so the next
    results of their sizes get these blocks, NaN and all."""
    for t in tensors:
        t.detach().fill_(float("nan"))
    return {t.data_ptr() for t in tensors}


@pytest.mark.parametrize("layout", ["ncdhw", "cl3d"])
@pytest.mark.parametrize("size", [28, 7])  # the row kernels and the small-plane kernels
def test_depthwise_results_in_reused_blocks(layout, size):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 96, 8, size, size, generator=g) if size == 28 else torch.randn(2, 432, 8, 7, 7, generator=g)
    go = torch.randn(x.shape, generator=g)
    if layout == "cl3d":  # grad_output as autograd passes it: in the output's layout
        x, go = (t.contiguous(memory_format=torch.channels_last_3d) for t in (x, go))
    w = torch.randn(x.shape[1], 1, 3, 3, 3, generator=g)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    expected = reference_depthwise(xr, wr, padding=1)
    expected.backward(go.double())
    args = ([1, 1, 1], [1, 1, 1], [1, 1, 1])
    y = OPS.depthwise_conv3d(x, w, None, *args)
    grad_input, _, _ = OPS.depthwise_conv3d_backward(go, x, w, *args, [True, True, False])
    addresses = poisoned(y, grad_input)
    del y, grad_input
    y = OPS.depthwise_conv3d(x, w, None, *args)
    grad_input, grad_weight, _ = OPS.depthwise_conv3d_backward(go, x, w, *args, [True, True, False])
    # the same blocks: a result may start 64 bytes further in or back (the other 128-byte phase, see below),
    # which can cross a page boundary (comparing page numbers failed when a block started 64 bytes before one)
    for result in (y, grad_input):
        assert any(abs(result.data_ptr() - a) <= 64 for a in addresses)
    torch.testing.assert_close(y.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_input.double(), xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_weight.double(), wr.grad, rtol=1e-4, atol=1e-3)


def test_attention_results_in_reused_blocks():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 1024, 64, generator=g) for _ in range(3))
    go = torch.randn(2, 1024, 64, generator=g)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    expected = reference_attention(qr, kr, vr, 0.125)[0]
    expected.backward(go.double())
    out, lse, _ = OPS.nonlocal_attention(q, k, v, 0.125)
    grads = OPS.nonlocal_attention_backward(go, None, q, k, v, out, lse, 0.125)
    addresses = poisoned(out, *grads)
    del out, grads
    out, lse, _ = OPS.nonlocal_attention(q, k, v, 0.125)
    grads = OPS.nonlocal_attention_backward(go, None, q, k, v, out, lse, 0.125)
    assert {out.data_ptr(), *(t.data_ptr() for t in grads)} <= addresses
    torch.testing.assert_close(out.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, (qr.grad, kr.grad, vr.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("strategy", ["hoisted", "winograd"])
def test_recurrent_results_in_reused_blocks(cell, strategy):
    torch.manual_seed(5)
    module = (fastvid.nn.ConvLSTM if cell == "lstm" else fastvid.nn.ConvGRU)(16, 32, 3, strategy=strategy)
    x = torch.randn(2, 6, 16, 24, 24, requires_grad=True)

    def step():
        output = module(x)[0]
        output = output[0] if isinstance(output, (list, tuple)) else output
        output.sum().backward()
        return output

    first = step()
    expected = (first.detach().clone(), x.grad.clone(), [p.grad.clone() for p in module.parameters()])
    addresses = poisoned(first, x.grad)
    x.grad, first = None, None
    for p in module.parameters():
        p.grad = None
    second = step()
    assert {second.data_ptr(), x.grad.data_ptr()} & addresses
    torch.testing.assert_close(second.detach(), expected[0], rtol=0, atol=0)
    torch.testing.assert_close(x.grad, expected[1], rtol=0, atol=0)
    for p, want in zip(module.parameters(), expected[2]):
        torch.testing.assert_close(p.grad, want, rtol=0, atol=0)


# ---- the phase of a result against what its kernel reads ---------------------------------------------
@pytest.mark.parametrize("shift", [0, 16])  # the input 0 or 64 bytes into its buffer: both 128-byte phases
def test_depthwise_results_take_the_other_128_byte_phase_of_their_operand(shift):
    """A kernel that reads x while it stores y never has y's lines 4 KiB-aliasing the x lines it loads
    next (cpu_block_cache::empty's other_phase_of): bit 6 of the distance y - x is 1, whatever x's own
    phase; likewise grad_input against grad_output."""
    g = torch.Generator().manual_seed(5)
    B, C, T, H, W = 2, 96, 8, 14, 14  # 1.2 MB results: cached blocks
    n = B * C * T * H * W
    x = torch.randn(n + 16, generator=g)[shift:shift + n].view(B, T, H, W, C).permute(0, 4, 1, 2, 3)
    go = torch.randn(n + 16, generator=g)[16 - shift:16 - shift + n].view(B, T, H, W, C).permute(0, 4, 1, 2, 3)
    assert x.is_contiguous(memory_format=torch.channels_last_3d) and go.is_contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(C, 1, 3, 3, 3, generator=g)
    args = ([1, 1, 1], [1, 1, 1], [1, 1, 1])
    y = OPS.depthwise_conv3d(x, w, None, *args)
    grad_input, _, _ = OPS.depthwise_conv3d_backward(go, x, w, *args, [True, False, False])
    assert (y.data_ptr() - x.data_ptr()) & 64 and (grad_input.data_ptr() - go.data_ptr()) & 64
    assert y.storage_offset() == 0 and grad_input.storage_offset() == 0
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    expected = reference_depthwise(xr, wr, padding=1)
    expected.backward(go.double())
    torch.testing.assert_close(y.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_input.double(), xr.grad, rtol=1e-5, atol=1e-5)
