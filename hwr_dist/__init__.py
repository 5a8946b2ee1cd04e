"""hwr-dist: distributed training for handwriting recognition."""

__version__ = "0.2.0"
