"""Channel pruning: which output channels must be removed together (`ChannelGroups`), and how to remove them.

`channel_groups` finds the groups by walking the graph; `channel_surgery` slices one group's weights.
The `prune` pass that chooses channels to remove is built on these two.
"""

from __future__ import annotations

from onnxforge.passes.pruning.channel_groups import ChannelGroup, ChannelGroups, ChannelSlot
from onnxforge.passes.pruning.channel_surgery import remove_channels

__all__ = ["ChannelGroup", "ChannelGroups", "ChannelSlot", "remove_channels"]
