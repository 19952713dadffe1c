"""One module per provider dialect; see `base.Dialect`."""
