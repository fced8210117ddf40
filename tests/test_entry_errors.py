"""Python entry points (modules and fastvid.ops functions) reject bad arguments with a ValueError /
RuntimeError naming the argument, before any kernel runs (the raw torch.ops.fastvid checks are tested
with each op family); the command-line tools reject bad option values with an argparse error."""
import pytest
import torch

import fastvid
from fastvid.nn import AttentionConvLSTM, ConvGRU, ConvGRUCell, ConvLSTM, ConvLSTMCell, DepthwiseConv3d, NonLocalBlock

X_SEQ = torch.randn(1, 2, 4, 5, 5)  # [B, T, C_in, H, W]
X_VIDEO = torch.randn(2, 3, 4, 6, 6)  # [B, C, T, H, W]


@pytest.mark.parametrize("make, match", [
    (lambda: ConvLSTM(4, 0), "hidden_channels must be a positive int per layer, got 0"),
    (lambda: ConvGRU(4, [4, 0], num_layers=2), r"hidden_channels must be a positive int per layer, got \[4, 0\]"),
    (lambda: ConvLSTM(0, 4), "in_channels must be positive"),
    (lambda: ConvLSTMCell(4, 0), "hidden_channels must be positive"),
    (lambda: ConvLSTM(4, 3, dilation=0), "dilation must be .* >= 1, got \\(0, 0\\)"),
    (lambda: ConvGRU(4, 3, num_layers=2, dilation=[1, (1, 0)]), "dilation must be .* >= 1, got \\(1, 0\\)"),
    (lambda: ConvLSTMCell(4, 3, dilation=0), "dilation must be .* >= 1"),
    (lambda: ConvGRUCell(4, 3, dilation=(1, 0)), "dilation must be .* >= 1"),
    (lambda: AttentionConvLSTM(4, 0), "hidden_channels must be positive"),
    (lambda: DepthwiseConv3d(3, 3, dilation=0), "DepthwiseConv3d: dilation must be .* >= 1"),
    (lambda: DepthwiseConv3d(3, 3, stride=(1, 0, 1)), "DepthwiseConv3d: stride must be"),
    (lambda: DepthwiseConv3d(3, 3, padding=-1), "DepthwiseConv3d: padding must be .* >= 0"),
    (lambda: DepthwiseConv3d(3, (3, 3)), "DepthwiseConv3d: kernel_size must be one int or a \\(T, H, W\\) triple"),
    (lambda: ConvLSTM(4, 3, kernel_size=(3,)), "kernel_size must be one int or an \\(H, W\\) pair, got \\(3,\\)"),
    (lambda: ConvLSTMCell(4, 3, kernel_size=(3, 3, 3)), "kernel_size must be one int or an \\(H, W\\) pair"),
])
def test_module_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("cls", [ConvLSTMCell, ConvGRUCell])
def test_cell_step_shapes(cls):
    """A cell takes one time step [B, C_in, H, W] (or unbatched [C_in, H, W]) and states [B, C, H, W]; anything
    else is named (before: "too many values to unpack" for a clip, a broadcasting error for a wrong state)."""
    cell, x = cls(4, 3), torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match=r"input must be one time step \[B, 4, H, W\] \(or unbatched \[4, H, W\]\), "
                                         r"got \(2, 1, 4, 5, 5\) \(a whole clip goes to the sequence layer\)"):
        cell(x.unsqueeze(1))
    with pytest.raises(ValueError, match=r"input must be one time step \[B, 4, H, W\] \(or unbatched \[4, H, W\]\), "
                                         r"got \(2, 5, 5\)"):
        cell(x[0, :2])
    bad = torch.randn(2, 3, 5, 4)
    with pytest.raises(ValueError, match=r"h must be \[B, C, H, W\] = \(2, 3, 5, 5\), got \(2, 3, 5, 4\)"):
        cell(x, (bad, torch.randn(2, 3, 5, 5)) if cls is ConvLSTMCell else bad)
    if cls is ConvLSTMCell:
        with pytest.raises(ValueError, match=r"c must be \[B, C, H, W\] = \(2, 3, 5, 5\), got \(2, 3, 5, 4\)"):
            cell(x, (torch.randn(2, 3, 5, 5), bad))
        # an h of batch 1 (a learned initial state) broadcasts through the hidden conv, as before the checks
        h, c = torch.randn(1, 3, 5, 5), torch.randn(2, 3, 5, 5)
        torch.testing.assert_close(cell(x, (h, c)), cell(x, (h.expand(2, -1, -1, -1), c)))


