"""Recurrent video models on a per-frame 2D CNN.

* ``lrcn`` — Donahue et al., "Long-term Recurrent Convolutional Networks", CVPR 2015 (seeds 000,
  002): per-frame CNN features → LSTM → a prediction per frame, averaged. ``recurrent="convlstm"``
  runs a fastvid ``ConvLSTM`` on the conv feature maps instead.
* ``beyond_snippets`` — Ng et al., "Beyond Short Snippets", CVPR 2015 (seed 002): the five feature
  pooling architectures of the seed table (conv, late, slow, local pooling, time-domain conv) and the
  deep LSTM with prediction aggregation last | max | mean | weighted.
* ``convgru_rcn`` — Ballas et al., "Delving Deeper into Convolutional Networks for Learning Video
  Representations", ICLR 2016 (seeds 002, 003): ConvGRUs on several conv levels (GRU-RCN) and the
  stacked variant in which each level also takes the lower level's hidden state.
* ``soft_attention_lstm`` — Sharma et al., "Action Recognition using Visual Attention", 2015
  (seed 002): spatial soft attention over the K×K positions of the last conv layer with the previous
  hidden state as the query, 3-layer LSTM.

Every model takes videos ``[B, C, T, H, W]`` and returns class scores ``[B, num_classes]``. Where
the paper averages (or otherwise aggregates) per-frame softmax predictions, the scores are the log of
the aggregated probabilities, so they go straight into ``F.cross_entropy`` (log-softmax leaves
log-probabilities unchanged) and their argmax is the paper's prediction.

The seed papers' frame CNNs are ImageNet networks (CaffeNet, GoogLeNet, VGG-16); a small VGG-style
``FrameCNN`` stands in, its widths given by ``cnn_widths``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import ConvGRU, ConvLSTM
from ._registry import register
from .backbones import FrameCNN, per_frame

AGGREGATIONS = ("last", "max", "mean", "weighted")
POOLINGS = ("conv", "late", "slow", "local", "time_conv")


# ------------------------------------------------------------------------------ shared helpers
def check_video(model: nn.Module, video: Tensor, in_channels: int) -> None:
    """Raises a ValueError naming the expected layout unless ``video`` is ``[B, in_channels, T, H, W]``."""
    if not isinstance(video, Tensor) or video.dim() != 5 or video.shape[1] != in_channels:
        shape = tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__
        raise ValueError(f"{type(model).__name__}: video must be [B, {in_channels}, T, H, W], got {shape}")


def aggregate_predictions(frame_logits: Tensor, how: str = "mean") -> Tensor:
    """Per-frame class logits ``[B, T, K]`` → video scores ``[B, K]``: the log of the aggregated
    per-frame softmax probabilities p_t (Ng et al. 2015, seed 002).

    ``last``: p_T; ``max``: max_t p_t per class; ``mean``: (1/T) Σ_t p_t; ``weighted``: Σ_t g_t p_t / Σ_t g_t
    with g growing linearly from 0 at the first frame to 1 at the last."""
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {how!r}")
    log_p = F.log_softmax(frame_logits, dim=-1)
    T = log_p.shape[1]
    if how == "last":
        return log_p[:, -1]
    if how == "max":
        return log_p.amax(dim=1)
    if how == "mean":
        return torch.logsumexp(log_p, dim=1) - math.log(T)
    weights = torch.linspace(0.0, 1.0, T, dtype=log_p.dtype, device=log_p.device) if T > 1 else log_p.new_ones(1)
    return torch.logsumexp(log_p + weights.log().view(1, T, 1), dim=1) - weights.sum().log()


def _fc(in_features: int, out_features: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, out_features), nn.ReLU(inplace=True), nn.Dropout(dropout))


def _feature_map_size(height: int, width: int, num_stages: int):
    """H×W of FrameCNN's output: every stage halves (floor) with a 2×2 max-pool."""
    h, w = height // 2 ** num_stages, width // 2 ** num_stages
    if h < 1 or w < 1:
        raise ValueError(f"frames of {height}x{width} vanish after {num_stages} 2x2 pools")
    return h, w


