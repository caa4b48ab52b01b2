"""Tables over many runs: collecting run directories, aggregating seeds, rendering and plotting."""
