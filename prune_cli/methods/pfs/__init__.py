"""Pruning from Scratch (Wang et al., AAAI 2020): channel gates learned on the random init (``gates``), the global
top gates that meet the MACs budget (``selection``) and the registered ``gates`` stage (``stage``)."""
