"""Methods that bring several registered parts at once (a regularizer and its stage, a conversion and its
model family): one module each. Importing this package registers them."""

from . import gating, merging, pfp, rmnet, scop, swp  # noqa: F401  (importing registers the parts)