# ------------------------------------------------------------------------------ LRCN
class LRCN(nn.Module):
    """Long-term recurrent convolutional network (Donahue et al. 2015) for activity recognition.

    ``recurrent="lstm"`` (the paper's LRCN-fc6): frame CNN → spatial mean → fc6-like Linear+ReLU
    (``feature_channels``) → 1-layer LSTM (``hidden_size``; 256 in the paper) → Linear per frame.
    ``recurrent="convlstm"``: frame CNN maps ``[B, T, C, h, w]`` → fastvid ConvLSTM with
    ``hidden_size`` channels → spatial mean → Linear per frame. In both, the per-frame predictions
    are averaged as probabilities (``forward`` returns their log)."""

    def __init__(self, num_classes: int, in_channels: int = 3, cnn_widths: Sequence[int] = (32, 64, 128),
                 recurrent: str = "lstm", feature_channels: int = 4096, hidden_size: int = 256, kernel_size: int = 3,
                 dropout: float = 0.5):
        super().__init__()
        if recurrent not in ("lstm", "convlstm"):
            raise ValueError(f"recurrent must be 'lstm' or 'convlstm', got {recurrent!r}")
        self.in_channels, self.recurrent_kind = in_channels, recurrent
        self.cnn = FrameCNN(in_channels, cnn_widths)
        if recurrent == "lstm":
            self.frame_features = _fc(self.cnn.out_channels, feature_channels, dropout)
            self.recurrent = nn.LSTM(feature_channels, hidden_size, batch_first=True)
        else:
            self.recurrent = ConvLSTM(self.cnn.out_channels, hidden_size, kernel_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_classes)

    def frame_logits(self, video: Tensor) -> Tensor:
        """``[B, C, T, H, W]`` → per-frame class logits ``[B, T, num_classes]`` (frame t sees frames ≤ t)."""
        check_video(self, video, self.in_channels)
        maps = per_frame(self.cnn, video)  # [B, T, C, h, w]
        if self.recurrent_kind == "lstm":
            hidden, _ = self.recurrent(self.frame_features(maps.mean(dim=(3, 4))))
        else:
            output, _ = self.recurrent(maps)
            hidden = output.mean(dim=(3, 4))
        return self.classifier(self.dropout(hidden))

    def forward(self, video: Tensor) -> Tensor:
        return aggregate_predictions(self.frame_logits(video), "mean")


@register("lrcn")
def lrcn(num_classes: int = 101, frames: int = 16, height: int = 227, width: int = 227, in_channels: int = 3,
         cnn_widths: Sequence[int] = (32, 64, 128), recurrent: str = "lstm", feature_channels: int = 4096,
         hidden_size: int = 256, kernel_size: int = 3, dropout: float = 0.5) -> LRCN:
    """LRCN (seed 002: 16×227×227 clips, UCF-101). Any clip length and frame size (at least 2^len(cnn_widths)
    pixels a side) runs; ``frames``, ``height`` and ``width`` only record the paper's input (``model.input_size``)."""
    model = LRCN(num_classes, in_channels, cnn_widths, recurrent, feature_channels, hidden_size, kernel_size, dropout)
    model.input_size = (frames, height, width)
    return model


# ------------------------------------------------------------------------------ Beyond Short Snippets
def window_max(maps: Tensor, window: int, stride: int) -> Tensor:
    """Max over time in windows: ``[B, T, ...]`` → ``[B, N, ...]``, N = (T - window) // stride + 1."""
    if maps.shape[1] < window:
        raise ValueError(f"{maps.shape[1]} frames are fewer than the pooling window of {window}")
    return maps.unfold(1, window, stride).amax(dim=-1)


def num_windows(num_frames: int, window: int, stride: int) -> int:
    return (num_frames - window) // stride + 1


