"""Data-parallel training (issue 13, feature 6): ``torchrun --nproc_per_node=2 -m fastvid train`` on gloo,
127.0.0.1 only. Checks that only rank 0 logs and writes the checkpoint, and that the checkpointed
weights are those of single-process training on the union of both ranks' DistributedSampler batches
with the gradients averaged (what DistributedDataParallel promises), replayed here step by step."""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data.distributed import DistributedSampler

from fastvid.models import build, train
from fastvid.models.moving_digits import moving_digits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
# per rank: 16 clips / 2 ranks / batch 4 = 2 steps per epoch
RUN = dict(frames=4, size=8, train_clips=16, batch_size=4, epochs=2, seed=3, lr=1e-2, input_frames=2, digits=1,
           hidden_channels=(4,))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replay_two_ranks():
    """Single-process replay of the 2-rank run: same initialisation, each step's loss the mean of the
    two ranks' batch losses (DDP averages the gradients), Adam."""
    torch.manual_seed(RUN["seed"])
    model = build("convlstm_forecaster", in_channels=1, future_frames=RUN["frames"] - RUN["input_frames"],
                  hidden_channels=RUN["hidden_channels"])
    videos = moving_digits(RUN["train_clips"], RUN["frames"], RUN["size"], RUN["digits"], seed=2 * RUN["seed"]).videos
    optimizer = torch.optim.Adam(model.parameters(), lr=RUN["lr"])
    samplers = [DistributedSampler(range(RUN["train_clips"]), 2, rank, shuffle=True, seed=RUN["seed"]) for rank in (0, 1)]
    b = RUN["batch_size"]
    for epoch in range(RUN["epochs"]):
        orders = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            orders.append(list(sampler))
        assert not set(orders[0]) & set(orders[1])  # the ranks see different clips
        for step in range(len(orders[0]) // b):
            losses = []
            for order in orders:
                clip = videos[order[step * b:(step + 1) * b]]
                logits = model(clip[:, :, :RUN["input_frames"]], logits=True)
                losses.append(F.binary_cross_entropy_with_logits(logits, clip[:, :, RUN["input_frames"]:]))
            optimizer.zero_grad()
            (sum(losses) / 2).backward()
            optimizer.step()
    return model.state_dict()


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason=f"no torchrun next to {sys.executable}")
def test_torchrun_two_processes_on_gloo(tmp_path):
    checkpoint = tmp_path / "forecaster.pt"
    command = [TORCHRUN, "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               "-m", "fastvid", "train", "--task", "predict", "--model", "convlstm_forecaster",
               "--epochs", str(RUN["epochs"]), "--frames", str(RUN["frames"]), "--size", str(RUN["size"]),
               "--train-clips", str(RUN["train_clips"]), "--test-clips", "4", "--batch-size", str(RUN["batch_size"]),
               "--seed", str(RUN["seed"]), "--lr", str(RUN["lr"]), "--input-frames", str(RUN["input_frames"]),
               "--digits", str(RUN["digits"]), "--set", f"hidden_channels={RUN['hidden_channels']}",
               "--checkpoint", str(checkpoint)]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    # torch 2.9's gloo prints "[Gloo] Rank r is connected to ..." lines on stdout: not ours.
    lines = [line for line in done.stdout.splitlines() if not line.startswith("[Gloo]")]
    assert lines[0] == "distributed: world size 2, backend gloo", done.stdout
    assert done.stdout.count("distributed:") == 1  # rank 0 only
    assert done.stdout.count("per-frame MSE on held-out clips") == 1
    assert done.stderr.count(f"epoch {RUN['epochs']}/{RUN['epochs']} [") >= 1
    assert done.stderr.count("2/2 loss") == RUN["epochs"]  # one progress bar (rank 0), finished once per epoch
    assert [p.name for p in tmp_path.iterdir()] == ["forecaster.pt"]  # no leftover temporary file

    saved = torch.load(checkpoint)
    assert saved["epoch"] == RUN["epochs"]
    expected = replay_two_ranks()
    assert saved["model"].keys() == expected.keys()  # the unwrapped model's names (no 'module.' prefix)
    initial = build("convlstm_forecaster", in_channels=1, future_frames=2, hidden_channels=RUN["hidden_channels"])
    moved = 0
    for name, value in expected.items():
        # float32, 4 Adam steps: only the all-reduce's summation order differs
        torch.testing.assert_close(saved["model"][name], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        moved += int(not torch.equal(value, initial.state_dict()[name]))
    assert moved > 0


def test_sync_bn_needs_cuda():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match="--sync-bn needs --device cuda"):
        train.prepare_model(model, torch.device("cpu"), None, sync_batchnorm=True)


def test_not_distributed_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert train.init_distributed("cpu") is None


def test_two_stream_trains_data_parallel(tmp_path):
    """Under torchrun the model is DistributedDataParallel-wrapped, and the training step asked the wrapper's
    forward(*inputs) whether it takes flow: a two-stream model got none and failed its first batch. One
    process with torchrun's environment runs the same code path (process group, wrapper, sampler)."""
    command = [sys.executable, "-m", "fastvid", "train", "--model", "two_stream", "--frames", "4", "--size", "8",
               "--train-clips", "8", "--test-clips", "4", "--batch-size", "4", "--epochs", "1", "--quiet"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "distributed: world size 1, backend gloo" in done.stdout and "model two_stream: train accuracy" in done.stdout
