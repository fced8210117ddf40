"""Would a bf16 dot-product GEMM (AVX512-BF16) in the Winograd domain keep issue 12's accuracy rule?

Emulates one 3x3 convolution as Winograd F(m x m, 3 x 3) in fp64 with the transformed tiles U and
weights V rounded to bf16 (what a bf16 GEMM reads), and compares its error against an fp64 conv with
that of the direct bf16 convolution (bf16 inputs, fp32 accumulation, bf16 output: oneDNN's path).
The matrices are those of csrc/recurrent/recurrent_winograd_cpu.cpp (winograd::Matrices).

    .venv/bin/python scripts/winograd_bf16_error.py

Measured (2026-12-02): F(2x2) 1.55-1.7x the direct path's max error, F(4x4) 7.5-8.4x; with fp32
tiles both are 1.0x (the bf16 output rounding dominates). So a bf16 GEMM is admissible only with
F(2x2), whose 16/36 products at twice the fp32 rate are 2/9 of the direct work against F(4x4)'s 1/4
in fp32: no gain over the fp32 F(4x4) GEMM that bf16 runs today."""
import torch
import torch.nn.functional as F

F4 = dict(m=4,
          BT=[[0.5, -0.75, -1, 0.75, 0.5, 0], [0, -0.4, 0.2, 1, 0.4, 0], [0, 0.4, -1, 0.2, 0.4, 0],
              [0, -1, -0.5, 1, 0.5, 0], [0, 0.5, -1, -0.5, 1, 0], [0, 0.5, -0.75, -1, 0.75, 0.5]],
          G=[[2, 0, 0], [5 / 6, 5 / 6, 5 / 6], [-5 / 6, 5 / 6, -5 / 6], [-32 / 15, -16 / 15, -8 / 15],
             [1 / 15, -2 / 15, 4 / 15], [0, 0, 2]],
          AT=[[1, 1, 1, 1, 1, 0], [0, 1, -1, 0.5, -2, 0], [0, 1, 1, 0.25, 4, 0], [0, 1, -1, 0.125, -8, 1]])
F2 = dict(m=2, BT=[[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
          G=[[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], AT=[[1, 1, 1, 0], [0, 1, -1, -1]])


def winograd_conv(x, w, mats, bf16_tiles):
    """conv2d(x, w, padding=1) by F(m x m, 3 x 3) in fp64; bf16_tiles rounds U and V to bf16."""
    BT, G, AT = (torch.tensor(mats[k], dtype=torch.float64) for k in ("BT", "G", "AT"))
    m = mats["m"]
    B, K, H, W = x.shape
    th, tw = -(-H // m), -(-W // m)
    tiles = F.pad(x, (1, tw * m + 1 - W, 1, th * m + 1 - H)).unfold(2, m + 2, m).unfold(3, m + 2, m)
    U, V = BT @ tiles @ BT.T, G @ w @ G.T
    if bf16_tiles:
        U, V = U.to(torch.bfloat16).double(), V.to(torch.bfloat16).double()
    Y = AT @ torch.einsum("bktwij,nkij->bntwij", U, V) @ AT.T
    return Y.permute(0, 1, 2, 4, 3, 5).reshape(B, -1, th * m, tw * m)[:, :, :H, :W]


def main():
    torch.manual_seed(0)
    for K in (32, 64, 128):  # the benchmark shapes' input channels (C_in + C of ConvLSTM: 64, 128)
        x = torch.randn(4, K, 32, 32).to(torch.bfloat16).double()
        w = (torch.randn(128, K, 3, 3) / (3 * K ** 0.5)).to(torch.bfloat16).double()
        exact = F.conv2d(x, w, padding=1)
        direct = F.conv2d(x.float(), w.float(), padding=1).to(torch.bfloat16).double()
        e_direct = (direct - exact).abs().max().item()
        for name, mats in (("F(2x2)", F2), ("F(4x4)", F4)):
            row = [f"K={K:3d} {name}:"]
            for label, bf16_tiles in (("fp32 tiles", False), ("bf16 tiles", True)):
                y = winograd_conv(x, w, mats, bf16_tiles).to(torch.bfloat16).double()
                row.append(f"{label} {(y - exact).abs().max().item() / e_direct:.2f}x")
            print(" ".join(row), "the direct bf16 conv's max error")


if __name__ == "__main__":
    main()
