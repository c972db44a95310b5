"""Dataset readers (take a root and a split name: the withheld test splits share the layout)."""

from __future__ import annotations

from pathlib import Path

from .cases import SegmentationCase, read_grey, read_mask, read_rgb
from .csv_reader import read_csv
from .kvasir import read_kvasir
from .msd import PROMPT_TABLES, MSDDataset, VolumeCase, VolumeSliceDataset, read_msd, read_msd_dataset
from .qata import read_qata
from .synthseg import BRAIN_PROMPTS, atlas_prompt_table

# brain structures by FreeSurfer value (label maps, SynthSeg); "brain-aal": the six pairs an atlas names
PROMPT_TABLES["brain"] = BRAIN_PROMPTS
PROMPT_TABLES["brain-aal"] = atlas_prompt_table()

READERS = {"qata": read_qata, "kvasir": read_kvasir, "csv": read_csv, "msd": read_msd}
# readers whose cases are labelled volumes (3D scoring, slice sampling for training)
VOLUME_KINDS = ("msd",)


def read_dataset(kind: str, root: str | Path, split: str, **options) -> list[SegmentationCase]:
    """``kind`` in qata / kvasir / csv / msd; ``options`` go to the reader (e.g. Kvasir's ``prompt``)."""
    if kind not in READERS:
        raise KeyError(f"unknown dataset kind {kind!r}; known: {', '.join(sorted(READERS))}")
    return READERS[kind](root, split, **options)


__all__ = ["MSDDataset", "READERS", "VOLUME_KINDS", "VolumeCase", "VolumeSliceDataset", "read_msd", "read_msd_dataset",
           "SegmentationCase", "read_csv", "read_dataset", "read_grey", "read_kvasir", "read_mask",
           "read_qata", "read_rgb"]