def test_dropout_with_one_layer_warns_as_nn_lstm():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        torch.nn.LSTM(4, 3, dropout=0.5)
    for cls in (ConvLSTM, ConvGRU):
        with pytest.warns(UserWarning, match="non-zero dropout expects num_layers > 1, got dropout=0.5 and num_layers=1"):
            cls(4, 3, dropout=0.5)


@pytest.mark.parametrize("cls", [ConvLSTM, ConvGRU])
def test_short_per_layer_state_list(cls):
    module = cls(4, 3, num_layers=2, bidirectional=True)
    short = [torch.zeros(1, 3, 5, 5)] * 3  # 2 layers x 2 directions need 4
    state = (short, short) if cls is ConvLSTM else short
    with pytest.raises(ValueError, match="h_0 as a list needs num_layers \\* num_directions = 4 states, got 3"):
        module(X_SEQ, state)


@pytest.mark.parametrize("op", ["convlstm", "convgru"])
def test_sequence_op_arguments(op):
    G = 4 if op == "convlstm" else 3
    fn = getattr(fastvid.ops, op)
    w_ih, w_hh = torch.randn(G * 3, 4, 3, 3), torch.randn(G * 3, 3, 3, 3)
    with pytest.raises(ValueError, match=f"fastvid.{op}: weight_hh must be \\[{G}\\*C, C, kH, kW\\], got \\({G * 3},\\)"):
        fn(X_SEQ, w_ih, torch.randn(G * 3))
    with pytest.raises(ValueError, match=f"fastvid.{op}: dilation must be .* >= 1, got \\(0, 0\\)"):
        fn(X_SEQ, w_ih, w_hh, dilation=0)


def _cell(*shape):
    return torch.randn(*shape)


# op, the argument replaced, a call with that argument given as `bad`
NON_TENSOR_CALLS = [
    ("concatenation_attention", "key_scores",
     lambda bad: fastvid.ops.concatenation_attention(_cell(1, 5), bad, _cell(1, 4, 2))),
    ("lstm_cell", "gates_pre", lambda bad: fastvid.ops.lstm_cell(bad, _cell(1, 2, 3, 3))),
    ("lstm_cell", "c_prev", lambda bad: fastvid.ops.lstm_cell(_cell(1, 8, 3, 3), bad)),
    ("gru_cell", "h_gates", lambda bad: fastvid.ops.gru_cell(_cell(1, 6, 3, 3), bad, _cell(1, 2, 3, 3))),
    ("gru_reset_hidden", "x_r", lambda bad: fastvid.ops.gru_reset_hidden(bad, _cell(1, 2, 3, 3), _cell(1, 2, 3, 3))),
    ("depthwise_conv3d", "input", lambda bad: fastvid.ops.depthwise_conv3d(bad, _cell(2, 1, 3, 3, 3))),
]


@pytest.mark.parametrize("bad", [[[1.0]], None, 3], ids=["list", "None", "int"])
@pytest.mark.parametrize("op, arg, call", NON_TENSOR_CALLS, ids=[f"{op}-{arg}" for op, arg, _ in NON_TENSOR_CALLS])
def test_ops_name_a_required_tensor_given_as_something_else(op, arg, call, bad):
    """Before: "'list' object has no attribute 'device'" (the GRU cells), "... no attribute 'dim'"
    (concatenation_attention), "gates_pre must be [B, 4*C, H, W], got shape [0]" for None."""
    with pytest.raises(TypeError, match=f"fastvid.{op}: {arg} must be a Tensor, got {type(bad).__name__}"):
        call(bad)


def test_attention_with_empty_head_dim():
    q, v = torch.randn(1, 5, 0), torch.randn(1, 5, 2)
    with pytest.raises(ValueError, match="positive last dim D \\(the default scale is 1/sqrt\\(D\\)\\)"):
        fastvid.ops.nonlocal_attention(q, q, v)
    with pytest.raises(ValueError, match="positive Dv"):
        fastvid.ops.nonlocal_attention(torch.randn(1, 5, 2), torch.randn(1, 5, 2), torch.randn(1, 5, 0), scale=1.0)


