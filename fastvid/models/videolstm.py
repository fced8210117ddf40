"""VideoLSTM (Li et al., "VideoLSTM convolves, attends and flows for action recognition", seed 001).

Per-frame conv maps X_t of the RGB frames go through a convolutional attention LSTM
(``fastvid.nn.AttentionConvLSTM``): Z_t = W_z * tanh(W_xa * X_t + W_ha * H_{t-1} + b_a), A_t the
spatial softmax of Z_t, X̃_t = A_t ⊙ X_t into a ConvLSTM step (3×3 input-to-state and state-to-state
kernels, 1×1 attention kernels, as in the seed). With motion-based attention (``attention="motion"``,
the paper's full model) the attention is inferred from what moves: W_xa reads the conv maps of the
optical-flow frames instead of X_t, while the attended features stay the RGB ones. Flow is an input;
the model does not compute it.

The attention maps ``[B, T, h, w]`` come back with the scores: upsampled to the frame size they
localise the action from the class label alone (the paper's localisation).
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from ..nn import AttentionConvLSTM
from ._registry import register
from .backbones import FrameCNN, per_frame
from .recurrent import aggregate_predictions, check_video

ATTENTIONS = ("motion", "appearance")


class VideoLSTM(nn.Module):
    """``forward(video, flow=None)`` with ``video`` ``[B, C, T, H, W]`` and (motion attention) ``flow``
    ``[B, flow_channels, T, H, W]`` returns ``(scores [B, num_classes], attention [B, T, h, w])``.
    Flow with T - 1 fields (from frame t to t + 1, the usual case) is accepted too: the last RGB frame,
    which has no flow, is then left out (T - 1 steps and maps).

    Each step's hidden state H_t is averaged over space and classified; the per-frame predictions are
    averaged as probabilities (the scores are their log)."""

    def __init__(self, num_classes: int, in_channels: int = 3, flow_channels: int = 2,
                 cnn_widths: Sequence[int] = (32, 64, 128), hidden_channels: int = 512,
                 attention_channels: Optional[int] = None, kernel_size: int = 3, attention_kernel_size: int = 1,
                 attention: str = "motion", dropout: float = 0.5):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        self.in_channels, self.flow_channels, self.attention_kind = in_channels, flow_channels, attention
        self.cnn = FrameCNN(in_channels, cnn_widths)
        self.flow_cnn = FrameCNN(flow_channels, cnn_widths) if attention == "motion" else None
        self.attention_lstm = AttentionConvLSTM(
            self.cnn.out_channels, hidden_channels, kernel_size, attention_channels=attention_channels,
            attention_kernel_size=attention_kernel_size,
            attention_in_channels=self.flow_cnn.out_channels if self.flow_cnn is not None else None)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_channels, num_classes)

    def frame_logits_and_attention(self, video: Tensor, flow: Optional[Tensor] = None):
        """Per-frame logits ``[B, T, num_classes]`` and attention maps ``[B, T, h, w]``."""
        check_video(self, video, self.in_channels)
        maps = per_frame(self.cnn, video)  # [B, T, C, h, w]
        motion = None
        if self.flow_cnn is not None:
            if flow is None:
                raise ValueError("VideoLSTM with motion-based attention needs flow [B, "
                                 f"{self.flow_channels}, T, H, W]; build it with attention='appearance' to run on RGB only")
            T = video.shape[2]
            if flow.dim() != 5 or flow.shape[1] != self.flow_channels or flow.shape[0] != video.shape[0] \
                    or flow.shape[3:] != video.shape[3:] or flow.shape[2] not in (T, T - 1) or flow.shape[2] == 0:
                raise ValueError(f"VideoLSTM: flow must be [B, {self.flow_channels}, T or T - 1, H, W] with B, T, H, "
                                 f"W of the video {tuple(video.shape)}, got {tuple(flow.shape)}")
            if flow.shape[2] == T - 1:
                maps = maps[:, :-1]
            motion = per_frame(self.flow_cnn, flow)
        elif flow is not None:
            raise ValueError("VideoLSTM with attention='appearance' takes no flow")
        hidden, _, attention = self.attention_lstm(maps, attention_input=motion)
        return self.classifier(self.dropout(hidden.mean(dim=(3, 4)))), attention

    def forward(self, video: Tensor, flow: Optional[Tensor] = None):
        logits, attention = self.frame_logits_and_attention(video, flow)
        return aggregate_predictions(logits, "mean"), attention


@register("videolstm")
def videolstm(num_classes: int = 101, frames: int = 30, height: int = 224, width: int = 224, in_channels: int = 3,
              flow_channels: int = 2, cnn_widths: Sequence[int] = (32, 64, 128), hidden_channels: int = 512,
              attention_channels: Optional[int] = None, kernel_size: int = 3, attention_kernel_size: int = 1,
              attention: str = "motion", dropout: float = 0.5) -> VideoLSTM:
    """VideoLSTM (UCF-101, 30-frame subsequences, 224×224 frames as VGG-16). ``attention``:
    ``"motion"`` (needs flow) or ``"appearance"`` (Convolutional ALSTM). Any clip length and frame
    size (at least 2^len(cnn_widths) pixels a side) runs; the size arguments are recorded in ``model.input_size``."""
    model = VideoLSTM(num_classes, in_channels, flow_channels, cnn_widths, hidden_channels, attention_channels,
                      kernel_size, attention_kernel_size, attention, dropout)
    model.input_size = (frames, height, width)
    return model


__all__ = ["VideoLSTM", "videolstm"]
