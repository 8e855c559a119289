"""Channel pruning: which output channels must be removed together (`ChannelGroups`), and how to remove them.

`channel_groups` finds the groups by walking the graph; `channel_surgery` slices the groups' weights;
`prune` chooses which channels to remove.
"""

from __future__ import annotations

from onnxforge.passes.pruning.channel_groups import ChannelGroup, ChannelGroups, ChannelSlot
from onnxforge.passes.pruning.channel_surgery import remove_channels
from onnxforge.passes.pruning.prune import ChannelPruning

__all__ = ["ChannelGroup", "ChannelGroups", "ChannelPruning", "ChannelSlot", "remove_channels"]
