"""Small CNNs with attention at a shallow (high-resolution) and a deep stage, shared by the
runtime tests, the demo and the C++ tests."""

import torch
from torch import nn

import cnn_attention


class TinyAttentionCNN(nn.Module):
    def __init__(self, channels: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU())
        self.shallow_attention = cnn_attention.ChannelAttention(channels, reduction=2, pool="avgmax")
        self.down = nn.Sequential(nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.ReLU())
        self.deep_attention = cnn_attention.ChannelAttention(2 * channels, reduction=4, gate="softmax")
        self.head = nn.Linear(2 * channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shallow_attention(self.stem(x))
        x = self.deep_attention(self.down(x))
        pooled = torch.ops.cnn_attention.channel_pool(x)  # exercised as an op of its own too
        return self.head(x.mean((2, 3))) + pooled.mean()


class TinySpatialAttentionCNN(nn.Module):
    """Soft (the module: cbam_spatial) and CBAM attention at a shallow stage, hard and softmax
    soft attention at a deep one, and attention pooling as the head."""

    def __init__(self, channels: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU())
        self.soft_attention = cnn_attention.SoftAttention(kernel_size=3, temperature=0.5)
        self.cbam = cnn_attention.CBAM(channels, reduction=2, kernel_size=3)
        self.down = nn.Sequential(nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.ReLU())
        # keep_mask: the C++ test reads the mask of an eval-mode forward.
        self.hard_attention = cnn_attention.HardAttention(kernel_size=3, mode="topk", keep_ratio=0.25, keep_mask=True)
        self.pool_scores = nn.Conv2d(2 * channels, 1, 1)
        self.head = nn.Linear(2 * channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cbam(self.soft_attention(self.stem(x)))
        x = self.hard_attention(self.down(x))
        # One score map for a softmax soft attention and the attention pooling after it.
        scores = self.pool_scores(x)
        x = torch.ops.cnn_attention.soft_attention(x, scores, "softmax", 1.0)
        pooled = torch.ops.cnn_attention.soft_attention_pool(x, scores, 1.0)
        return self.head(pooled)


class TinySelfAttentionCNN(nn.Module):
    """Self attention at the shallow stage (keys and values pooled by 3, which does not divide
    16: the trailing row and column fill no window) and a two-head one at the deep stage;
    gamma starts at 0.5 so that the attention shapes the output."""

    def __init__(self, channels: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU())
        self.shallow_attention = cnn_attention.SelfAttention(channels, qk_reduction=2, kv_stride=3, gamma_init=0.5)
        self.down = nn.Sequential(nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.ReLU())
        self.deep_attention = cnn_attention.SelfAttention(2 * channels, num_heads=2, qk_reduction=4, gamma_init=0.5)
        self.head = nn.Linear(2 * channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shallow_attention(self.stem(x))
        x = self.deep_attention(self.down(x))
        return self.head(x.mean((2, 3)))


class TinyAllFamiliesCNN(nn.Module):
    """All four families in one model: channel attention and CBAM at the shallow stage, hard
    attention and self attention at the deep stage, soft attention pooling as the head."""

    def __init__(self, channels: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU())
        self.channel_attention = cnn_attention.ChannelAttention(channels, reduction=2)
        self.cbam = cnn_attention.CBAM(channels, reduction=2, kernel_size=3)
        self.down = nn.Sequential(nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.ReLU())
        self.hard_attention = cnn_attention.HardAttention(kernel_size=3, mode="topk", keep_ratio=0.5)
        self.self_attention = cnn_attention.SelfAttention(2 * channels, num_heads=2, qk_reduction=4, gamma_init=0.5)
        self.pool_scores = nn.Conv2d(2 * channels, 1, 1)
        self.head = nn.Linear(2 * channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cbam(self.channel_attention(self.stem(x)))
        x = self.self_attention(self.hard_attention(self.down(x)))
        return self.head(torch.ops.cnn_attention.soft_attention_pool(x, self.pool_scores(x), 1.0))


class TinyInsertedCNN(nn.Module):
    """A small ResNet of torchvision BasicBlocks into which cnn_attention.insert put CBAM in every
    block (after bn2, held by the norm and applied by a forward hook) and self attention after
    the last block: the hooks are what TorchScript must keep."""

    def __init__(self, channels: int = 8, classes: int = 10) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(channels, channels), BasicBlock(channels, channels))
        downsample = nn.Sequential(nn.Conv2d(channels, 2 * channels, 1, stride=2), nn.BatchNorm2d(2 * channels))
        self.layer2 = nn.Sequential(BasicBlock(channels, 2 * channels, stride=2, downsample=downsample))
        self.head = nn.Linear(2 * channels, classes)
        example = torch.randn(1, 3, 16, 16)
        cnn_attention.insert(self, lambda c: cnn_attention.CBAM(c, reduction=2, kernel_size=3), "all", example, per_block=True)
        cnn_attention.insert(self, lambda c: cnn_attention.SelfAttention(c, qk_reduction=4, gamma_init=0.5), "deep", example)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.head(x.mean((2, 3)))
