"""Weight-space analyses: delta norms, spectra and intruder dimensions, sign conflicts, TALL mask
overlaps (streamed tensor by tensor) and linear-mode-connectivity curves (which run the model)."""
