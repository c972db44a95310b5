"""Labelled volumes in the MSD / nnU-Net layout, and 2D slices cut from them for training.

Layout (Medical Segmentation Decathlon, nnU-Net raw data)::

    ROOT/dataset.json      {"labels": {"0": "background", "1": "Anterior", ...}, "modality": {"0": "MRI"},
                            "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...]}
    ROOT/imagesTr/<case>.nii.gz   (nnU-Net v2 names channels <case>_0000.nii.gz: both are read)
    ROOT/labelsTr/<case>.nii.gz
    ROOT/split.json        optional: {"train": [case ids], "val": [...]} (also a list of such dicts,
                           nnU-Net's splits_final.json: fold 0 is used); without it every case is
                           in the split "all"

Prompts come from the label names through a per-dataset :class:`PromptTable`: each *target* is a
set of label values (one label, or a union such as hippocampus = anterior + posterior) with
its phrasings (the first is the canonical prompt; the others are synonyms used in training).
Datasets without a table get one target per label, named by its label name.

Slices for training are cut with :func:`TextGuidedSegLib.orientation.slice_layout` on the
volume's IJK->RAS, after the same per-volume intensity normalisation as the engine, so a model
sees at training time exactly the picture :func:`TextGuidedSegLib.engine.segment_volume` shows
it at inference. Slices where a target is absent are kept (target empty: "nothing here").
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

# Users speak of the patient: a volume's prompts name the patient's sides.
LATERALITY = "patient"


@dataclass(frozen=True)
class PromptTarget:
    """One thing a prompt can ask for: a union of label values and the ways to say it."""

    name: str
    labels: tuple[int, ...]
    phrasings: tuple[str, ...]

    @property
    def prompt(self) -> str:
        return self.phrasings[0]


@dataclass(frozen=True)
class PromptTable:
    """The prompts of one dataset. ``per_label`` targets score the dataset's labels one by one."""

    targets: tuple[PromptTarget, ...]

    def per_label(self) -> list[PromptTarget]:
        """The single-label targets, in label order (the evaluation's one prompt per label)."""
        singles = {t.labels[0]: t for t in self.targets if len(t.labels) == 1}
        return [singles[v] for v in sorted(singles)]

    def find(self, prompt: str) -> PromptTarget | None:
        """The target a prompt names (any phrasing, case and spacing ignored), or None."""
        key = _norm(prompt)
        for t in self.targets:
            if key in (_norm(p) for p in t.phrasings):
                return t
        return None


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def _t(name: str, labels: Sequence[int], *phrasings: str) -> PromptTarget:
    return PromptTarget(name, tuple(int(v) for v in labels), tuple(phrasings))


# Per-dataset prompt tables, keyed by lower-case dataset.json "name". Label values as the datasets
# publish them (MSD Task04 / Task09 / Task03; WORD v1; AbdomenCT-1K).
PROMPT_TABLES: dict[str, PromptTable] = {
    "hippocampus": PromptTable((
        _t("anterior", [1], "anterior hippocampus", "hippocampal head", "head of the hippocampus"),
        _t("posterior", [2], "posterior hippocampus", "hippocampal body and tail", "body and tail of the hippocampus"),
        _t("hippocampus", [1, 2], "hippocampus", "whole hippocampus", "hippocampal formation"),
    )),
    "spleen": PromptTable((
        _t("spleen", [1], "spleen", "splenic parenchyma"),
    )),
    "liver": PromptTable((
        _t("liver", [1], "liver", "hepatic parenchyma"),
        _t("cancer", [2], "liver tumour", "liver tumor", "hepatic lesion", "liver cancer"),
        _t("liver_and_tumour", [1, 2], "whole liver including tumours", "liver with lesions"),
    )),
    "word": PromptTable((
        _t("liver", [1], "liver"), _t("spleen", [2], "spleen"),
        _t("kidney_left", [3], "left kidney"), _t("kidney_right", [4], "right kidney"),
        _t("stomach", [5], "stomach"), _t("gallbladder", [6], "gallbladder", "gall bladder"),
        _t("esophagus", [7], "esophagus", "oesophagus"), _t("pancreas", [8], "pancreas"),
        _t("duodenum", [9], "duodenum"), _t("colon", [10], "colon", "large bowel"),
        _t("intestine", [11], "small intestine", "small bowel"), _t("adrenal", [12], "adrenal glands", "adrenals"),
        _t("rectum", [13], "rectum"), _t("bladder", [14], "urinary bladder", "bladder"),
        _t("head_of_femur_left", [15], "left femoral head", "head of the left femur"),
        _t("head_of_femur_right", [16], "right femoral head", "head of the right femur"),
        _t("kidneys", [3, 4], "kidneys", "both kidneys"),
        _t("femoral_heads", [15, 16], "femoral heads", "both femoral heads"),
    )),
    "abdomenct-1k": PromptTable((
        _t("liver", [1], "liver"), _t("kidney", [2], "kidneys", "both kidneys"),
        _t("spleen", [3], "spleen"), _t("pancreas", [4], "pancreas"),
    )),
}
# dataset.json names as the datasets spell them
PROMPT_TABLES["task04_hippocampus"] = PROMPT_TABLES["hippocampus"]
PROMPT_TABLES["task09_spleen"] = PROMPT_TABLES["spleen"]
PROMPT_TABLES["task03_liver"] = PROMPT_TABLES["liver"]
PROMPT_TABLES["abdomenct1k"] = PROMPT_TABLES["abdomenct-1k"]