class ConvPooling(nn.Module):
    """Max over all frames of the last conv maps (spatial layout kept), then two FC layers."""

    def __init__(self, channels, map_size, num_classes, fc_channels, dropout, **_):
        super().__init__()
        self.fc = nn.Sequential(_fc(channels * map_size[0] * map_size[1], fc_channels, dropout),
                                _fc(fc_channels, fc_channels, dropout))
        self.classifier = nn.Linear(fc_channels, num_classes)

    def forward(self, maps: Tensor) -> Tensor:
        return self.classifier(self.fc(maps.amax(dim=1).flatten(1)))


class LatePooling(nn.Module):
    """Two FC layers on every frame (weights shared over time), then max over frames."""

    def __init__(self, channels, map_size, num_classes, fc_channels, dropout, **_):
        super().__init__()
        self.fc = nn.Sequential(_fc(channels * map_size[0] * map_size[1], fc_channels, dropout),
                                _fc(fc_channels, fc_channels, dropout))
        self.classifier = nn.Linear(fc_channels, num_classes)

    def forward(self, maps: Tensor) -> Tensor:
        return self.classifier(self.fc(maps.flatten(2)).amax(dim=1))


class SlowPooling(nn.Module):
    """Hierarchical max: max over windows of ``window`` frames (stride ``stride``), an FC layer shared
    by every window, then max over the windows."""

    def __init__(self, channels, map_size, num_classes, fc_channels, dropout, window, stride, **_):
        super().__init__()
        self.window, self.stride = window, stride
        self.fc = _fc(channels * map_size[0] * map_size[1], fc_channels, dropout)
        self.classifier = nn.Linear(fc_channels, num_classes)

    def forward(self, maps: Tensor) -> Tensor:
        local = window_max(maps, self.window, self.stride).flatten(2)  # [B, N, C·h·w]
        return self.classifier(self.fc(local).amax(dim=1))


class LocalPooling(nn.Module):
    """Max over local windows only, two FC layers shared by every window, then the windows' features
    concatenated (in temporal order) into one classifier over ``num_windows · fc_channels`` inputs."""

    def __init__(self, channels, map_size, num_classes, fc_channels, dropout, window, stride, num_frames, **_):
        super().__init__()
        self.window, self.stride = window, stride
        self.num_windows = num_windows(num_frames, window, stride)
        if self.num_windows < 1:
            raise ValueError(f"local pooling needs frames >= window ({num_frames} < {window})")
        self.fc = nn.Sequential(_fc(channels * map_size[0] * map_size[1], fc_channels, dropout),
                                _fc(fc_channels, fc_channels, dropout))
        self.classifier = nn.Linear(self.num_windows * fc_channels, num_classes)

    def forward(self, maps: Tensor) -> Tensor:
        local = window_max(maps, self.window, self.stride)
        if local.shape[1] != self.num_windows:
            raise ValueError(f"LocalPooling was built for {self.num_windows} windows, the clip gives "
                             f"{local.shape[1]}: build the model with this `frames`")
        return self.classifier(self.fc(local.flatten(2)).flatten(1))


