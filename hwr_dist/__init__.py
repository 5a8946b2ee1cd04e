"""hwr-dist: distributed training for handwriting recognition."""

__version__ = "0.1.0"