def default_prompt_table(labels: dict[int, str]) -> PromptTable:
    """One target per foreground label, phrased by its label name (underscores become spaces)."""
    return PromptTable(tuple(_t(name, [v], name.replace("_", " ").lower()) for v, name in sorted(labels.items())
                             if v != 0))


@dataclass(frozen=True)
class VolumeCase:
    """One labelled volume of an MSD / nnU-Net dataset."""

    case_id: str
    image_path: Path
    label_path: Path | None
    laterality: str = LATERALITY


@dataclass
class MSDDataset:
    """What ``dataset.json`` says, plus the split's cases and the dataset's prompt table."""

    root: Path
    name: str
    modality: str
    labels: dict[int, str]
    prompts: PromptTable
    cases: list[VolumeCase] = field(default_factory=list)


def _image_file(root: Path, entry: str | None, case_id: str) -> Path:
    if entry:
        p = (root / entry).resolve() if not Path(entry).is_absolute() else Path(entry)
        if p.is_file():
            return p
    for name in (f"{case_id}.nii.gz", f"{case_id}_0000.nii.gz"):
        p = root / "imagesTr" / name
        if p.is_file():
            return p
    raise FileNotFoundError(f"MSD case {case_id}: no image in {root / 'imagesTr'}")


def _case_id(path: str) -> str:
    name = Path(path).name
    return re.sub(r"(_0000)?\.nii(\.gz)?$", "", name)


def _read_split(root: Path, split_file: str | Path | None) -> dict[str, list[str]] | None:
    path = Path(split_file) if split_file else root / "split.json"
    if not path.is_absolute() and split_file:
        path = root / path
    if not path.is_file():
        if split_file:
            raise FileNotFoundError(f"split file {path} not found")
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, list):  # nnU-Net splits_final.json: one {"train", "val"} per fold
        data = data[0]
    return {str(k): [str(c) for c in v] for k, v in data.items()}


