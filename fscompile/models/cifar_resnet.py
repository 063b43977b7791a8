"""The CIFAR ResNets of He et al. (2016, section 4.2): ``cifar_resnet20`` ... ``cifar_resnet110``.

Depth 6n+2: a 3x3 stem with 16 channels, three stages of n basic blocks (16, 32, 64 channels,
stride 2 at the start of stages 2 and 3) and a linear head on global average pooling. The
shortcut is "option A": identity, or where the shape changes the input subsampled and
zero-padded in channels (no parameters). Module names follow the widely used checkpoints
(``conv1``, ``bn1``, ``layer{1,2,3}.{i}.conv{1,2}``/``bn{1,2}``, ``linear``), so a state dict
from them loads as is. Torchvision has no such family (its ResNets are the ImageNet ones).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

PATTERN = re.compile(r"cifar_resnet(\d+)$")
WIDTHS = (16, 32, 64)


class PadShortcut(nn.Module):
    """Option A: every second row and column, zero-padded to ``out`` channels. The padding goes
    on both sides, as in the paper's code, so that checkpoints trained with it load unchanged."""

    def __init__(self, inp: int, out: int, stride: int) -> None:
        super().__init__()
        self.stride, self.pad = stride, (out - inp) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, then ReLU."""

    def __init__(self, inp: int, out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.shortcut = PadShortcut(inp, out, stride) if stride != 1 or inp != out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """``blocks[s]`` basic blocks in stage ``s`` (equal counts give the published depths)."""

    def __init__(self, blocks: tuple[int, int, int], num_classes: int = 10) -> None:
        super().__init__()
        self.blocks = tuple(blocks)
        self.conv1 = nn.Conv2d(3, WIDTHS[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        inp = WIDTHS[0]
        for s, (n, width) in enumerate(zip(blocks, WIDTHS)):
            layers = [BasicBlock(inp if i == 0 else width, width, 2 if s > 0 and i == 0 else 1) for i in range(n)]
            setattr(self, f"layer{s + 1}", nn.Sequential(*layers))
            inp = width
        self.linear = nn.Linear(WIDTHS[-1], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def depth_of(arch: str) -> int | None:
    """The depth named by ``cifar_resnetN`` (N = 6n+2), None for any other name."""
    m = PATTERN.match(arch)
    depth = int(m.group(1)) if m else 0
    return depth if depth >= 8 and (depth - 2) % 6 == 0 else None


def build(arch: str, num_classes: int) -> CifarResNet:
    """``cifar_resnetN`` (or a name :func:`arch_name` wrote), randomly initialised."""
    blocks = parse_blocks(arch)
    if blocks is None:
        raise ValueError(f"not a CIFAR ResNet name: {arch!r}")
    return CifarResNet(blocks, num_classes)


def drop_blocks(net: CifarResNet) -> tuple[CifarResNet, dict]:
    """The residual-network analogue of keeping every other layer: half of the blocks (rounded
    down), initialised from ``net``. Each stage keeps its odd-numbered blocks, or its first where
    the stage changes shape (it holds the only convolution across the stride); with an odd block
    count the block left in the budget goes to the last, widest stage, which then keeps its
    even-numbered ones (ResNet-56, 500 steps: 12 blocks 0.734, 13 blocks 0.766). A residual
    block dropped leaves its shortcut, so the rest still computes what it learnt."""
    import copy

    kept: list[list[int]] = []
    for s, n in enumerate(net.blocks):
        keep = list(range(1, n, 2)) or [0]
        if s > 0:
            keep[0] = 0
        kept.append(keep)
    last = net.blocks[-1]
    if sum(map(len, kept)) < sum(net.blocks) // 2 and last % 2 == 1:
        kept[-1] = list(range(0, last, 2))
    student = CifarResNet(tuple(len(k) for k in kept), net.linear.out_features)
    student.conv1, student.bn1, student.linear = (copy.deepcopy(m) for m in (net.conv1, net.bn1, net.linear))
    for s, keep in enumerate(kept):
        stage = getattr(net, f"layer{s + 1}")
        setattr(student, f"layer{s + 1}", nn.Sequential(*[copy.deepcopy(stage[i]) for i in keep]))
    return student, {"method": "residual blocks dropped", "blocks_before": list(net.blocks),
                     "blocks_kept": kept}


def stages(net: CifarResNet) -> list[nn.Module]:
    """The three stages, whose outputs keep their shapes whichever blocks a student dropped."""
    return [net.layer1, net.layer2, net.layer3]


def residual_stream(net: CifarResNet) -> list[nn.Module]:
    """The convolutions whose outputs are the residual stream (stem and each block's second):
    channel pruning leaves their widths, since the padding shortcuts fix them."""
    return [net.conv1] + [m.conv2 for m in net.modules() if isinstance(m, BasicBlock)]


def arch_name(net: CifarResNet) -> str:
    """``cifar_resnetN`` for equal stages, else ``cifar_resnet-a-b-c`` (blocks per stage)."""
    a, b, c = net.blocks
    return f"cifar_resnet{6 * a + 2}" if a == b == c else f"cifar_resnet-{a}-{b}-{c}"


def parse_blocks(arch: str) -> tuple[int, int, int] | None:
    """Blocks per stage from a name :func:`arch_name` writes, None for other names."""
    if (d := depth_of(arch)) is not None:
        n = (d - 2) // 6
        return n, n, n
    m = re.fullmatch(r"cifar_resnet-(\d+)-(\d+)-(\d+)", arch)
    return tuple(int(g) for g in m.groups()) if m else None  # type: ignore[return-value]