def test_depthwise_op_arguments_on_every_backend():
    w = torch.randn(3, 1, 3, 3, 3)
    for backend in ("auto", "reference"):
        with fastvid.backend(backend):
            for name, kwargs in (("dilation", dict(dilation=0)), ("stride", dict(stride=(1, 1, 0))),
                                 ("padding", dict(padding=(0, -1, 0)))):
                with pytest.raises(ValueError, match=f"fastvid.depthwise_conv3d: {name} must be"):
                    fastvid.ops.depthwise_conv3d(X_VIDEO, w, **kwargs)


def test_nonlocal_block_mixed_dtypes():
    """nn.Conv raises on an input whose dtype differs from its weights; so does the block (it cast
    silently), except under autocast, where the casts are autocast's."""
    block = NonLocalBlock(3)
    with pytest.raises(RuntimeError, match="input x has dtype torch.float64 but the parameters have dtype torch.float32"):
        block(X_VIDEO.double())
    with torch.autocast("cpu", torch.bfloat16):
        assert block(X_VIDEO).dtype in (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("argv, message", [
    (["bench", "--rounds", "0"], "argument --rounds: must be a positive integer, got 0"),
    (["bench", "--rounds", "2.5"], "argument --rounds: '2.5' is not an integer"),
    (["bench", "--warmup", "-1"], "argument --warmup: must be an integer >= 0, got -1"),
    (["bench", "--threads", "0"], "argument --threads: must be a positive integer, got 0"),
    (["bench", "--wait-idle", "-2"], "argument --wait-idle: must be >= 0, got -2"),
    (["bench", "--device", "foo"], "argument --device: 'foo' is not a torch device"),
    (["bench", "--device", "meta"], "argument --device: fastvid runs on cpu or cuda, got 'meta'"),
    (["train", "--model", "early_fusion", "--epochs", "0"], "argument --epochs: must be a positive integer, got 0"),
    (["train", "--model", "early_fusion", "--batch-size", "0"], "argument --batch-size: must be a positive integer"),
    (["train", "--model", "early_fusion", "--test-clips", "0"], "argument --test-clips: must be a positive integer"),
    (["train", "--model", "early_fusion", "--lr", "-1"], "argument --lr: must be > 0, got -1"),
    (["train", "--model", "early_fusion", "--noise", "-1"], "argument --noise: must be >= 0, got -1"),
    # nan and inf passed every comparison: nan reached Adam's traceback, inf trained silently
    (["train", "--model", "early_fusion", "--lr", "nan"], "argument --lr: must be > 0, got nan (not a finite number)"),
    (["train", "--model", "early_fusion", "--noise", "inf"], "argument --noise: must be >= 0, got inf (not a finite"),
    (["bench", "--wait-idle", "nan"], "argument --wait-idle: must be >= 0, got nan (not a finite number)"),
    # combinations checked before any work (before: tracebacks from the data generators and builders)
    (["train", "--model", "nosuch"], "train: error: --model: unknown model 'nosuch'; registered: beyond_snippets, c3d"),
    (["train", "--model", "early_fusion", "--frames", "3"], "--frames must be >= 4 for motion clips"),
    (["train", "--model", "early_fusion", "--size", "3"], "--size must be >= 4 for motion clips, got 3"),
    (["train", "--model", "convlstm_forecaster"], "--model convlstm_forecaster predicts frames: add --task predict"),
    (["train", "--task", "predict", "--model", "c3d"], "--model c3d is not a frame predictor"),
    (["train", "--task", "predict", "--model", "convlstm_forecaster", "--frames", "1"],
     "--frames must be >= 2 to predict (one observed, one predicted), got 1"),
    (["train", "--task", "predict", "--model", "convlstm_forecaster", "--frames", "4", "--input-frames", "4"],
     "--input-frames must be in 1..3 (--frames - 1), got 4"),
    (["train", "--model", "early_fusion", "--sync-bn"], "train: error: --sync-bn needs --device cuda"),
    # found by a probing helper: each ended in a traceback, most after the data or an epoch
    (["train", "--task", "predict", "--model", "convlstm_forecaster", "--size", "6"],
     "cannot run clips of --frames 10 --size 6: moving_digits: size 6 is smaller than a glyph"),
    (["train", "--task", "predict", "--model", "convlstm_forecaster", "--size", "9"],
     "frame size 9x9 is not a multiple of patch_size 2"),
    (["train", "--model", "lrcn", "--frames", "4", "--size", "4"], "frames must be at least 8x8"),
    (["train", "--model", "slow_fusion", "--set", "nosuch=1"], "unexpected keyword argument 'nosuch'"),
    (["train", "--task", "predict", "--model", "convlstm_forecaster", "--set", "future_frames=3"],
     "--set future_frames: set by the task"),
    (["train", "--model", "slow_fusion", "--seed", str(2 ** 63)], "--seed must be in -2**62..2**62-1"),
    (["train", "--model", "slow_fusion", "--checkpoint", "{tmp}"], "--checkpoint {tmp}: is a folder"),
])
def test_command_line_option_values(argv, message, capsys, tmp_path):
    """A bad number is an argparse error naming the option (exit 2), not a traceback, a division by zero
    or a value silently replaced by the default (--rounds 0 ran the default 10 rounds)."""
    from fastvid.__main__ import main
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(tmp=tmp_path) for a in argv])
    assert exit_info.value.code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


