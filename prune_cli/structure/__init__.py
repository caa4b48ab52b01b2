"""What a network's channels are: the traced channel graph, channel groups, masking and surgery, counting of
params and MACs, and the selection engine that turns scores into kept channels."""
