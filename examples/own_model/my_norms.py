"""A norm of your own for normsweep: any class or function that takes the number of channels and returns a module."""

import torch
from torch import nn


class MyLayerNorm(nn.Module):
    """LayerNorm over (C, H, W) of each sample, with one learned scale and shift per channel."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x):
        var, mean = torch.var_mean(x, dim=(1, 2, 3), correction=0, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
