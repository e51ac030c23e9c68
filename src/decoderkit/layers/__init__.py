"""Building blocks of the decoder: norms, positions, attention, MLPs."""
