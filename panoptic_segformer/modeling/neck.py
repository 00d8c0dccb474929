"""The neck: backbone features C3-C5 projected to one width, plus extra coarser levels.

Shape shorthand: N batch, C_i channels of input level i, D = out_channels, H_l, W_l level sizes.
"""

from typing import List, Sequence

from torch import Tensor, nn


class ChannelMapper(nn.Module):
    """1x1 conv + GroupNorm per input level, then 3x3 stride-2 conv + GroupNorm extra levels.

    As the authors' code (mmdet's ChannelMapper, no activation): the first extra level is
    computed from the last *input* (C5), later ones from the previous output. With C3-C5 and
    ``num_outs=4`` this gives strides 8, 16, 32 and 64.

    Args:
        in_channels: channels of each input level, finest first.
        out_channels: channels D of every output level.
        num_outs: output levels (>= len(in_channels)).
        num_groups: GroupNorm groups.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int = 256,
        num_outs: int = 4,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        in_channels = list(in_channels)
        if not in_channels or any(c < 1 for c in in_channels):
            raise ValueError(f"in_channels must be positive channel counts, got {in_channels}")
        if num_outs < len(in_channels):
            raise ValueError(
                f"num_outs ({num_outs}) must be at least the number of inputs ({len(in_channels)})"
            )
        if out_channels % num_groups:
            raise ValueError(
                f"out_channels ({out_channels}) must be divisible by num_groups ({num_groups})"
            )
        self.in_channels = in_channels
        # Conv biases are dropped before a norm layer, as mmdet's ConvModule does.
        self.lateral_convs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, out_channels, kernel_size=1, bias=False),
                nn.GroupNorm(num_groups, out_channels),
            )
            for c in in_channels
        )
        num_extra = num_outs - len(in_channels)
        extra_in = ([in_channels[-1]] + [out_channels] * (num_extra - 1))[:num_extra]
        self.extra_convs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, out_channels, kernel_size=3, stride=2, padding=1, bias=False),
                nn.GroupNorm(num_groups, out_channels),
            )
            for c in extra_in
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)

    def forward(self, features: Sequence[Tensor]) -> List[Tensor]:
        """
        Args:
            features: len(in_channels) tensors (N, C_i, H_i, W_i), finest first.

        Returns:
            list of num_outs tensors (N, D, H_l, W_l), finest first.
        """
        if len(features) != len(self.in_channels):
            raise ValueError(
                f"expected {len(self.in_channels)} feature levels, got {len(features)}"
            )
        for i, (f, c) in enumerate(zip(features, self.in_channels)):
            if f.dim() != 4 or f.shape[1] != c:
                raise ValueError(f"feature level {i} must be (N, {c}, H, W), got {tuple(f.shape)}")
        # contiguous (N, C, H, W): on a channels-last backbone's maps GroupNorm would reduce in an
        # order that depends on the number of threads (results would differ between processes)
        features = [f.contiguous() for f in features]
        outs = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        source = features[-1]
        for conv in self.extra_convs:
            outs.append(conv(source))
            source = outs[-1]
        return outs
