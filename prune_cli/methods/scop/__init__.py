"""SCOP (Tang et al., NeurIPS 2020): the knockoff generator (``knockoff``) and the registered ``scop`` stage
(``stage``)."""