@pytest.mark.parametrize("line, message", [
    ("{}", "not a results row (it lacks ['op', 'provider'"),
    ('{"op": "ConvLSTM", "run_id": "a"}', "not a results row (it lacks ['provider'"),
    ("[1, 2]", "not a results row (it is a JSON list, not an object)"),
    ("not json", "not a JSON row")])
def test_report_of_a_file_that_is_not_bench_results(line, message, tmp_path, capsys):
    """bench --report names a line that is JSON but not a results row, as it named non-JSON lines (before: a
    KeyError / AttributeError traceback from the report)."""
    from fastvid.__main__ import main
    path = tmp_path / "rows.jsonl"
    path.write_text(line + "\n")
    assert main(["bench", "--report", str(path)]) == 2
    assert f"fastvid bench --report: {path}:1: {message}" in capsys.readouterr().err


def test_attention_convlstm_names_bad_inputs_in_the_callers_layout():
    """Time-major (batch_first=False): a wrong attention_input is reported as passed, against the time-major
    layout (before: its transposed shape against the batch-first one); T = 0 is named (before: a reshape error)."""
    layer = AttentionConvLSTM(3, 4, batch_first=False, attention_in_channels=2)
    with pytest.raises(ValueError, match=r"attention_input must be \[T, B, 2, 5, 5\] \(B, T, H, W as x\), got \(3, 2, 1, 5, 5\)"):
        layer(torch.randn(3, 2, 3, 5, 5), torch.randn(3, 2, 1, 5, 5))
    with pytest.raises(ValueError, match=r"x has no time steps \(T = 0\), got \(0, 2, 3, 5, 5\)"):
        layer(torch.randn(0, 2, 3, 5, 5))


def test_bench_isa_names(capsys):
    """--isa names a misspelt path as not a path (before: "['bogus'] not supported by this CPU", as if it were a
    real path this CPU lacks)."""
    from fastvid.__main__ import main
    assert main(["bench", "--isa", "avx2,AVX2"]) == 2
    assert "--isa avx2,AVX2: ['AVX2'] not a CPU ISA path (the paths: baseline, avx2, avx512" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["bench"], ["train", "--model", "early_fusion"]])
