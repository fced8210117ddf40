"""DistributedDataParallel over fastvid layers: two gloo processes on the CPU, each training on half of a
batch, end with the parameters of one process trained on the whole batch (DDP averages the gradients of
equal halves; the loss is a mean over the batch). fp64, so the comparison is tight; no BatchNorm (the
nonlocal block runs without its norm), as batch statistics would differ between halves and whole."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastvid
from fastvid.nn import ConvGRU, ConvLSTM, DepthwiseConv3d, NonLocalBlock

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD_SIZE, STEPS, BATCH = 2, 3, 4


class EveryFamily(nn.Module):
    """Depthwise conv → nonlocal block → ConvLSTM → ConvGRU → pooled last state → linear."""

    def __init__(self):
        super().__init__()
        self.depthwise = DepthwiseConv3d(3, 3, padding=1, channel_multiplier=2)
        self.nonlocal_block = NonLocalBlock(6, 3, norm=False)
        self.lstm = ConvLSTM(6, 4, 3)
        self.gru = ConvGRU(4, 3, 3, reset_after=False)
        self.head = nn.Linear(3, 2)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # random everywhere: the nonlocal block starts as the identity otherwise
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, video):  # [B, 3, T, H, W]
        x = self.nonlocal_block(self.depthwise(video))
        out, _ = self.lstm(x.transpose(1, 2))
        _, h = self.gru(out)
        return self.head(h[0].mean((2, 3)))


def data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(BATCH, 3, 3, 6, 6, generator=g, dtype=torch.float64),
            torch.randn(BATCH, 2, generator=g, dtype=torch.float64))


def train(model, video, target):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(video), target).backward()
        optimizer.step()


def _worker(rank, port, path):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        model = EveryFamily().double()
        ddp = nn.parallel.DistributedDataParallel(model)
        video, target = data()
        half = BATCH // WORLD_SIZE
        train(ddp, video[rank * half:(rank + 1) * half], target[rank * half:(rank + 1) * half])
        torch.save(model.state_dict(), f"{path}.{rank}")
        # Both ranks past their last collective before either closes its connections. Once in CI (session
        # 52) rank 0 died with SIGABRT ("terminate called without an active exception", no Python
        # traceback; where is unknown, not reproduced in 13 local runs with or without other load): a rank
        # tearing down while its peer still talks to it is one way to get that abort.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    path = str(tmp_path / "state")
    mp.spawn(_worker, args=(_free_port(), path), nprocs=WORLD_SIZE, join=True)
    single = EveryFamily().double()
    initial = {k: v.clone() for k, v in single.state_dict().items()}
    train(single, *data())
    expected = single.state_dict()
    for rank in range(WORLD_SIZE):
        state = torch.load(f"{path}.{rank}")
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            if key != "nonlocal_block.phi.bias":  # the softmax over keys is invariant to it: zero gradient
                assert not torch.equal(value, initial[key]), f"{key} did not train"
            torch.testing.assert_close(state[key], value, msg=lambda m: f"rank {rank} {key}: {m}")