class TimeDomainConvPooling(nn.Module):
    """A convolution across time before the max: ``time_conv_channels`` kernels of
    ``window`` frames × ``time_conv_spatial_kernel``² (1×1 — a dimension reduction — as in the seed
    table; 3×3 in the paper), frame stride ``stride``, ReLU, max over time, two FC layers."""

    def __init__(self, channels, map_size, num_classes, fc_channels, dropout, window, stride, time_conv_channels,
                 time_conv_spatial_kernel, **_):
        super().__init__()
        k = time_conv_spatial_kernel
        self.time_conv = nn.Conv3d(channels, time_conv_channels, (window, k, k), stride=(stride, 1, 1),
                                   padding=(0, k // 2, k // 2))
        self.fc = nn.Sequential(_fc(time_conv_channels * map_size[0] * map_size[1], fc_channels, dropout),
                                _fc(fc_channels, fc_channels, dropout))
        self.classifier = nn.Linear(fc_channels, num_classes)

    def forward(self, maps: Tensor) -> Tensor:
        if maps.shape[1] < self.time_conv.kernel_size[0]:
            raise ValueError(f"{maps.shape[1]} frames are fewer than the time-domain kernel of "
                             f"{self.time_conv.kernel_size[0]}")
        features = F.relu(self.time_conv(maps.transpose(1, 2)))  # [B, C', N, h, w]
        return self.classifier(self.fc(features.amax(dim=2).flatten(1)))


_POOLING_HEADS = {"conv": ConvPooling, "late": LatePooling, "slow": SlowPooling, "local": LocalPooling,
                  "time_conv": TimeDomainConvPooling}


class DeepLSTMHead(nn.Module):
    """Ng et al.'s deep LSTM: spatially pooled frame features → ``num_layers`` stacked LSTM layers
    (5 × 512 cells in the paper) → a softmax prediction at every frame → aggregated over time."""

    def __init__(self, channels, num_classes, hidden_size, num_layers, dropout, aggregation, **_):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.aggregation = aggregation
        self.lstm = nn.LSTM(channels, hidden_size, num_layers=num_layers, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_classes)

    def frame_logits(self, maps: Tensor) -> Tensor:
        hidden, _ = self.lstm(maps.mean(dim=(3, 4)))
        return self.classifier(self.dropout(hidden))

    def forward(self, maps: Tensor) -> Tensor:
        return aggregate_predictions(self.frame_logits(maps), self.aggregation)


class BeyondShortSnippets(nn.Module):
    """Frame CNN → feature aggregation head (one of the pooling heads or the deep LSTM).

    ``grid``: for the pooling heads, the conv maps are max-pooled to this spatial grid before the
    heads flatten them (None: left as they are). The stand-in CNN downsamples by 2^stages where the
    paper's networks reach a 7×7 / 6×6 grid; without this the first FC layer would hold ~10^8-10^9
    weights at 220×220."""

    def __init__(self, cnn: FrameCNN, head: nn.Module, in_channels: int, grid=None):
        super().__init__()
        self.in_channels, self.grid = in_channels, None if grid is None else tuple(grid)
        self.cnn, self.head = cnn, head

    def frame_maps(self, video: Tensor) -> Tensor:
        """``[B, C, T, H, W]`` → conv maps per frame ``[B, T, C', h, w]`` (pooled to ``grid`` if set)."""
        check_video(self, video, self.in_channels)
        maps = per_frame(self.cnn, video)
        if self.grid is not None and tuple(maps.shape[3:]) != self.grid:
            pooled = F.adaptive_max_pool2d(maps.flatten(0, 1), self.grid)
            maps = pooled.view(*maps.shape[:3], *self.grid)
        return maps

    def forward(self, video: Tensor) -> Tensor:
        return self.head(self.frame_maps(video))


@register("beyond_snippets")
def beyond_snippets(num_classes: int = 487, frames: int | None = None, height: int = 220, width: int = 220,
                    in_channels: int = 3, cnn_widths: Sequence[int] = (32, 64, 128), head: str = "lstm",
                    pooling: str = "conv", aggregation: str = "weighted", window: int = 10, stride: int = 5,
                    fc_channels: int = 4096, time_conv_channels: int = 256, time_conv_spatial_kernel: int = 1,
                    grid_size: int = 7, hidden_size: int = 512, num_layers: int = 5,
                    dropout: float = 0.5) -> BeyondShortSnippets:
    """Beyond Short Snippets (Sports-1M: 487 classes, 220×220 frames).

    ``head="pooling"`` with ``pooling`` one of ``conv | late | slow | local | time_conv`` (default
    clip: 120 frames; slow/local pooling and the time-domain conv use windows of ``window`` frames
    with stride ``stride``, 10 and 5 in the paper), or ``head="lstm"``: the deep LSTM (default clip:
    30 frames) with ``aggregation`` one of ``last | max | mean | weighted``. The pooling heads see the
    conv maps max-pooled to at most ``grid_size``² positions (7×7, GoogLeNet's last grid);
    ``height``/``width`` fix that flattened size; ``frames`` fixes local pooling's number of
    windows."""
    if head not in ("pooling", "lstm"):
        raise ValueError(f"head must be 'pooling' or 'lstm', got {head!r}")
    if head == "pooling" and pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    frames = frames if frames is not None else (30 if head == "lstm" else 120)
    cnn = FrameCNN(in_channels, cnn_widths)
    map_size = _feature_map_size(height, width, len(cnn_widths))
    map_size = (min(map_size[0], grid_size), min(map_size[1], grid_size))
    arguments = dict(channels=cnn.out_channels, map_size=map_size, num_classes=num_classes, fc_channels=fc_channels,
                     dropout=dropout, window=window, stride=stride, num_frames=frames,
                     time_conv_channels=time_conv_channels, time_conv_spatial_kernel=time_conv_spatial_kernel,
                     hidden_size=hidden_size, num_layers=num_layers, aggregation=aggregation)
    head_module = DeepLSTMHead(**arguments) if head == "lstm" else _POOLING_HEADS[pooling](**arguments)
    model = BeyondShortSnippets(cnn, head_module, in_channels, grid=map_size if head == "pooling" else None)
    model.input_size = (frames, height, width)
    return model


# ------------------------------------------------------------------------------ GRU-RCN
class LeveledFrameCNN(FrameCNN):
    """``FrameCNN`` that also returns the output of every stage (conv, BN, ReLU, 2×2 max-pool)."""

    def stage_outputs(self, x: Tensor):
        self.check_frame_size(x)
        outputs = []
        for start in range(0, len(self.features), 4):
            x = self.features[start:start + 4](x)
            outputs.append(x)
        return outputs


class GRURCN(nn.Module):
    """GRU-RCN (Ballas et al. 2016): a ConvGRU (Ballas formula, ``reset_after=False``) on the
    per-frame feature maps of each chosen CNN level; the hidden state at the last step of each
    level is averaged over space and classified, and the levels' predictions are averaged.

    ``stacked=True`` (Stacked GRU-RCN): the ConvGRU of level l also takes the lower level's hidden
    state h_t^{l-1} (max-pooled to level l's size), concatenated with x_t^l on channels, so its
    gates see W * x_t^l + W^l * h_t^{l-1} + U * h_{t-1}^l. This is what ``ConvGRU(...,
    input_to_all_layers=True)`` does for layers on one grid; here the levels' inputs and grids
    differ, so each level is its own one-layer ConvGRU fed the concatenation. Because level l at
    time t only needs h_t^{l-1}, running level l-1 over the whole clip first is exact.

    Difference from the seed's equations: there the candidate h̃_t^l = tanh(W * x_t^l + U * (r ⊙
    h_{t-1}^l)) does not see h_t^{l-1}; here the concatenated input reaches the candidate too (the
    seed's model is the special case with those weights at zero). The seed's gate
    h = (1 - z) h_{t-1} + z h̃ is fastvid's h = (1 - z) h̃ + z h_{t-1} with z relabelled 1 - z."""

    def __init__(self, num_classes: int, in_channels: int = 3, cnn_widths: Sequence[int] = (32, 64, 128),
                 levels: Sequence[int] | None = None, hidden_channels=64, kernel_size: int = 3, stacked: bool = False,
                 dropout: float = 0.5):
        super().__init__()
        self.in_channels, self.stacked = in_channels, stacked
        self.cnn = LeveledFrameCNN(in_channels, cnn_widths)
        self.levels = list(range(len(cnn_widths))) if levels is None else sorted(levels)
        if not self.levels or any(not 0 <= level < len(cnn_widths) for level in self.levels):
            raise ValueError(f"levels must index the CNN's {len(cnn_widths)} stages, got {levels}")
        hidden = hidden_channels if isinstance(hidden_channels, (list, tuple)) else [hidden_channels] * len(self.levels)
        if len(hidden) != len(self.levels):
            raise ValueError(f"hidden_channels has {len(hidden)} entries for {len(self.levels)} levels")
        self.hidden_channels = list(hidden)
        self.grus = nn.ModuleList()
        for i, level in enumerate(self.levels):
            lower = self.hidden_channels[i - 1] if (stacked and i > 0) else 0
            self.grus.append(ConvGRU(cnn_widths[level] + lower, self.hidden_channels[i], kernel_size,
                                     reset_after=False))
        self.dropout = nn.Dropout(dropout)
        self.classifiers = nn.ModuleList(nn.Linear(c, num_classes) for c in self.hidden_channels)

    def level_states(self, video: Tensor):
        """Per level, the ConvGRU outputs ``[B, T, C_l, h_l, w_l]`` (all steps)."""
        check_video(self, video, self.in_channels)
        B, _, T, H, W = video.shape
        frames = video.transpose(1, 2).reshape(B * T, -1, H, W)
        stages = self.cnn.stage_outputs(frames)
        states, below = [], None
        for level, gru in zip(self.levels, self.grus):
            x = stages[level]
            if below is not None:
                pooled = F.adaptive_max_pool2d(below.flatten(0, 1), x.shape[-2:])
                x = torch.cat([x, pooled], dim=1)
            output, _ = gru(x.reshape(B, T, *x.shape[1:]))
            states.append(output)
            below = output if self.stacked else None
        return states

    def forward(self, video: Tensor) -> Tensor:
        logits = [classifier(self.dropout(states[:, -1].mean(dim=(2, 3))))
                  for classifier, states in zip(self.classifiers, self.level_states(video))]
        return aggregate_predictions(torch.stack(logits, dim=1), "mean")  # average over levels


@register("convgru_rcn")
def convgru_rcn(num_classes: int = 101, frames: int = 16, height: int = 224, width: int = 224,
                in_channels: int = 3, cnn_widths: Sequence[int] = (32, 64, 128), levels: Sequence[int] | None = None,
                hidden_channels=64, kernel_size: int = 3, stacked: bool = False, dropout: float = 0.5) -> GRURCN:
    """GRU-RCN / Stacked GRU-RCN (UCF-101, 224×224 frames; ``levels`` default: every CNN stage).
    Any clip length and frame size (at least 2^len(cnn_widths) pixels a side) runs; the size arguments are
    recorded in ``model.input_size``."""
    model = GRURCN(num_classes, in_channels, cnn_widths, levels, hidden_channels, kernel_size, stacked, dropout)
    model.input_size = (frames, height, width)
    return model


# ------------------------------------------------------------------------------ soft attention LSTM
class SoftAttentionLSTM(nn.Module):
    """Sharma et al. 2015: at step t the location softmax l_t = softmax(W_att h_{t-1}) over the K×K
    positions of frame t's last conv maps X_t (``W_att``: ``Linear(hidden_size, K²)``; the query
    h_{t-1} is the top LSTM layer's previous hidden state), the attended feature
    x_t = Σ_i l_{t,i} X_{t,i} goes into a ``num_layers``-layer LSTM (3 in the paper), and a softmax
    predicts the class at every step; the predictions are averaged. The initial states are
    h_0 = tanh(W_h x̄ + b_h), c_0 = tanh(W_c x̄ + b_c) from the mean feature x̄ over time and space."""

    def __init__(self, num_classes: int, grid_size, in_channels: int = 3, cnn_widths: Sequence[int] = (32, 64, 128),
                 hidden_size: int = 1024, num_layers: int = 3, dropout: float = 0.5):
        super().__init__()
        self.in_channels, self.grid_size = in_channels, tuple(grid_size)
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.cnn = FrameCNN(in_channels, cnn_widths)
        channels, positions = self.cnn.out_channels, self.grid_size[0] * self.grid_size[1]
        self.init_hidden = nn.Linear(channels, num_layers * hidden_size)
        self.init_cell = nn.Linear(channels, num_layers * hidden_size)
        self.attention = nn.Linear(hidden_size, positions)
        self.lstm = nn.LSTM(channels, hidden_size, num_layers=num_layers, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_classes)

    def _initial_state(self, features: Tensor):
        mean = features.mean(dim=(1, 2))  # [B, D]
        B = mean.shape[0]

        def per_layer(linear):
            return torch.tanh(linear(mean)).view(B, self.num_layers, self.hidden_size).transpose(0, 1).contiguous()
        return per_layer(self.init_hidden), per_layer(self.init_cell)

    def frame_logits_and_attention(self, video: Tensor):
        """``[B, C, T, H, W]`` → per-frame logits ``[B, T, num_classes]`` and the location softmax
        ``[B, T, K, K]``."""
        check_video(self, video, self.in_channels)
        maps = per_frame(self.cnn, video)  # [B, T, D, K, K]
        if tuple(maps.shape[3:]) != self.grid_size:
            raise ValueError(f"SoftAttentionLSTM was built for a {self.grid_size} conv grid, frames of "
                             f"{tuple(video.shape[3:])} give {tuple(maps.shape[3:])}: build it with this height/width")
        B, T = maps.shape[:2]
        features = maps.flatten(3).transpose(2, 3)  # [B, T, K², D]
        h, c = self._initial_state(features)
        outputs, attention_maps = [], []
        for t in range(T):
            location = torch.softmax(self.attention(h[-1]), dim=-1)  # [B, K²]
            attended = torch.bmm(location.unsqueeze(1), features[:, t])  # [B, 1, D]
            output, (h, c) = self.lstm(attended, (h, c))
            outputs.append(output[:, 0])
            attention_maps.append(location.view(B, *self.grid_size))
        logits = self.classifier(self.dropout(torch.stack(outputs, dim=1)))
        return logits, torch.stack(attention_maps, dim=1)

    def forward(self, video: Tensor, return_attention: bool = False):
        logits, attention = self.frame_logits_and_attention(video)
        scores = aggregate_predictions(logits, "mean")
        return (scores, attention) if return_attention else scores

    @staticmethod
    def attention_penalty(attention: Tensor, weight: float = 1.0) -> Tensor:
        """Sharma et al.'s doubly stochastic regulariser weight · Σ_i (1 - Σ_t l_{t,i})², averaged over the
        batch: pushes the model to look at every position at some point of the clip."""
        return weight * (1 - attention.sum(dim=1)).pow(2).flatten(1).sum(1).mean()


@register("soft_attention_lstm")
def soft_attention_lstm(num_classes: int = 51, frames: int = 30, height: int = 224, width: int = 224,
                        in_channels: int = 3, cnn_widths: Sequence[int] = (32, 64, 128), hidden_size: int = 1024,
                        num_layers: int = 3, dropout: float = 0.5) -> SoftAttentionLSTM:
    """Soft attention LSTM (HMDB-51, 224×224 frames, 30-frame clips). ``height``/``width`` fix the
    K×K attention grid (the attention weights have one row per position)."""
    grid = _feature_map_size(height, width, len(cnn_widths))
    model = SoftAttentionLSTM(num_classes, grid, in_channels, cnn_widths, hidden_size, num_layers, dropout)
    model.input_size = (frames, height, width)
    return model


__all__ = ["LRCN", "BeyondShortSnippets", "GRURCN", "SoftAttentionLSTM", "aggregate_predictions", "window_max",
           "lrcn", "beyond_snippets", "convgru_rcn", "soft_attention_lstm"]