def read_msd_dataset(root: str | Path, split: str, *, split_file: str | Path | None = None,
                     prompt_table: str | None = None) -> MSDDataset:
    """The cases of ``split`` (``all`` = every labelled case) with labels, modality and prompts.

    ``prompt_table`` picks a table from :data:`PROMPT_TABLES` by name (default: the dataset's own
    ``name``, else one target per label).
    """
    root = Path(root)
    meta_file = root / "dataset.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} not found: is {root} an MSD / nnU-Net dataset folder "
                                "(dataset.json, imagesTr/, labelsTr/)?")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    raw_labels = meta.get("labels") or {}
    # MSD: {"0": "background"}; nnU-Net v2: {"background": 0}
    if raw_labels and all(str(k).lstrip("-").isdigit() for k in raw_labels):
        labels = {int(k): str(v) for k, v in raw_labels.items()}
    else:
        labels = {int(v): str(k) for k, v in raw_labels.items() if not isinstance(v, (list, tuple))}
    if not any(v != 0 for v in labels):
        raise ValueError(f"{meta_file} names no foreground label")
    modality = meta.get("modality") or meta.get("channel_names") or {}
    modality_name = str(next(iter(modality.values()))) if isinstance(modality, dict) and modality else "unknown"
    name = str(meta.get("name", root.name))
    key = (prompt_table or name).lower()
    if prompt_table and key not in PROMPT_TABLES:
        raise KeyError(f"unknown prompt table {prompt_table!r}; known: {', '.join(sorted(PROMPT_TABLES))}")
    table = PROMPT_TABLES.get(key) or default_prompt_table(labels)
    missing = {v for t in table.targets for v in t.labels} - set(labels)
    if missing:
        raise ValueError(f"prompt table {key!r} uses label values {sorted(missing)} that {meta_file} does not name")

    entries = meta.get("training") or []
    if entries:
        pairs = [(_case_id(e["image"]), e.get("image"), e.get("label")) for e in entries]
    else:  # nnU-Net v2: no file list, the folders are the list
        pairs = [(_case_id(str(p)), None, None) for p in sorted((root / "labelsTr").glob("*.nii*"))]
    entry_of = {cid: (image, label) for cid, image, label in pairs}

    splits = _read_split(root, split_file)
    if splits is None:
        splits = {"all": list(entry_of)}
    else:
        splits.setdefault("all", list(entry_of))
    if split not in splits:
        raise ValueError(f"split {split!r} not found under {root}; available: {', '.join(sorted(splits))}")
    cases = []
    for cid in dict.fromkeys(splits[split]):
        # files are looked up for the split's cases only (a withheld split elsewhere may list cases
        # that dataset.json does not, and a copy may hold only some of dataset.json's cases)
        image, label = entry_of.get(cid, (None, None))
        label_path = (root / label).resolve() if label else root / "labelsTr" / f"{cid}.nii.gz"
        cases.append(VolumeCase(cid, _image_file(root, image, cid), label_path if label_path.is_file() else None))
    return MSDDataset(root, name, modality_name, labels, table, cases)


def read_msd(root: str | Path, split: str, **options) -> list[VolumeCase]:
    """``read_dataset("msd", ...)``: the split's :class:`VolumeCase` list."""
    return read_msd_dataset(root, split, **options).cases


