"""AdaptiveNet-style multi-branch supernets (the AN baseline of ECLM): the network and its training."""
