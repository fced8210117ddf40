"""The auto strategy cache of fastvid.ops.convlstm / convgru (fastvid/ops/recurrent.py): thread-safe,
bounded, keyed on what predicts the choice (a new clip length does not re-time), never timed under
deterministic algorithms, the compiled graph uses the choice eager made, and a first call under
activation checkpointing is timed without recomputing the checkpointed forward."""
import multiprocessing
import os
import threading
import time

import pytest
import torch

import fastvid
import fastvid.ops.recurrent as ops_recurrent
from fastvid.nn import ConvGRU, ConvLSTM

pytestmark = pytest.mark.skipif(not fastvid.info()["cpu_kernels"], reason="fastvid._C is not built")


@pytest.fixture(autouse=True)
def fresh_cache():
    saved = ops_recurrent._default_strategy
    fastvid.ops.set_strategy("auto")  # also empties the cache
    yield
    fastvid.ops.set_strategy(saved)


@pytest.fixture
def timer(monkeypatch):
    """Counts the strategy timer's readings (fastvid.ops.recurrent's time.perf_counter); a reading
    sleeps a little, so that threads overlap while one times."""
    calls = []
    real = time.perf_counter

    def perf_counter():
        calls.append(threading.get_ident())
        time.sleep(0.002)
        return real()

    class FakeTime:
        pass
    fake = FakeTime()
    fake.perf_counter = perf_counter
    monkeypatch.setattr(ops_recurrent, "time", fake)
    return calls


def lstm_call(B=1, T=3, H=6, W=5, train=False, module=None):
    module = module or ConvLSTM(2, 3, 3)
    x = torch.randn(B, T, 2, H, W, requires_grad=train)
    with torch.set_grad_enabled(train):
        out = module(x)[0]
    if train:
        out.sum().backward()
    return out


def _time_a_new_shape_and_exit():
    torch.set_num_threads(1)  # (OpenMP's own pool is not fork-safe: the child keeps to one thread)
    lstm_call(H=9, W=11)
    assert ops_recurrent.chosen_strategies(), "the child timed nothing"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_while_a_shape_is_timed_does_not_hang():
    """A process forked while another thread times a new shape (a DataLoader's fork workers starting beside
    a training thread) inherits the held timing lock; its own first new shape waited on it forever."""
    child = multiprocessing.get_context("fork").Process(target=_time_a_new_shape_and_exit)
    with ops_recurrent._timing_lock:  # held, as by a thread timing when the fork happens
        child.start()
    child.join(120)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung and child.exitcode == 0, "the forked child hung (or failed) at its first new shape"


