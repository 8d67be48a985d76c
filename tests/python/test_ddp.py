"""DistributedDataParallel: a model with every module trains under DDP
with 2 CPU processes (gloo); the gradients equal those of one process on the whole batch."""

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from timm.layers.eca import EcaModule
from timm.layers.global_context import GlobalContext
from torchvision.ops.misc import SqueezeExcitation

import cnn_attention

WORLD = 2


class EveryModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.channel = cnn_attention.ChannelAttention(8, reduction=2)
        self.cbam = cnn_attention.CBAM(8, reduction=2, kernel_size=3)
        self.soft = cnn_attention.SoftAttention(kernel_size=3, normalize="softmax")
        self.hard = cnn_attention.HardAttention(kernel_size=3, mode="topk", keep_ratio=0.5)
        self.self_attention = cnn_attention.SelfAttention(8, num_heads=2, qk_reduction=2, kv_stride=2, gamma_init=0.5)
        # Zoo blocks after cnn_attention.convert: channel_attention, channel_gate and
        # soft_attention_pool with the blocks' own small modules between them.
        zoo_blocks = nn.Sequential(SqueezeExcitation(8, 4), EcaModule(8), GlobalContext(8, rd_ratio=0.5))
        self.converted = cnn_attention.convert(zoo_blocks)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.self_attention(self.hard(self.soft(self.cbam(self.channel(self.stem(x))))))
        x = self.converted(x)
        return self.head(x.mean((2, 3)))


def _batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 10, 10, generator=generator), torch.randint(0, 4, (8,), generator=generator)


def _model():
    torch.manual_seed(0)
    return EveryModule()


def _loss(model, x, target):
    return nn.functional.cross_entropy(model(x), target)


def _worker(rank, port, path):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = DistributedDataParallel(_model())
        x, target = _batch()
        share = x.shape[0] // WORLD
        local = slice(rank * share, (rank + 1) * share)
        _loss(model, x[local], target[local]).backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.module.named_parameters()}, path)
    finally:
        dist.destroy_process_group()
    # destroy_process_group does not join Gloo's worker threads: one may still be
    # releasing its last finished work item, whose saved thread-local state holds a
    # Python object, while the interpreter finalizes. Taking the GIL then ends that
    # thread inside a noexcept destructor and the process aborts (SIGABRT, about one
    # run in ten here). A successful worker therefore leaves without finalizing;
    # a failing one raises above, so spawn still reports its traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_gradients_equal_one_process_on_the_whole_batch(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    path = tmp_path / "grads.pt"
    mp.spawn(_worker, args=(_free_port(), str(path)), nprocs=WORLD, join=True)
    distributed = torch.load(path)
    model = _model()
    _loss(model, *_batch()).backward()
    expected = {n: p.grad for n, p in model.named_parameters()}
    assert distributed.keys() == expected.keys()
    for name, grad in expected.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(distributed[name], grad, rtol=1e-4, atol=1e-6, msg=name)
