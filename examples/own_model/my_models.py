"""A model of your own for normsweep: any nn.Module whose constructor takes the data's shape and a norm factory."""

from torch import nn


class TinyResNet(nn.Module):
    """conv → norm → ReLU, two residual blocks, global average pool, linear. Every norm layer comes from `norm`,
    so `norm=none,bn,ln,in,gn,...` on the command line swaps all of them at once."""

    def __init__(self, in_channels, image_size, num_classes, norm, width=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), norm.act(width, layer="stem"))
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1),
                norm.act(width, layer=f"block{i}.1"),  # the norm, then its activation (ReLU, or FRN's own)
                nn.Conv2d(width, width, 3, padding=1),
                norm(width, layer=f"block{i}.2"),
            )
            for i in (1, 2)
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = (x + block(x)).relu()
        return self.head(x)