def read_case(case: VolumeCase) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(image (k, j, i) float32, IJK->RAS 4x4, label map (k, j, i) int16 or None) of one case.

    Label maps stored as float (some MSD files) are rounded; the label grid must match the image's.
    """
    from ..io import read_volume

    image = read_volume(case.image_path)
    labels = None
    if case.label_path is not None:
        lab = read_volume(case.label_path)
        if lab.array.shape != image.array.shape or not np.allclose(lab.ijk_to_ras, image.ijk_to_ras, atol=1e-3):
            raise ValueError(f"case {case.case_id}: label map and image are on different grids")
        labels = np.rint(lab.array).astype(np.int16)
    return image.array.astype(np.float32), image.ijk_to_ras, labels


def target_mask(labels: np.ndarray, target: PromptTarget) -> np.ndarray:
    return np.isin(labels, target.labels)


# ----------------------------------------------------------------------------- training slices
@dataclass(frozen=True)
class SliceItem:
    """One training / validation sample: a slice of a case and the prompt asked of it."""

    case_id: str
    text: str
    plane: str
    laterality: str = LATERALITY


class _Rows:
    """``dataset.images[list_of_item_indices]`` without storing one image per prompt."""

    def __init__(self, images: torch.Tensor, slice_of: torch.Tensor) -> None:
        self.images, self.slice_of = images, slice_of

    def __getitem__(self, idx) -> torch.Tensor:
        return self.images[self.slice_of[idx]]

    def __len__(self) -> int:
        return len(self.slice_of)


class VolumeSliceDataset(Dataset):
    """Every slice of every case along ``planes``, once per prompt target, in memory.

    Each volume is normalised as a whole (the model's intensity config, as the engine does), cut
    into slices with :func:`slice_layout` (radiological layout from IJK->RAS), and each slice is
    resized to ``image_size`` square (bilinear, as the engine); the target masks are resized
    area-weighted (>= 0.5). Slices where a target is absent stay in, with an empty mask, unless
    ``empty_fraction`` < 1 keeps only that (seeded) share of them.
    Items are dicts with ``image`` [C, S, S], ``mask`` [1, S, S], ``text``, ``index``, as
    :class:`TextGuidedSegLib.data.dataset.PreloadedDataset`, so the training loop takes either.
    ``texts`` cycles through each target's phrasings (synonyms) over the slices; ``canonical_only``
    uses the first phrasing everywhere (validation). ``keep_native_masks`` keeps each item's mask at
    the slice's own size for scoring (``native_masks``).
    """

    def __init__(self, cases: Sequence[VolumeCase], prompts: PromptTable, image_size: int, intensity,
                 in_channels: int = 1, planes: Sequence[str] = ("axial",), transforms=None,
                 keep_native_masks: bool = False, canonical_only: bool = False, empty_fraction: float = 1.0,
                 seed: int = 0) -> None:
        from ..orientation import PLANES, slice_layout
        from ..preprocessing import normalize_intensity, resize_images, resize_masks

        if not cases:
            raise ValueError("dataset is empty: no cases were found for this split")
        if not 0.0 <= empty_fraction <= 1.0:
            raise ValueError(f"empty_fraction must be in [0, 1], got {empty_fraction}")
        for p in planes:
            if p not in PLANES:
                raise ValueError(f"plane must be one of {PLANES}, got {p!r}")
        self.transforms = transforms
        self.in_channels = in_channels
        rng = np.random.default_rng(seed)
        size = (image_size, image_size)
        images, slice_of, masks = [], [], []
        self.cases: list[SliceItem] = []
        self.native_masks: list[np.ndarray] = []
        self.targets = list(prompts.targets)
        n_slice = 0
        for case in cases:
            volume, ijk_to_ras, labels = read_case(case)
            if labels is None:
                raise ValueError(f"case {case.case_id} has no label map: it cannot be used for training")
            normalised = normalize_intensity(volume, intensity)
            for plane in planes:
                layout = slice_layout(ijk_to_ras, volume.shape, plane)
                img_slices = layout.to_slices(normalised)
                lab_slices = layout.to_slices(labels)
                img_t = torch.from_numpy(np.ascontiguousarray(img_slices))[:, None]
                images.append(resize_images(img_t, size).half())
                for s in range(img_slices.shape[0]):
                    for ti, target in enumerate(self.targets):
                        m = np.isin(lab_slices[s], target.labels)
                        if not m.any() and empty_fraction < 1.0 and rng.random() >= empty_fraction:
                            continue
                        phr = target.phrasings
                        text = phr[0] if canonical_only else phr[(n_slice + s) % len(phr)]
                        self.cases.append(SliceItem(case.case_id, text, plane))
                        slice_of.append(n_slice + s)
                        masks.append(resize_masks(torch.from_numpy(m)[None, None], size)[0].to(torch.uint8))
                        if keep_native_masks:
                            self.native_masks.append(m)
                n_slice += img_slices.shape[0]
        self._images = torch.cat(images)
        self.slice_of = torch.tensor(slice_of, dtype=torch.long)
        self.images = _Rows(self._images, self.slice_of)
        self.masks = torch.stack(masks)
        empty = int((self.masks.flatten(1).amax(1) == 0).sum())
        logger.info("%d cases -> %d slices; with %d prompt targets each, %d items kept (%d with an empty target) "
                    "at %dx%d", len(cases), n_slice, len(self.targets), len(self.cases), empty, image_size, image_size)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict:
        image = self._images[self.slice_of[i]].float()
        if self.in_channels == 3:
            image = image.expand(3, -1, -1)
        sample = {"image": image, "mask": self.masks[i].float(), "text": self.cases[i].text, "index": i}
        if self.transforms is not None:
            from .dataset import _plain

            sample = self.transforms(sample)
            sample["image"] = _plain(sample["image"]).float()
            sample["mask"] = (_plain(sample["mask"]) > 0.5).float()
        return sample