def test_threads_time_a_new_shape_once(timer):
    """Four threads meet a new shape at once: one times it, the others wait for its choice (before, each
    timed: four times the passes, timing each other). Meanwhile chosen_strategies() is read in a loop
    (an unlocked dict iterated while another thread inserted raised 'dictionary changed size')."""
    lstm_call(H=7)
    single = len(timer)  # readings for one timing, on another shape
    assert single > 0
    del timer[:]
    module, errors, stop = ConvLSTM(2, 3, 3), [], threading.Event()
    barrier = threading.Barrier(5)

    def worker(H):
        try:
            barrier.wait()
            lstm_call(H=H, module=module)
        except Exception as error:  # reported below, with the thread's shape
            errors.append((H, repr(error)))

    def reader():
        barrier.wait()
        while not stop.is_set():
            try:
                fastvid.ops.chosen_strategies()
            except Exception as error:
                errors.append(("reader", repr(error)))

    threads = [threading.Thread(target=worker, args=(H,)) for H in (6, 6, 6, 9)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads[:4]:
        t.join(60)
    stop.set()
    threads[4].join(60)
    assert errors == []
    assert len(timer) == 2 * single, "shape H=6 must be timed once, H=9 once"
    assert len(fastvid.ops.chosen_strategies()) == 3


def test_new_clip_length_reuses_the_choice(timer):
    """T enters the key only as a bucket (1, 2-3, 4-7, 8+): a new clip length in a known bucket
    reuses the choice instead of timing ~6 passes inside the forward (before: every T re-timed)."""
    for train in (False, True):
        fastvid.ops.set_strategy("auto")
        lstm_call(T=8, train=train)
        timed = len(timer)
        assert timed > 0 and len(fastvid.ops.chosen_strategies()) == 1
        for T in (9, 12, 31):
            lstm_call(T=T, train=train)
        assert len(timer) == timed and len(fastvid.ops.chosen_strategies()) == 1
        lstm_call(T=5, train=train)  # another bucket: timed once
        assert len(fastvid.ops.chosen_strategies()) == 2
        timed = len(timer)
        lstm_call(T=7, train=train)
        assert len(timer) == timed
        del timer[:]


def test_cache_is_bounded_least_recently_used_first(timer, monkeypatch):
    monkeypatch.setattr(ops_recurrent, "CACHE_SIZE", 3)
    for H in (4, 5, 6):
        lstm_call(H=H)
    first = list(fastvid.ops.chosen_strategies())
    lstm_call(H=4)  # used again: now the most recent
    lstm_call(H=7)  # evicts H=5, the least recently used
    keys = list(fastvid.ops.chosen_strategies())
    assert len(keys) == 3
    assert keys == [first[2], first[0], keys[2]] and first[1] not in keys


@pytest.mark.parametrize("train", [False, True])
def test_deterministic_mode_never_times(train, monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the fixed rule ('hoisted') runs: no timing (the
    timer raises), nothing cached, and the output equals the forced 'hoisted' run bit for bit."""
    def no_timer():
        raise AssertionError("the strategy was timed under deterministic algorithms")
    monkeypatch.setattr(ops_recurrent.time, "perf_counter", no_timer)
    torch.manual_seed(0)
    lstm, gru = ConvLSTM(2, 3, 3), ConvGRU(2, 3, 3)
    x = torch.randn(2, 4, 2, 6, 5, requires_grad=train)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.set_grad_enabled(train):
            outputs = [lstm(x)[0], gru(x)[0]]
    finally:
        torch.use_deterministic_algorithms(previous)
    assert fastvid.ops.chosen_strategies() == {}
    lstm.strategy = gru.strategy = ops_recurrent.FIXED_STRATEGY
    with torch.set_grad_enabled(train):
        expected = [lstm(x)[0], gru(x)[0]]
    for got, want in zip(outputs, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("cls", [ConvLSTM, ConvGRU])
def test_vmap_over_a_fresh_layer_is_not_timed(cls, monkeypatch):
    """torch.func.vmap over a fresh layer (no cached choice) runs 'hoisted' untimed, through PyTorch's
    per-sample fallback: equal to the per-clip calls (before, the timing's backward raised "element 0 of
    tensors does not require grad" inside the transform). Under torch.func.grad the traced inputs run the
    reference implementation (the C++ autograd ops cannot run there), untimed too, and give autograd's
    gradients (before: PyTorch's "functorch transforms" error)."""
    def no_timer():
        raise AssertionError("the strategy was timed inside a torch.func transform")
    monkeypatch.setattr(ops_recurrent.time, "perf_counter", no_timer)
    torch.manual_seed(0)
    layer = cls(2, 3, 3)
    clips = torch.randn(3, 2, 4, 2, 6, 5)  # 3 batches of 2 clips
    outputs = torch.func.vmap(lambda x: layer(x)[0])(clips)
    assert fastvid.ops.chosen_strategies() == {}
    layer.strategy = ops_recurrent.FIXED_STRATEGY
    torch.testing.assert_close(outputs, torch.stack([layer(x)[0] for x in clips]), rtol=0, atol=0)
    layer.strategy = None
    parameters = {name: p.detach() for name, p in layer.named_parameters()}
    grads = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (clips[0],))[0].sum())(parameters)
    assert fastvid.ops.chosen_strategies() == {}
    layer.strategy = ops_recurrent.FIXED_STRATEGY  # (the kernels' gradients, untimed)
    expected = torch.autograd.grad(layer(clips[0])[0].sum(), list(layer.parameters()))
    torch.testing.assert_close(list(grads.values()), list(expected), rtol=1e-5, atol=1e-6)


def _strategies_in_graph(fn, *args):
    """The strategy argument of every fastvid sequence op in the graph torch.compile traces for fn."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    ops = {torch.ops.fastvid.convlstm_sequence: 10, torch.ops.fastvid.convgru_sequence: 10}  # strategy's position
    return [node.args[ops[node.target]] for gm in graphs for node in gm.graph.nodes
            if node.op == "call_function" and node.target in ops]


@pytest.mark.parametrize("cls", [ConvLSTM, ConvGRU])
def test_compiled_run_uses_the_eager_choice(cls, monkeypatch):
    """torch.compile cannot time while tracing: it takes the choice eager made for the key (before, it
    always took 'hoisted'), and the fixed rule for a key eager has not timed."""
    module = cls(2, 3, 3)
    x = torch.randn(2, 4, 2, 6, 5)
    with torch.no_grad():
        assert _strategies_in_graph(module, x) == [ops_recurrent.STRATEGIES[ops_recurrent.FIXED_STRATEGY]]
        monkeypatch.setattr(ops_recurrent, "_time_strategies", lambda *args: ops_recurrent.STRATEGIES["concat"])
        module(x)  # eager times (here: picks concat) and caches
        assert list(fastvid.ops.chosen_strategies().values()) == ["concat"]
        assert _strategies_in_graph(module, x) == [ops_recurrent.STRATEGIES["concat"]]
    torch._dynamo.reset()


@pytest.mark.parametrize("cls", [ConvLSTM, ConvGRU])
def test_compiled_with_dynamic_sizes_compiles_once(cls):
    """Under torch.compile(dynamic=True) a sequence layer recompiled for every new batch size (the strategy
    lookup's key pinned each size; dynamo hands symbolic sizes to Python as ints) and, past dynamo's
    recompile limit of 8, fullgraph=True raised. Now one graph serves them (two: dynamo's first call is
    static)."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    compiled = torch.compile(cls(2, 3, 3), backend=backend, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for batch in range(2, 13):
            compiled(torch.randn(batch, 3, 2, 5, 7))
    assert len(graphs) <= 2
    torch._dynamo.reset()


@pytest.mark.parametrize("cls", [ConvLSTM, ConvGRU])
def test_compiled_run_takes_the_fixed_rule_where_eager_chose_differently_by_size(cls, monkeypatch):
    """The compiled graph holds no sizes in its strategy key: it takes eager's choice for the layer where
    eager made one (test above) and the fixed rule where eager's choices differ between sizes."""
    module = cls(2, 3, 3)
    x, other = torch.randn(2, 4, 2, 6, 5), torch.randn(3, 4, 2, 8, 8)
    choices = iter([ops_recurrent.STRATEGIES["concat"], ops_recurrent.STRATEGIES["winograd"]])
    monkeypatch.setattr(ops_recurrent, "_time_strategies", lambda *args: next(choices))
    with torch.no_grad():
        module(x), module(other)
        assert sorted(fastvid.ops.chosen_strategies().values()) == ["concat", "winograd"]
        assert _strategies_in_graph(module, x) == [ops_recurrent.STRATEGIES[ops_recurrent.FIXED_STRATEGY]]
    torch._dynamo.reset()


def test_timing_waits_for_the_tensors_gpu(monkeypatch):
    """The timing synchronised the current CUDA device, not the tensors': on cuda:1 beside a current cuda:0
    it timed how long the launches took to queue. It now waits for the device the tuning key names (the
    index included, so two GPUs of one process keep their own choices). CPU stand-ins for the launches."""
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    args = (torch.zeros(2),)
    code = ops_recurrent._time_strategies("cuda:1", lambda code, args: (args[0] + code,), args, (0, 1))
    assert code in (0, 1) and waited and set(waited) == {"cuda:1"}
    module, x = ConvLSTM(2, 3, 3), torch.randn(1, 2, 2, 4, 4)
    with torch.no_grad():
        module(x)
    assert {key[0] for key in fastvid.ops.chosen_strategies()} == {"cpu"}


CHECKPOINTED_FIRST_CALL = """
import sys, torch, fastvid
from torch.utils.checkpoint import checkpoint
from fastvid.nn import ConvGRU, ConvLSTM
reentrant = sys.argv[1] == "reentrant"
fastvid.ops.set_strategy("auto")
torch.manual_seed(0)
for module in (ConvLSTM(3, 4, 3, num_layers=2), ConvGRU(3, 4, 3)):
    x = torch.randn(2, 3, 3, 5, 6)
    grads = {}
    for how in ("checkpoint", "plain", "reference"):
        m = module.double() if how == "reference" else module.float()
        m.zero_grad()
        xx = x.detach().to(next(m.parameters()).dtype).requires_grad_()
        with fastvid.backend("reference" if how == "reference" else "auto"):
            out = checkpoint(m, xx, use_reentrant=reentrant)[0] if how == "checkpoint" else m(xx)[0]
            out.square().sum().backward()
        grads[how] = [xx.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    assert fastvid.ops.chosen_strategies(), "the first call was not timed"
    for a, b in zip(grads["checkpoint"], grads["plain"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the recompute ran the cached strategy
    for a, r in zip(grads["checkpoint"], grads["reference"]):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4 * r.abs().max().item())
print("ok")
"""


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_first_call_under_activation_checkpointing(mode):
    """The auto strategy is timed inside the first forward, with a backward per candidate. Under
    torch.utils.checkpoint(use_reentrant=False) that backward unpacked tensors the checkpoint had
    dropped, which recomputed the checkpointed forward, whose sequence op then waited for the timing
    lock: the first training step hung for ever. Run in a subprocess with a timeout so that a hang fails
    the test instead of the suite; the gradients match an unchecked run and the fp64 reference backend."""
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-c", CHECKPOINTED_FIRST_CALL, mode], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.parametrize("cls", [ConvLSTM, ConvGRU])
def test_timing_reaches_none_of_the_callers_tensors(cls):
    """The first training call of a shape times each strategy with a backward inside forward. Those
    backwards ran on the caller's tensors: a hook on the input or on a weight fired once per timed
    backward, and an input that retain_grad()s kept the timing's gradient (with a loss whose true
    gradient is 0, |grad| ~5). Now each hook fires once, in the caller's backward, and the gradients
    are the loss's own."""
    module = cls(3, 4, 3)
    leaf = torch.randn(1, 2, 3, 5, 11, requires_grad=True)
    x = leaf * 1.0
    x.retain_grad()
    fired = {"x": 0, "weight_hh": 0}
    x.register_hook(lambda g: fired.__setitem__("x", fired["x"] + 1))
    module.weight_hh_l0.register_hook(lambda g: fired.__setitem__("weight_hh", fired["weight_hh"] + 1))
    out = module(x)[0]
    assert fastvid.ops.chosen_strategies(), "the call was not timed"
    assert fired == {"x": 0, "weight_hh": 0}
    (out * 0).sum().backward()
    assert fired == {"x": 1, "weight_hh": 1}
    assert not x.grad.any() and not leaf.grad.any() and not module.weight_ih_l0.grad.any()