def test_command_line_cuda_without_a_gpu(command, capsys):
    from fastvid.__main__ import main
    with pytest.raises(SystemExit) as exit_info:
        main(command + ["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "argument --device: 'cuda': no CUDA device here" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- found by a probing helper
@pytest.mark.parametrize("score", ["dot", "general", "concat"])
@pytest.mark.parametrize("return_weights", [False, True])
def test_temporal_attention_checks_batch_and_keys_on_every_path(score, return_weights):
    """A query of batch 1 beside keys of batch 2 was broadcast on the softmax path (return_weights, and concat
    always) and refused on the kernel path; keys of T = 0 gave zero weights there (rows that should sum to 1)."""
    from fastvid.nn import TemporalAttention
    attention = TemporalAttention(4, score=score)
    with pytest.raises(ValueError, match=r"same batch size B .* got query \(1, 3, 4\) and keys \(2, 5, 4\)"):
        attention(torch.randn(1, 3, 4), torch.randn(2, 5, 4), return_weights=return_weights)
    with pytest.raises(ValueError, match=r"keys at least one step, got query \(2, 3, 4\) and keys \(2, 0, 4\)"):
        attention(torch.randn(2, 3, 4), torch.randn(2, 0, 4), return_weights=return_weights)


@pytest.mark.parametrize("make, match", [
    (lambda: __import__("fastvid.nn", fromlist=["TemporalAttention"]).TemporalAttention(4, score="concat",
                                                                                         attention_dim=0),
     "attention_dim must be positive, got 0"),
    (lambda: AttentionConvLSTM(2, 3, attention_channels=0), "attention_channels and attention_in_channels must be"),
    (lambda: AttentionConvLSTM(2, 3, attention_in_channels=0), "attention_channels and attention_in_channels must be"),
    (lambda: AttentionConvLSTM(2, 3, attention_kernel_size=-1), "attention_kernel_size must be positive and odd"),
    (lambda: fastvid.nn.NetVLAD(0, 4), "in_features and clusters must be positive, got 0, 4"),
    (lambda: fastvid.nn.NetVLAD(4, clusters=0), "in_features and clusters must be positive, got 4, 0"),
])
def test_zero_sizes_are_refused_not_defaulted(make, match):
    """0 meant the default (`x or default`), or divided by zero, or built an empty output."""
    with pytest.raises(ValueError, match=match):
        make()


def test_attention_convlstm_states_and_empty_batch():
    """A state of the wrong shape failed inside W_ha * h with a convolution's error naming no argument; an empty
    batch failed to reshape (ConvLSTM runs it). A batch-1 h still broadcasts, as in ConvLSTMCell."""
    layer = AttentionConvLSTM(2, 3).double()
    x = torch.randn(2, 3, 2, 4, 4, dtype=torch.float64)
    h, c = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for bad, which in (((h[:1].expand(3, -1, -1, -1), c), "h"), ((h[:, :2], c), "h"), ((h, c[..., :3]), "c")):
        with pytest.raises(ValueError, match=rf"AttentionConvLSTM: state {which} must be \[B, C, H, W\] = \(2, 3, 4, 4\)"):
            layer(x, state=bad)
    with pytest.raises(ValueError, match="the state must be None or the pair"):
        layer(x, state=(h,))
    torch.testing.assert_close(layer(x, state=(h[:1], c)), layer(x, state=(h[:1].expand(2, -1, -1, -1), c)))
    output, (h_n, c_n), maps = layer(x[:0])
    assert output.shape == (0, 3, 3, 4, 4) and h_n.shape == c_n.shape == (0, 3, 4, 4) and maps.shape == (0, 3, 4, 4)


def test_aggregation_and_frame_models_refuse_inputs_they_cannot_use():
    """NetVLAD of no descriptors returned a zero vector (documented L2-normalised); ContextGating of the wrong
    width failed inside its matmul; late fusion's fc head ran any clip of the same T·H·W product (its MLP then
    read frames and positions mixed up); frames smaller than the CNN's pools failed inside max-pool."""
    from fastvid import models
    with pytest.raises(ValueError, match=r"NetVLAD: needs at least one descriptor per sample \(N >= 1\)"):
        fastvid.nn.NetVLAD(4, 2)(torch.randn(2, 0, 4))
    with pytest.raises(ValueError, match=r"ContextGating: expected \[\.\.\., 4\] features, got \(2, 5\)"):
        fastvid.nn.ContextGating(4)(torch.randn(2, 5))
    late = models.build("late_fusion", num_classes=3, head="fc", frames=3, height=16, width=16, channels=(4, 6),
                        hidden_features=8).eval()
    assert late(torch.randn(1, 3, 3, 16, 16)).shape == (1, 3)
    for video in (torch.randn(1, 3, 6, 16, 8), torch.randn(1, 3, 1, 16, 48)):
        with pytest.raises(ValueError, match=r"late_fusion\(head='fc'\): built for 3 frames of 16x16"):
            late(video)
    for name in ("lrcn", "convgru_rcn", "netvlad"):
        model = models.build(name, num_classes=3, **{"netvlad": {"channels": (4, 8)}}.get(name, {"cnn_widths": (4, 8)}))
        with pytest.raises(ValueError, match=r"frames must be at least 4x4 \(2 2x2 max-pools\), got \(3, 3\)"):
            model.eval()(torch.randn(1, 3, 2, 3, 3))


@pytest.mark.parametrize("argv, message", [
    (["bench", "--run-id", "latest"], "--run-id selects a run of --report FILE; without --report it does nothing"),
    (["bench", "--isa", "avx2,avx2"], "--isa avx2,avx2: a path named twice"),
    (["bench", "--report", "{results}", "--only", "ConvGRU"], "--only selects cases to measure; --report measures"),
    (["bench", "--out", "{tmp}"], "--out {tmp}: is a folder, not a results file"),
    (["bench", "--report", "{results}", "--plot", "{results}"], "--plot {results}: exists and is not a folder"),
])
def test_bench_usage_problems_before_any_measuring(argv, message, tmp_path, monkeypatch, capsys):
    """Found by a probing helper: --run-id without --report and --only with --report were ignored silently, a
    path named twice in --isa measured twice, a folder as --out and a file as --plot failed with a traceback
    after the measuring. Each is now a usage error (exit 2) before any case runs."""
    from fastvid.__main__ import main
    from fastvid.bench import runner
    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("measured despite a usage error"))
    results = tmp_path / "rows.jsonl"
    results.write_text("")
    fill = lambda text: text.format(results=results, tmp=tmp_path)  # noqa: E731
    assert main([fill(a) for a in argv]) == 2
    assert fill(message) in capsys.readouterr().err


def test_bench_plot_without_matplotlib_is_a_usage_error(tmp_path, monkeypatch, capsys):
    """--plot without matplotlib measured everything, then ended in a RuntimeError traceback (exit 1)."""
    import importlib.util
    from fastvid.__main__ import main
    from fastvid.bench import runner
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else
                        real_find_spec(name, *a))
    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("measured despite a usage error"))
    assert main(["bench", "--quick", "--plot", str(tmp_path / "plots")]) == 2
    assert "--plot needs matplotlib: pip install matplotlib" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("", "no rows with run_id 'run-9': the file has no rows"),
    ('{"op": "ConvLSTM", "provider": "native", "mode": "fwd_bwd", "metric": "time", "shape": "s", "median": null, '
     '"p20": 1, "p80": 1, "dtype": "fp32", "machine": "m", "version": "0", "timestamp": "t"}',
     ":1: not a results row (median None is not a number)"),
])
def test_bench_report_of_an_empty_or_malformed_file(text, message, tmp_path, capsys):
    """An empty file printed "(no results)" with exit 0 for a run id it does not hold; a null median reached the
    table as a TypeError traceback."""
    from fastvid.__main__ import main
    path = tmp_path / "rows.jsonl"
    path.write_text(text + "\n")
    assert main(["bench", "--report", str(path), "--run-id", "run-9"]) == 2
    assert message in capsys.readouterr().err


