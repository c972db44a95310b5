"""TextGuidedSeg library: text-guided medical image segmentation, usable without Slicer."""

__version__ = "0.1.0"
