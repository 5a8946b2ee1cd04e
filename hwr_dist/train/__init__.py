"""Training: `setup` builds a run, `loop` trains it, `run` is the whole job (`python -m hwr_dist.train`)."""
