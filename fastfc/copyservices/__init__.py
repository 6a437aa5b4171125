"""Floors 3 and 4, the copy services: FlashCopy relationships and PPRC pairs,
and Global Mirror sessions (consistency groups with the two-phase revertible
FlashCopy protocol) over them."""
