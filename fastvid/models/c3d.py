"""C3D, "the VGG of 3D CNNs" (Tran et al., "Learning Spatiotemporal Features with 3D Convolutional
Networks", ICCV 2015), as tabulated in seed 003 for a ``3 × 16 × 112 × 112`` clip:

=========  ====================  =====================
layer      size (C×T×H×W)        multiply-adds (G)
=========  ====================  =====================
conv1      64 × 16 × 112 × 112   1.04
pool1      64 × 16 × 56 × 56     (1×2×2)
conv2      128 × 16 × 56 × 56    11.10
pool2      128 × 8 × 28 × 28     (2×2×2, as all later pools)
conv3a/b   256 × 8 × 28 × 28     5.55 / 11.10
pool3      256 × 4 × 14 × 14
conv4a/b   512 × 4 × 14 × 14     2.77 / 5.55
pool4      512 × 2 × 7 × 7
conv5a/b   512 × 2 × 7 × 7       0.69 / 0.69
pool5      512 × 1 × 3 × 3
fc6, fc7   4096                  (dropout 0.5 after each)
fc8        C
=========  ====================  =====================

All convs are 3×3×3, stride 1, padded to keep the size, each followed by a ReLU; pools are max
pools with stride equal to their kernel (pool5 floors 7 → 3, giving the table's 1 × 3 × 3). The
paper uses no normalisation; ``batch_norm=True`` inserts BatchNorm after each conv (handy to train
small widths from scratch). The slide's column is headed "MFLOPs" but its values are billions of
multiply-adds (conv1: 64·16·112·112 outputs × 27·3 = 1.04·10⁹); its fc rows (0.51, 0.45, 0.05) and
hence its total "39.5" do not follow from the layer sizes (fc6 is 4608 × 4096 = 0.019 G): the convs
sum to 38.50 G and the whole network (487 classes) to 38.53 G.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ._registry import register


def _conv_relu(in_channels: int, out_channels: int, batch_norm: bool) -> nn.Sequential:
    conv = nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=not batch_norm)
    norm = nn.BatchNorm3d(out_channels) if batch_norm else nn.Identity()
    return nn.Sequential(conv, norm, nn.ReLU(inplace=True))


class C3D(nn.Module):
    """C3D (seed 003 table). ``channels`` are the widths of conv1, conv2, conv3a/b, conv4a/b,
    conv5a/b (paper: 64, 128, 256, 512, 512); ``fc_features`` the width of fc6 and fc7 (4096).

    ``forward(video [B, C, frames, height, width])`` → class scores ``[B, num_classes]``; the input
    size fixes fc6's input (``channels[-1] · ⌊T/16⌋ · ⌊H/32⌋ · ⌊W/32⌋``), so it needs
    ``frames >= 16`` and ``height, width >= 32``."""

    def __init__(self, num_classes: int, in_channels: int = 3, frames: int = 16, height: int = 112,
                 width: int = 112, channels: Sequence[int] = (64, 128, 256, 512, 512),
                 fc_features: int = 4096, dropout: float = 0.5, batch_norm: bool = False):
        super().__init__()
        c1, c2, c3, c4, c5 = channels
        self.conv1 = _conv_relu(in_channels, c1, batch_norm)
        self.pool1 = nn.MaxPool3d((1, 2, 2))  # keeps time: "except Pool1 which is 1x2x2"
        self.conv2 = _conv_relu(c1, c2, batch_norm)
        self.pool2 = nn.MaxPool3d(2)
        self.conv3a = _conv_relu(c2, c3, batch_norm)
        self.conv3b = _conv_relu(c3, c3, batch_norm)
        self.pool3 = nn.MaxPool3d(2)
        self.conv4a = _conv_relu(c3, c4, batch_norm)
        self.conv4b = _conv_relu(c4, c4, batch_norm)
        self.pool4 = nn.MaxPool3d(2)
        self.conv5a = _conv_relu(c4, c5, batch_norm)
        self.conv5b = _conv_relu(c5, c5, batch_norm)
        self.pool5 = nn.MaxPool3d(2)
        pooled = (frames // 16, height // 32, width // 32)  # pool1 halves space only, pools 2-5 all axes
        if min(pooled) < 1:
            raise ValueError(f"c3d: input frames × height × width = {frames} × {height} × {width} pools to "
                             f"{pooled}; need frames >= 16 and height, width >= 32")
        self.fc6 = nn.Sequential(nn.Linear(c5 * pooled[0] * pooled[1] * pooled[2], fc_features),
                                 nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.fc7 = nn.Sequential(nn.Linear(fc_features, fc_features), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.fc8 = nn.Linear(fc_features, num_classes)

    def features(self, video: Tensor) -> Tensor:
        """pool5 output ``[B, channels[-1], T/16, H/32, W/32]`` (the usual "C3D features" come from fc6)."""
        x = self.pool1(self.conv1(video))
        x = self.pool2(self.conv2(x))
        x = self.pool3(self.conv3b(self.conv3a(x)))
        x = self.pool4(self.conv4b(self.conv4a(x)))
        return self.pool5(self.conv5b(self.conv5a(x)))

    def forward(self, video: Tensor) -> Tensor:
        return self.fc8(self.fc7(self.fc6(self.features(video).flatten(1))))


@register("c3d")
def c3d(num_classes: int = 487, in_channels: int = 3, frames: int = 16, height: int = 112, width: int = 112,
        channels: Sequence[int] = (64, 128, 256, 512, 512), fc_features: int = 4096, dropout: float = 0.5,
        batch_norm: bool = False) -> C3D:
    """C3D as in seed 003 (defaults: 16 × 112 × 112 clips, 487 Sports-1M classes)."""
    return C3D(num_classes, in_channels, frames, height, width, channels, fc_features, dropout, batch_norm)


__all__ = ["C3D", "c3d"]
