"""How important a channel is: the criteria that score channels and the regularizers that train them toward zero,
one formula each."""
