"""Recurrent / attention video models: lrcn, beyond_snippets, convgru_rcn, soft_attention_lstm, videolstm.

Every model builds at a tiny size and runs forward+backward; the models whose recurrence is a fastvid
layer give the same outputs and gradients under the default backend (fastvid's C++ kernels) and the
reference backend, and the others (torch.nn LSTMs) are checked to run no fastvid kernel, so no test
compares torch.nn with itself. The architecture facts of the seeds are checked against oracles written here from the
papers' equations (not from the code under test)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastvid
from fastvid.models import build, list_models
from fastvid.models.recurrent import aggregate_predictions
from _dispatch import spy_on_dispatch

B, C, T, SIZE = 2, 3, 8, 16
K = 5  # classes
TINY = dict(num_classes=K, cnn_widths=(4, 8), height=SIZE, width=SIZE)  # conv maps 4×4
POOL = dict(head="pooling", frames=T, window=2, stride=2, fc_channels=6, time_conv_channels=5)

CASES = {
    "lrcn": ("lrcn", dict(feature_channels=10, hidden_size=6)),
    "lrcn_convlstm": ("lrcn", dict(recurrent="convlstm", hidden_size=5)),
    **{f"snippets_{p}": ("beyond_snippets", dict(POOL, pooling=p)) for p in ("conv", "late", "slow", "local",
                                                                              "time_conv")},
    **{f"snippets_lstm_{a}": ("beyond_snippets", dict(head="lstm", aggregation=a, hidden_size=6, num_layers=2))
       for a in ("last", "max", "mean", "weighted")},
    "gru_rcn": ("convgru_rcn", dict(hidden_channels=4)),
    "gru_rcn_stacked": ("convgru_rcn", dict(hidden_channels=[4, 3], stacked=True)),
    "soft_attention": ("soft_attention_lstm", dict(hidden_size=6)),
    "videolstm_motion": ("videolstm", dict(hidden_channels=5)),
    "videolstm_appearance": ("videolstm", dict(hidden_channels=5, attention="appearance")),
}
# models whose recurrence is a fastvid layer: there the backend parity is a real check
WITH_FASTVID_LAYERS = {"lrcn_convlstm", "gru_rcn", "gru_rcn_stacked", "videolstm_motion", "videolstm_appearance"}


def video(seed=0, frames=T, channels=C):
    return torch.randn(B, channels, frames, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def make(case, **extra):
    name, kwargs = CASES[case]
    return build(name, **TINY, **kwargs, **extra)


def run(model, case, clip, flow=None):
    """Scores of ``model`` (videolstm also needs flow with motion attention; its maps are dropped)."""
    if CASES[case][0] == "videolstm":
        return model(clip, flow)[0]
    return model(clip)


def flow_for(case, seed=1):
    return video(seed, channels=2) if case == "videolstm_motion" else None


def test_models_are_registered():
    for name in ("lrcn", "beyond_snippets", "convgru_rcn", "soft_attention_lstm", "videolstm"):
        assert name in list_models()


@pytest.mark.parametrize("case", CASES)
def test_forward_backward_shapes(case):
    model = make(case).train()
    scores = run(model, case, video(), flow_for(case))
    assert scores.shape == (B, K) and torch.isfinite(scores).all()
    scores.logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    has_fastvid = any(type(m).__module__.startswith("fastvid.nn") for m in model.modules())
    assert has_fastvid == (case in WITH_FASTVID_LAYERS)


@pytest.mark.parametrize("case", sorted(set(CASES) - WITH_FASTVID_LAYERS))
def test_torch_nn_models_run_no_fastvid_kernel(case, monkeypatch):
    """These models recur with torch.nn LSTMs: there is no kernel to compare with the reference (their
    facts are the paper equations below). If one starts to run a fastvid kernel, this fails."""
    model = make(case).train()
    calls = spy_on_dispatch(monkeypatch)
    run(model, case, video(), flow_for(case)).sum().backward()
    assert calls == [], f"{case} now runs fastvid kernels ({sorted(set(calls))})"


@pytest.mark.parametrize("case", sorted(WITH_FASTVID_LAYERS))
def test_default_backend_matches_reference_backend(case, monkeypatch):
    """Train mode (batch-statistics BatchNorm, no dropout): outputs and every gradient, kernels vs reference."""
    model = make(case, dropout=0.0).train()
    clip, flow = video(), flow_for(case)
    results = []
    calls = spy_on_dispatch(monkeypatch)
    for backend, expected in (("auto", "cpu"), ("reference", "reference")):
        model.zero_grad()
        calls.clear()
        with fastvid.backend(backend):
            scores = run(model, case, clip, flow)
            (scores * torch.linspace(-1, 1, K)).sum().backward()
        assert calls and set(calls) == {expected}, f"{backend}: ran {sorted(set(calls))}"
        results.append((scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out, grads), (out_ref, grads_ref) = results
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("case", ["lrcn", "snippets_conv", "gru_rcn", "soft_attention", "videolstm_appearance"])
def test_wrong_channels_raise(case):
    with pytest.raises(ValueError, match="video must be"):
        run(make(case), case, video(channels=4))


# ------------------------------------------------------------------------------ aggregation
def test_aggregations_against_their_definitions():
    """Ng et al.: prediction at the last step, max over time, average, linearly weighted average
    (weight g from 0 at the first frame to 1 at the last), all on the softmax probabilities."""
    logits = torch.randn(3, 5, 4, dtype=torch.float64)
    p = logits.softmax(-1)
    g = torch.tensor([t / 4 for t in range(5)], dtype=torch.float64)
    expected = {
        "last": p[:, -1],
        "max": torch.stack([torch.stack([p[:, t, k] for t in range(5)]).max(0).values for k in range(4)], -1),
        "mean": sum(p[:, t] for t in range(5)) / 5,
        "weighted": sum(g[t] * p[:, t] for t in range(5)) / g.sum(),
    }
    for how, probabilities in expected.items():
        torch.testing.assert_close(aggregate_predictions(logits, how).exp(), probabilities, msg=how)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate_predictions(logits, "median")


def test_weighted_aggregation_ignores_the_first_frame_and_last_uses_only_the_last():
    logits = torch.randn(2, 4, 3)
    changed_first = logits.clone()
    changed_first[:, 0] = torch.randn(2, 3) * 10
    torch.testing.assert_close(aggregate_predictions(logits, "weighted"), aggregate_predictions(changed_first, "weighted"))
    changed_early = logits.clone()
    changed_early[:, :-1] = 0
    torch.testing.assert_close(aggregate_predictions(logits, "last"), aggregate_predictions(changed_early, "last"))
    assert not torch.allclose(aggregate_predictions(logits, "mean"), aggregate_predictions(changed_early, "mean"))


@pytest.mark.parametrize("aggregation", ["last", "max", "mean", "weighted"])
def test_deep_lstm_head_aggregates_per_frame_predictions(aggregation):
    model = make(f"snippets_lstm_{aggregation}").eval()
    assert model.head.lstm.num_layers == 2
    clip = video()
    logits = model.head.frame_logits(model.frame_maps(clip))
    assert logits.shape == (B, T, K)
    torch.testing.assert_close(model(clip), aggregate_predictions(logits, aggregation))


def test_beyond_snippets_lstm_defaults_are_five_layers_of_512():
    model = build("beyond_snippets", num_classes=K, cnn_widths=(4,), head="lstm")
    assert (model.head.lstm.num_layers, model.head.lstm.hidden_size) == (5, 512)
    assert model.head.aggregation == "weighted" and model.input_size[0] == 30


# ------------------------------------------------------------------------------ LRCN
@pytest.mark.parametrize("case", ["lrcn", "lrcn_convlstm"])
def test_lrcn_averages_per_frame_probabilities_and_is_causal(case):
    model = make(case).eval()  # eval: BatchNorm with running statistics treats frames independently
    clip = video()
    logits = model.frame_logits(clip)
    assert logits.shape == (B, T, K)
    torch.testing.assert_close(model(clip).exp(), logits.softmax(-1).mean(1))
    later_changed = clip.clone()
    later_changed[:, :, 5:] = torch.randn_like(later_changed[:, :, 5:])
    changed = model.frame_logits(later_changed)
    torch.testing.assert_close(changed[:, :5], logits[:, :5])  # prediction t sees frames <= t only
    assert not torch.allclose(changed[:, 5:], logits[:, 5:])


def test_lrcn_paper_defaults():
    model = build("lrcn", num_classes=K, cnn_widths=(4,))
    assert model.recurrent.hidden_size == 256 and model.input_size == (16, 227, 227)
    convlstm = build("lrcn", num_classes=K, cnn_widths=(4,), recurrent="convlstm", hidden_size=3)
    assert isinstance(convlstm.recurrent, fastvid.nn.ConvLSTM)


# ------------------------------------------------------------------------------ pooling architectures
def permuted(clip, order):
    return clip[:, :, order]


def capture_input(module):
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    return seen, handle


@pytest.mark.parametrize("pooling", ["conv", "late"])
def test_conv_and_late_pooling_take_the_max_over_all_frames(pooling):
    """Conv pooling: max over time of the conv maps, then FC; late pooling: FC per frame, then max.
    Both are blind to frame order."""
    model = make(f"snippets_{pooling}").eval()
    clip = video()
    order = torch.randperm(T, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(permuted(clip, order)), model(clip))
    maps = model.frame_maps(clip)
    seen, handle = capture_input(model.head.fc)
    model(clip)
    handle.remove()
    if pooling == "conv":
        torch.testing.assert_close(seen[0], maps.amax(1).flatten(1))
    else:
        torch.testing.assert_close(seen[0], maps.flatten(2))  # every frame through the FC layers
        seen_cls, handle = capture_input(model.head.classifier)
        model(clip)
        handle.remove()
        torch.testing.assert_close(seen_cls[0], model.head.fc(maps.flatten(2)).amax(1))


def test_slow_pooling_is_max_of_fc_of_local_maxima():
    """Max over windows of frames, a shared FC in between, max over windows: invariant to shuffling
    frames inside a window and to reordering whole windows, but not to moving a frame to another window."""
    model = make("snippets_slow").eval()
    clip = video()
    base = model(clip)
    within = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])
    windows_swapped = torch.tensor([6, 7, 2, 3, 4, 5, 0, 1])
    across = torch.tensor([2, 1, 0, 3, 4, 5, 6, 7])
    torch.testing.assert_close(model(permuted(clip, within)), base)
    torch.testing.assert_close(model(permuted(clip, windows_swapped)), base)
    assert not torch.allclose(model(permuted(clip, across)), base)
    maps = model.frame_maps(clip)
    local = torch.stack([maps[:, 2 * w:2 * w + 2].amax(1) for w in range(T // 2)], 1)
    expected = model.head.classifier(model.head.fc(local.flatten(2)).amax(1))
    torch.testing.assert_close(base, expected)


def test_local_pooling_concatenates_the_windows_before_the_classifier():
    model = make("snippets_local").eval()
    num_windows = (T - 2) // 2 + 1
    assert model.head.classifier.in_features == num_windows * 6
    clip = video()
    base = model(clip)
    torch.testing.assert_close(model(permuted(clip, torch.tensor([1, 0, 3, 2, 5, 4, 7, 6]))), base)
    assert not torch.allclose(model(permuted(clip, torch.tensor([6, 7, 2, 3, 4, 5, 0, 1]))), base)  # order kept
    with pytest.raises(ValueError, match="windows"):
        model(video(frames=T + 2))


def test_local_pooling_windows_follow_frames():
    """Paper defaults: windows of 10 frames with stride 5 over a 120-frame clip → 23 windows."""
    model = build("beyond_snippets", num_classes=K, cnn_widths=(4,), height=8, width=8, head="pooling",
                  pooling="local", fc_channels=3)
    assert model.input_size[0] == 120 and model.head.num_windows == (120 - 10) // 5 + 1 == 23
    assert model.head.classifier.in_features == 23 * 3


def test_time_domain_conv_is_a_1x1_reduction_across_frames_before_the_max():
    model = make("snippets_time_conv").eval()
    conv = model.head.time_conv
    assert conv.kernel_size == (2, 1, 1) and conv.stride == (2, 1, 1) and conv.out_channels == 5
    clip = video()
    maps = model.frame_maps(clip)  # [B, T, 8, 4, 4]
    # the time-domain conv written out: per window, a 1×1 map mixing channels of `window` frames
    w = conv.weight[:, :, :, 0, 0]  # [5, 8, 2]
    windows = [torch.einsum("oct,btchw->bohw", w, maps[:, 2 * n:2 * n + 2]) + conv.bias.view(1, -1, 1, 1)
               for n in range(T // 2)]
    pooled = torch.stack(windows, 2).relu().amax(2)
    expected = model.head.classifier(model.head.fc(pooled.flatten(1)))
    torch.testing.assert_close(model(clip), expected)
    default = build("beyond_snippets", num_classes=K, cnn_widths=(4,), height=8, width=8, head="pooling",
                    pooling="time_conv", fc_channels=3)
    assert default.head.time_conv.out_channels == 256 and default.head.time_conv.kernel_size == (10, 1, 1)


def test_pooling_heads_see_at_most_a_7x7_grid():
    model = build("beyond_snippets", num_classes=K, cnn_widths=(4,), height=32, width=32, head="pooling",
                  pooling="conv", fc_channels=3, frames=2)
    clip = torch.randn(1, C, 2, 32, 32)
    maps = model.frame_maps(clip)
    assert maps.shape[3:] == (7, 7) and model.head.fc[0][0].in_features == 4 * 49
    full = fastvid.models.backbones.per_frame(model.cnn, clip)  # 16×16
    torch.testing.assert_close(maps[0, 0], F.adaptive_max_pool2d(full[0, 0], 7))


# ------------------------------------------------------------------------------ GRU-RCN
def ballas_gru(gru, x):
    """The seed's ConvGRU equations with a loop, from the module's weights (one layer, one direction):
    r = σ(W_r*x + U_r*h), z = σ(W_z*x + U_z*h), h̃ = tanh(W*x + U*(r ⊙ h)), h = (1 - z)h̃ + z h (the seed
    writes h = (1 - z')h + z'h̃: the same family with z' = 1 - z, i.e. both z pre-activations negated)."""
    C = gru.hidden_channels[0]
    w_ih, w_hh, b_ih, b_hh = gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0
    pad = gru.kernel_size[0][0] // 2
    h = x.new_zeros(x.shape[0], C, *x.shape[3:])
    outs = []
    for t in range(x.shape[1]):
        wx = F.conv2d(x[:, t], w_ih, b_ih, padding=pad)
        r = torch.sigmoid(wx[:, :C] + F.conv2d(h, w_hh[:C], b_hh[:C], padding=pad))
        z = torch.sigmoid(wx[:, C:2 * C] + F.conv2d(h, w_hh[C:2 * C], b_hh[C:2 * C], padding=pad))
        candidate = torch.tanh(wx[:, 2 * C:] + F.conv2d(r * h, w_hh[2 * C:], b_hh[2 * C:], padding=pad))
        h = (1 - z) * candidate + z * h
        outs.append(h)
    return torch.stack(outs, 1)


def cnn_stages(cnn, clip):
    """Every FrameCNN stage output per frame, computed from the layer list: [B, T, C, h, w] each."""
    b, _, t, hh, ww = clip.shape
    x = clip.transpose(1, 2).reshape(b * t, -1, hh, ww)
    outs = []
    for start in range(0, len(cnn.features), 4):
        conv, bn, relu, pool = cnn.features[start:start + 4]
        x = pool(relu(bn(conv(x))))
        outs.append(x.reshape(b, t, *x.shape[1:]))
    return outs


@pytest.mark.parametrize("stacked", [False, True])
def test_gru_rcn_levels_follow_the_ballas_equations(stacked):
    model = make("gru_rcn_stacked" if stacked else "gru_rcn").eval()
    clip = video()
    stages = cnn_stages(model.cnn, clip)
    states = model.level_states(clip)
    assert [s.shape for s in states] == ([(B, T, 4, 8, 8), (B, T, 3, 4, 4)] if stacked else
                                         [(B, T, 4, 8, 8), (B, T, 4, 4, 4)])
    assert all(not gru.reset_after and gru.num_layers == 1 for gru in model.grus)
    torch.testing.assert_close(states[0], ballas_gru(model.grus[0], stages[0]), rtol=1e-4, atol=1e-5)
    if stacked:  # level 1 takes [x^1_t, maxpool(h^0_t)]
        assert model.grus[1].in_channels == 8 + 4
        lower = F.max_pool2d(states[0].flatten(0, 1), 2).reshape(B, T, 4, 4, 4)
        level_input = torch.cat([stages[1], lower], 2)
    else:
        assert model.grus[1].in_channels == 8
        level_input = stages[1]
    torch.testing.assert_close(states[1], ballas_gru(model.grus[1], level_input), rtol=1e-4, atol=1e-5)
    # the classifiers read each level's last state averaged over space; predictions averaged over levels
    probabilities = [cls(s[:, -1].mean((2, 3))).softmax(-1) for cls, s in zip(model.classifiers, states)]
    torch.testing.assert_close(model(clip).exp(), sum(probabilities) / 2)


@pytest.mark.parametrize("stacked", [False, True])
def test_only_the_stacked_gru_rcn_feeds_the_lower_state_up(stacked):
    model = make("gru_rcn_stacked" if stacked else "gru_rcn").eval()
    clip = video()
    before = model.level_states(clip)[1]
    with torch.no_grad():
        model.grus[0].weight_hh_l0.mul_(-3.0)
    after = model.level_states(clip)[1]
    assert torch.allclose(before, after) != stacked


# ------------------------------------------------------------------------------ soft attention LSTM
def test_soft_attention_maps_sum_to_one_and_weight_the_conv_positions():
    model = make("soft_attention").eval()
    clip = video()
    scores, attention = model(clip, return_attention=True)
    assert attention.shape == (B, T, 4, 4) and scores.shape == (B, K)
    assert (attention >= 0).all()
    torch.testing.assert_close(attention.sum((2, 3)), torch.ones(B, T))
    # the LSTM input at step t is Σ_i l_{t,i} X_{t,i} over the 4×4 positions of the last conv layer
    seen, handle = capture_input(model.lstm)
    model(clip)
    handle.remove()
    maps = fastvid.models.backbones.per_frame(model.cnn, clip)
    for t in range(T):
        expected = (attention[:, t, None] * maps[:, t]).sum((2, 3))
        torch.testing.assert_close(seen[t][:, 0], expected)


def test_soft_attention_query_is_the_previous_hidden_state():
    """With the initial state fixed, the attention at step t does not see frame t, only frames < t."""
    model = make("soft_attention").eval()
    fixed = torch.randn(3, B, 6), torch.randn(3, B, 6)
    model._initial_state = lambda features: fixed
    clip = video()
    _, attention = model(clip, return_attention=True)
    changed = clip.clone()
    changed[:, :, 4] = torch.randn_like(changed[:, :, 4])
    _, attention_changed = model(changed, return_attention=True)
    torch.testing.assert_close(attention_changed[:, :5], attention[:, :5])
    assert not torch.allclose(attention_changed[:, 5], attention[:, 5])


def test_soft_attention_defaults_and_penalty():
    model = build("soft_attention_lstm", num_classes=K, cnn_widths=(4,), hidden_size=4)
    assert model.lstm.num_layers == 3 and model.attention.out_features == 112 * 112
    uniform = torch.full((2, 6, 4, 4), 1 / 16)
    expected = 16 * (1 - 6 / 16) ** 2  # Σ_i (1 - Σ_t l_ti)² per clip
    assert math.isclose(model.attention_penalty(uniform).item(), expected, rel_tol=1e-6)
    with pytest.raises(ValueError, match="conv grid"):
        make("soft_attention")(torch.randn(1, C, 2, 24, 24))


# ------------------------------------------------------------------------------ VideoLSTM
def seed_attention_convlstm(layer, x, attention_source):
    """The seed's convolutional ALSTM, written out: Z_t = W_z * tanh(W_xa * X_t + W_ha * H_{t-1} + b_a),
    A_t = spatial softmax, X̃_t = A_t ⊙ X_t, then the ConvLSTM gates I, F, O, G, C_t, H_t."""
    cell = layer.cell
    Ch, pad = cell.hidden_channels, cell.kernel_size[0] // 2
    b, t_len, _, hh, ww = x.shape
    H = x.new_zeros(b, Ch, hh, ww)
    Cst = x.new_zeros(b, Ch, hh, ww)
    w_x, w_h = cell.weight_ih.split(Ch), cell.weight_hh.split(Ch)  # i, f, g, o blocks
    b_x, b_h = cell.bias_ih.split(Ch), cell.bias_hh.split(Ch)
    outs, maps = [], []
    for t in range(t_len):
        a = F.conv2d(attention_source[:, t], layer.input_attention.weight, layer.input_attention.bias)
        Z = F.conv2d(torch.tanh(a + F.conv2d(H, layer.hidden_attention.weight)), layer.attention_score.weight)
        A = torch.exp(Z) / torch.exp(Z).sum(dim=(1, 2, 3), keepdim=True)
        Xt = A * x[:, t]

        def gate(k):
            return F.conv2d(Xt, w_x[k], b_x[k], padding=pad) + F.conv2d(H, w_h[k], b_h[k], padding=pad)
        I, Fg, G, O = torch.sigmoid(gate(0)), torch.sigmoid(gate(1)), torch.tanh(gate(2)), torch.sigmoid(gate(3))
        Cst = Fg * Cst + I * G
        H = O * torch.tanh(Cst)
        outs.append(H)
        maps.append(A[:, 0])
    return torch.stack(outs, 1), torch.stack(maps, 1)


@pytest.mark.parametrize("motion", [False, True])
def test_attention_convlstm_matches_the_seed_equations(motion):
    layer = fastvid.nn.AttentionConvLSTM(3, 4, attention_channels=5, attention_in_channels=2 if motion else None)
    x = torch.randn(2, 4, 3, 5, 6)
    source = torch.randn(2, 4, 2, 5, 6) if motion else x
    output, (h_n, c_n), attention = layer(x, attention_input=source if motion else None)
    expected, expected_maps = seed_attention_convlstm(layer, x, source)
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(attention, expected_maps, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(h_n, output[:, -1])
    assert attention.shape == (2, 4, 5, 6)


def test_attention_convlstm_time_major_and_bad_input():
    layer = fastvid.nn.AttentionConvLSTM(3, 4)
    x = torch.randn(2, 4, 3, 5, 6)
    out, _, att = layer(x)
    tm = fastvid.nn.AttentionConvLSTM(3, 4, batch_first=False)
    tm.load_state_dict(layer.state_dict())
    out_tm, _, att_tm = tm(x.transpose(0, 1))
    torch.testing.assert_close(out_tm.transpose(0, 1), out)
    torch.testing.assert_close(att_tm.transpose(0, 1), att)
    with pytest.raises(ValueError, match="attention_input"):
        layer(x, attention_input=torch.randn(2, 4, 3, 4, 6))
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(2, 4, 2, 5, 6))


def test_videolstm_returns_attention_maps_that_sum_to_one():
    model = make("videolstm_motion").eval()
    scores, attention = model(video(), video(1, channels=2))
    assert scores.shape == (B, K) and attention.shape == (B, T, 4, 4)
    torch.testing.assert_close(attention.sum((2, 3)), torch.ones(B, T))
    assert model.attention_lstm.input_attention.kernel_size == (1, 1)
    assert model.attention_lstm.cell.kernel_size == (3, 3)


def test_motion_attention_comes_from_the_flow_not_the_rgb_frame():
    """Motion attention: A_t depends on flow frame t and H_{t-1} (RGB frames < t), not on RGB frame t.
    Appearance attention: A_t depends on RGB frame t."""
    model = make("videolstm_motion").eval()
    clip, flow = video(), video(1, channels=2)
    _, attention = model(clip, flow)
    rgb_changed = clip.clone()
    rgb_changed[:, :, -1] = torch.randn_like(rgb_changed[:, :, -1])
    scores_changed, attention_rgb = model(rgb_changed, flow)
    torch.testing.assert_close(attention_rgb, attention)
    assert not torch.allclose(scores_changed, model(clip, flow)[0])
    flow_changed = flow.clone()
    flow_changed[:, :, -1] = torch.randn_like(flow_changed[:, :, -1])
    _, attention_flow = model(clip, flow_changed)
    torch.testing.assert_close(attention_flow[:, :-1], attention[:, :-1])
    assert not torch.allclose(attention_flow[:, -1], attention[:, -1])

    appearance = make("videolstm_appearance").eval()
    _, attention = appearance(clip)
    _, attention_rgb = appearance(rgb_changed)
    torch.testing.assert_close(attention_rgb[:, :-1], attention[:, :-1])
    assert not torch.allclose(attention_rgb[:, -1], attention[:, -1])


def test_videolstm_takes_flow_between_frames():
    """T - 1 flow fields (frame t → t + 1): the last RGB frame, without flow, is left out."""
    model = make("videolstm_motion").eval()
    clip, flow = video(), video(1, channels=2)[:, :, :-1]
    scores, attention = model(clip, flow)
    assert attention.shape == (B, T - 1, 4, 4)
    expected_scores, expected_attention = model(clip[:, :, :-1], flow)
    torch.testing.assert_close(scores, expected_scores)
    torch.testing.assert_close(attention, expected_attention)


def test_videolstm_flow_arguments():
    with pytest.raises(ValueError, match="needs flow"):
        make("videolstm_motion")(video())
    with pytest.raises(ValueError, match="flow must be"):
        make("videolstm_motion")(video(), video(channels=3))
    with pytest.raises(ValueError, match="flow must be"):
        make("videolstm_motion")(video(), video(channels=2)[:, :, :-2])
    with pytest.raises(ValueError, match="takes no flow"):
        make("videolstm_appearance")(video(), video(channels=2))