def test_bench_report_all_keeps_every_isa_path():
    """--run-id all kept the newest row per (case, metric, provider): a run's AVX2 rows (written last, from the
    child) replaced its AVX-512 rows of the same case. The ISA path is part of what a row measures."""
    from fastvid.bench import results
    base = dict(op="ConvGRU", provider="fastvid", mode="no_grad", metric="time", shape="s", dtype="fp32", run_id="r")
    rows = [dict(base, isa="avx512", median=1.0), dict(base, isa="avx2", median=2.0),
            dict(base, isa="avx2", median=3.0, run_id="r2")]
    assert sorted((r["isa"], r["median"]) for r in results.select_run(rows, "all")) == [("avx2", 3.0), ("avx512", 1.0)]


def test_bench_isa_active_labels_the_path_fastvid_runs(monkeypatch):
    """--isa active gave rows without an ISA path (fastvid's forced lower path beside native at full ISA,
    unlabelled): now the path fastvid runs, measured as that path is elsewhere."""
    from fastvid.__main__ import main
    from fastvid.bench import runner
    seen = {}
    monkeypatch.setattr(runner, "run", lambda cases, **kwargs: seen.update(kwargs) or ([], []))
    monkeypatch.setattr(fastvid, "info", lambda real=fastvid.info: dict(real(), cpu_isa="avx2"))
    assert main(["bench", "--quick", "--only", "ConvGRU", "--isa", "active", "--no-save"]) == 0
    assert seen["isas"] == ["avx2"]
