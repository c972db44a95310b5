"""Brain MR training images generated from label maps (SynthSeg-style domain randomisation).

No labelled brain MR images in quantity are at hand, but whole-brain label maps are (FreeSurfer
label values, e.g. SynthSeg's 20 training maps). Following Billot et al. ("SynthSeg", Medical Image
Analysis 86, 2023), every training sample is an image *generated* from a label map with every
acquisition property drawn at random, so the model cannot rely on any one contrast and segments
real scans of any contrast:

1. an axial slice of a label map, cut in the engine's radiological layout
   (:func:`TextGuidedSegLib.orientation.slice_layout` on the map's IJK->RAS: columns run from the
   patient's right to left), so 'left' always means the patient's left;
2. a random field of view around the head (size, aspect ratio, centre), resized to the model's
   square input, then a random affine + elastic deformation (MONAI ``Rand2DElastic``, nearest);
3. optionally a left-right mirror of the slice *with the left / right label values swapped*: the
   mirrored left hippocampus is labelled right hippocampus, the same as swapping the words of
   the prompt;
4. a Gaussian mixture: each label value gets its own random mean and spread in this sample;
5. MONAI's ``RandGaussianSmooth`` (blur), ``RandSimulateLowResolution`` (resolution loss),
   ``RandBiasField``, ``RandGaussianNoise`` and ``RandAdjustContrast`` (gamma); then the slice is
   normalised to [0, 1] by its 0.5 / 99.5 percentiles, as the engine normalises a volume.

Prompts come from :data:`BRAIN_PROMPTS`: every structure by name with synonyms and phrasings, the
two sides and both sides together ("hippocampi", "both thalami", a structure named without a side),
and prompts for structures absent from a slice (target: empty).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .msd import PromptTable, PromptTarget

logger = logging.getLogger(__name__)

# FreeSurfer left label -> right label of the same structure (SynthSeg's label table)
LEFT_RIGHT = {2: 41, 3: 42, 4: 43, 5: 44, 7: 46, 8: 47, 10: 49, 11: 50, 12: 51, 13: 52, 17: 53, 18: 54,
              26: 58, 28: 60, 30: 62, 31: 63}
# labels that belong to the brain (not skull, scalp, background, extra-cerebral CSF)
BRAIN_LABELS = tuple(sorted({*LEFT_RIGHT, *LEFT_RIGHT.values(), 14, 15, 16}))


@dataclass(frozen=True)
class Structure:
    """A paired brain structure: FreeSurfer label values of its left and right parts and its names.

    ``names``: singular names (the first is canonical); ``plural``: names of both together.
    """

    key: str
    left: tuple[int, ...]
    right: tuple[int, ...]
    names: tuple[str, ...]
    plural: tuple[str, ...]


STRUCTURES: tuple[Structure, ...] = (
    Structure("hippocampus", (17,), (53,), ("hippocampus", "hippocampal formation"), ("hippocampi",)),
    Structure("amygdala", (18,), (54,), ("amygdala", "amygdaloid body"), ("amygdalae", "amygdalas")),
    Structure("thalamus", (10,), (49,), ("thalamus",), ("thalami",)),
    Structure("caudate", (11,), (50,), ("caudate nucleus", "caudate"), ("caudate nuclei", "caudates")),
    Structure("putamen", (12,), (51,), ("putamen",), ("putamina", "putamens")),
    Structure("pallidum", (13,), (52,), ("pallidum", "globus pallidus"), ("pallida", "globi pallidi")),
    Structure("accumbens", (26,), (58,), ("nucleus accumbens", "accumbens area"), ("accumbens nuclei",)),
    Structure("lateral_ventricle", (4,), (43,), ("lateral ventricle",), ("lateral ventricles",)),
    Structure("inferior_lateral_ventricle", (5,), (44,), ("temporal horn of the lateral ventricle",
                                                          "inferior lateral ventricle"),
              ("temporal horns of the lateral ventricles", "inferior lateral ventricles")),
    Structure("cerebral_white_matter", (2,), (41,), ("cerebral white matter", "hemispheric white matter"),
              ("cerebral white matter of both hemispheres",)),
    Structure("cerebral_cortex", (3,), (42,), ("cerebral cortex", "cortical grey matter"),
              ("cerebral cortex of both hemispheres",)),
    Structure("cerebellum", (7, 8), (46, 47), ("cerebellar hemisphere", "cerebellum"), ("cerebellar hemispheres",)),
    Structure("cerebellar_white_matter", (7,), (46,), ("cerebellar white matter",),
              ("cerebellar white matter of both sides",)),
    Structure("cerebellar_cortex", (8,), (47,), ("cerebellar cortex",), ("cerebellar cortex of both sides",)),
    Structure("ventral_dc", (28,), (60,), ("ventral diencephalon", "ventral DC"), ("ventral diencephalons",)),
)
# midline structures: one label, no side
MIDLINE: tuple[tuple[str, tuple[int, ...], tuple[str, ...]], ...] = (
    ("third_ventricle", (14,), ("third ventricle", "3rd ventricle")),
    ("fourth_ventricle", (15,), ("fourth ventricle", "4th ventricle")),
    ("brainstem", (16,), ("brainstem", "brain stem", "brain-stem")),
)


def _side_phrasings(side: str, names: Sequence[str]) -> tuple[str, ...]:
    out = []
    for name in names:
        out += [f"{side} {name}", f"{name}, {side} side", f"the {side} {name}", f"{name} on the {side}"]
    return tuple(dict.fromkeys(out))


def _both_phrasings(names: Sequence[str], plural: Sequence[str]) -> tuple[str, ...]:
    out = [plural[0], f"both {plural[0]}", f"left and right {names[0]}", f"bilateral {names[0]}", names[0]]
    out += [p for p in plural[1:]] + [f"both {p}" for p in plural[1:]] + list(names[1:])
    return tuple(dict.fromkeys(out))


def brain_prompt_table() -> PromptTable:
    """Left, right and both sides of every paired structure, and the midline structures.

    The first phrasing of each target is its canonical prompt ("left hippocampus", "hippocampi").
    A structure named without a side ("hippocampus") means both sides.
    """
    targets = []
    for s in STRUCTURES:
        targets.append(PromptTarget(f"left_{s.key}", s.left, _side_phrasings("left", s.names)))
        targets.append(PromptTarget(f"right_{s.key}", s.right, _side_phrasings("right", s.names)))
        targets.append(PromptTarget(f"both_{s.key}", s.left + s.right, _both_phrasings(s.names, s.plural)))
    for key, labels, names in MIDLINE:
        targets.append(PromptTarget(key, labels, names))
    return PromptTable(tuple(targets))


BRAIN_PROMPTS = brain_prompt_table()


def swap_lookup(max_label: int) -> np.ndarray:
    """Label value -> the value of the same structure on the other side (identity elsewhere)."""
    table = np.arange(max_label + 1, dtype=np.int32)
    for left, right in LEFT_RIGHT.items():
        if right <= max_label:
            table[left], table[right] = right, left
    return table


# ----------------------------------------------------------------------------- label maps
@dataclass
class LabelSlices:
    """Axial label slices of several maps, in the engine's layout, as compact label indices.

    ``slices`` [N, H, W] uint8 indices into ``values`` (the FreeSurfer label values present);
    ``case_of`` [N] the map each slice came from; ``boxes`` [N, 4] the head's bounding box
    (row0, row1, col0, col1) in each slice.
    """

    slices: np.ndarray
    values: np.ndarray
    case_of: np.ndarray
    boxes: np.ndarray
    case_ids: list[str]


def label_map_files(root: str | Path) -> list[Path]:
    files = sorted(Path(root).glob("*.nii*"))
    if not files:
        raise FileNotFoundError(f"no label maps (*.nii / *.nii.gz) in {root}")
    return files


def read_label_slices(files: Sequence[str | Path], plane: str = "axial", min_brain_voxels: int = 200) -> LabelSlices:
    """Cut every map along ``plane`` in the radiological layout; keep slices with some brain."""
    from ..io import read_volume
    from ..orientation import slice_layout

    per_case, values = [], set()
    for f in files:
        vol = read_volume(f)
        lab = np.rint(vol.array).astype(np.int32)
        layout = slice_layout(vol.ijk_to_ras, lab.shape, plane)
        per_case.append(np.ascontiguousarray(layout.to_slices(lab)))
        values |= set(np.unique(lab).tolist())
    # each side's partner gets an index too, so a mirrored slice can always be relabelled
    partners = {**LEFT_RIGHT, **{r: left for left, r in LEFT_RIGHT.items()}}
    values |= {partners[v] for v in values if v in partners}
    values_arr = np.array(sorted(values), dtype=np.int32)
    if len(values_arr) > 255:
        raise ValueError(f"{len(values_arr)} distinct label values: at most 255 are supported")
    index = np.zeros(values_arr.max() + 1, dtype=np.uint8)
    index[values_arr] = np.arange(len(values_arr), dtype=np.uint8)
    brain = np.isin(np.arange(values_arr.max() + 1), BRAIN_LABELS)
    slices, case_of, boxes = [], [], []
    for c, lab in enumerate(per_case):
        for s in range(lab.shape[0]):
            sl = lab[s]
            if brain[sl].sum() < min_brain_voxels:
                continue
            rows, cols = np.nonzero(sl)
            boxes.append((rows.min(), rows.max() + 1, cols.min(), cols.max() + 1))
            slices.append(index[sl])
            case_of.append(c)
    logger.info("%d label maps -> %d %s slices with brain, %d label values", len(files), len(slices), plane,
                len(values_arr))
    return LabelSlices(np.stack(slices), values_arr, np.array(case_of), np.array(boxes, dtype=np.int32),
                       [Path(f).name.split(".")[0] for f in files])


# ----------------------------------------------------------------------------- generator
@dataclass
class GeneratorConfig:
    """Ranges of the random acquisition (intensities in [0, 1] before normalisation).

    Args:
        fov_scale: field of view as a multiple of the head's bounding box (larger = smaller head).
        aspect: range of the field of view's height / width, before it is resized to a square.
        shift: centre jitter as a fraction of the field of view.
        rotate_deg, scale, elastic_magnitude: affine and elastic deformation (MONAI Rand2DElastic).
        mirror_prob: left-right mirror with the sides' labels swapped.
        mean_range, std_range: per-label Gaussian mixture (SynthSeg: 25-225 and 5-25 of 255).
        blur_sigma, lowres_prob, lowres_zoom, bias_prob, bias_coeff, noise_std, gamma_range: artefacts.
    """

    fov_scale: tuple[float, float] = (1.0, 1.4)
    aspect: tuple[float, float] = (0.8, 1.3)
    shift: float = 0.08
    rotate_deg: float = 12.0
    scale: float = 0.1
    elastic_magnitude: tuple[float, float] = (0.0, 3.0)
    mirror_prob: float = 0.5
    mean_range: tuple[float, float] = (0.1, 0.9)
    std_range: tuple[float, float] = (0.0, 0.08)
    blur_sigma: tuple[float, float] = (0.0, 1.0)
    lowres_prob: float = 0.25
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    bias_prob: float = 0.5
    bias_coeff: float = 0.3
    noise_std: float = 0.03
    gamma_range: tuple[float, float] = (0.6, 1.6)


class BrainSliceGenerator:
    """Generates (image, label slice) pairs from label slices; seeded, so a sample is reproducible."""

    def __init__(self, labels: LabelSlices, image_size: int, config: GeneratorConfig | None = None) -> None:
        from monai.transforms import (Rand2DElastic, RandAdjustContrast, RandBiasField, RandGaussianNoise,
                                      RandGaussianSmooth, RandSimulateLowResolution)

        self.labels, self.size = labels, int(image_size)
        self.cfg = cfg = config or GeneratorConfig()
        self.swap = swap_lookup(int(labels.values.max()))
        # index -> index of the mirrored label
        position = {int(v): i for i, v in enumerate(labels.values)}
        self.swap_index = np.array([position.get(int(self.swap[v]), i) for i, v in enumerate(labels.values)],
                                   dtype=np.uint8)
        self.deform = Rand2DElastic(spacing=(self.size / 4, self.size / 4), magnitude_range=cfg.elastic_magnitude,
                                    prob=1.0, rotate_range=(math.radians(cfg.rotate_deg),),
                                    scale_range=(cfg.scale, cfg.scale), mode="nearest", padding_mode="zeros")
        self.blur = RandGaussianSmooth(sigma_x=cfg.blur_sigma, sigma_y=cfg.blur_sigma, prob=0.7)
        self.lowres = RandSimulateLowResolution(prob=cfg.lowres_prob, zoom_range=cfg.lowres_zoom,
                                                upsample_mode="bilinear")
        self.bias = RandBiasField(degree=3, coeff_range=(0.0, cfg.bias_coeff), prob=cfg.bias_prob)
        self.noise = RandGaussianNoise(prob=0.8, std=cfg.noise_std)
        self.gamma = RandAdjustContrast(prob=0.8, gamma=cfg.gamma_range)
        self._transforms = (self.deform, self.blur, self.lowres, self.bias, self.noise, self.gamma)

    def _seed(self, rng: np.random.Generator) -> None:
        for t in self._transforms:
            t.set_random_state(seed=int(rng.integers(2 ** 31)))

    def label_slice(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """Slice ``index`` as label *values* [S, S]: random field of view, deformed, maybe mirrored."""
        cfg, size = self.cfg, self.size
        sl = self.labels.slices[index]
        r0, r1, c0, c1 = self.labels.boxes[index]
        side = max(r1 - r0, c1 - c0) * rng.uniform(*cfg.fov_scale)
        aspect = rng.uniform(*cfg.aspect)
        h, w = side * math.sqrt(aspect), side / math.sqrt(aspect)
        cy = (r0 + r1) / 2 + rng.uniform(-cfg.shift, cfg.shift) * h
        cx = (c0 + c1) / 2 + rng.uniform(-cfg.shift, cfg.shift) * w
        # nearest-neighbour resampling of the field of view onto the S x S grid (outside = background)
        ys = np.floor(cy - h / 2 + (np.arange(size) + 0.5) * h / size).astype(np.int64)
        xs = np.floor(cx - w / 2 + (np.arange(size) + 0.5) * w / size).astype(np.int64)
        inside = ((ys >= 0) & (ys < sl.shape[0]))[:, None] & ((xs >= 0) & (xs < sl.shape[1]))[None, :]
        crop = sl[np.clip(ys, 0, sl.shape[0] - 1)][:, np.clip(xs, 0, sl.shape[1] - 1)]
        crop = np.where(inside, crop, 0).astype(np.float32)  # index 0 is label value 0 (background)
        self.deform.set_random_state(seed=int(rng.integers(2 ** 31)))
        crop = np.asarray(self.deform(crop[None], mode="nearest"))[0]
        idx = np.rint(crop).astype(np.uint8)
        if rng.random() < cfg.mirror_prob:
            idx = self.swap_index[idx[:, ::-1]]
        return self.labels.values[idx]

    def image(self, label_values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A random-contrast image [S, S] in [0, 1] for a label slice (Gaussian mixture + artefacts)."""
        cfg = self.cfg
        values, inverse = np.unique(label_values, return_inverse=True)
        means = rng.uniform(*cfg.mean_range, size=len(values)).astype(np.float32)
        stds = rng.uniform(*cfg.std_range, size=len(values)).astype(np.float32)
        inverse = inverse.reshape(label_values.shape)
        img = means[inverse] + stds[inverse] * rng.standard_normal(label_values.shape).astype(np.float32)
        x = torch.from_numpy(np.clip(img, 0, 1))[None]
        self._seed(rng)
        for t in (self.blur, self.lowres, self.bias):
            x = t(x)
        x = torch.as_tensor(np.asarray(x)).clamp(0, 1)
        x = self.gamma(self.noise(x).clamp(0, 1))
        out = np.asarray(x, dtype=np.float32)[0]
        lo, hi = np.percentile(out, (0.5, 99.5))
        return np.clip((out - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)


# ----------------------------------------------------------------------------- datasets
def _choose_targets(label_values: np.ndarray, table: PromptTable, k: int, absent_fraction: float,
                    rng: np.random.Generator) -> list[PromptTarget]:
    present_values = set(np.unique(label_values).tolist())
    present = [t for t in table.targets if present_values & set(t.labels)]
    absent = [t for t in table.targets if not present_values & set(t.labels)]
    chosen = []
    for _ in range(k):
        pool = absent if (absent and (not present or rng.random() < absent_fraction)) else present
        chosen.append(pool[int(rng.integers(len(pool)))])
    return chosen


def _phrasing(target: PromptTarget, rng: np.random.Generator) -> str:
    # the canonical phrasing half of the time, a synonym otherwise
    p = target.phrasings
    return p[0] if len(p) == 1 or rng.random() < 0.5 else p[int(rng.integers(1, len(p)))]


class SynthBrainDataset(Dataset):
    """Training items generated on the fly: one image, ``prompts_per_image`` prompts and masks.

    Items: ``image`` [1, S, S], ``mask`` [K, S, S], ``text`` (K prompts). :meth:`collate` stacks
    them so the model sees every image once with its K prompts (``text`` and ``mask`` of length
    B x K, grouped by image: the models that share image features across prompts run the image
    part once). ``focus_labels``: half of the slices are drawn among those that contain one of
    these labels (the small deep structures would otherwise be rare).
    """

    def __init__(self, labels: LabelSlices, image_size: int, *, table: PromptTable = BRAIN_PROMPTS,
                 prompts_per_image: int = 4, absent_fraction: float = 0.2, samples_per_epoch: int = 4096,
                 focus_labels: Sequence[int] = (10, 11, 12, 13, 17, 18, 49, 50, 51, 52, 53, 54),
                 config: GeneratorConfig | None = None, seed: int = 0) -> None:
        self.generator = BrainSliceGenerator(labels, image_size, config)
        self.table, self.k, self.absent_fraction = table, int(prompts_per_image), float(absent_fraction)
        self.samples_per_epoch, self.seed, self.epoch = int(samples_per_epoch), int(seed), 0
        focus_idx = np.flatnonzero(np.isin(labels.values, focus_labels))
        self.focus = np.flatnonzero(np.isin(labels.slices, focus_idx).any(axis=(1, 2)))
        self.n = len(labels.slices)

    def set_epoch(self, epoch: int) -> None:
        """Items depend on (seed, epoch, index): a resumed run generates the same images."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        pool = self.focus if (len(self.focus) and rng.random() < 0.5) else None
        index = int(pool[rng.integers(len(pool))]) if pool is not None else int(rng.integers(self.n))
        lab = self.generator.label_slice(index, rng)
        image = self.generator.image(lab, rng)
        targets = _choose_targets(lab, self.table, self.k, self.absent_fraction, rng)
        masks = np.stack([np.isin(lab, t.labels) for t in targets]).astype(np.float32)
        return {"image": torch.from_numpy(image)[None], "mask": torch.from_numpy(masks),
                "text": [_phrasing(t, rng) for t in targets], "index": i}

    @staticmethod
    def collate(batch: list[dict]) -> dict:
        return {"image": torch.stack([b["image"] for b in batch]),
                "mask": torch.cat([b["mask"] for b in batch])[:, None],
                "text": [t for b in batch for t in b["text"]],
                "index": torch.tensor([b["index"] for b in batch])}


@dataclass(frozen=True)
class SynthItem:
    case_id: str
    text: str


class _Rows:
    def __init__(self, images: torch.Tensor, image_of: torch.Tensor) -> None:
        self.images, self.image_of = images, image_of

    def __getitem__(self, idx) -> torch.Tensor:
        return self.images[self.image_of[idx]]

    def __len__(self) -> int:
        return len(self.image_of)


class SynthBrainValidation:
    """A fixed generated validation set (seeded) in the shape ``Training/train.py``'s ``validate`` reads:
    ``images[idx]``, ``cases[i].text`` / ``case_id`` and ``native_masks[i]``; one canonical prompt
    per item, ``prompts_per_image`` items per generated image."""

    def __init__(self, labels: LabelSlices, image_size: int, *, images: int = 150, prompts_per_image: int = 4,
                 table: PromptTable = BRAIN_PROMPTS, seed: int = 1234, config: GeneratorConfig | None = None) -> None:
        gen = BrainSliceGenerator(labels, image_size, config)
        rng = np.random.default_rng(seed)
        imgs, image_of, self.cases, self.native_masks = [], [], [], []
        picks = rng.choice(len(labels.slices), size=min(images, len(labels.slices)), replace=False)
        for n, index in enumerate(sorted(picks.tolist())):
            lab = gen.label_slice(index, rng)
            imgs.append(torch.from_numpy(gen.image(lab, rng))[None].half())
            for t in _choose_targets(lab, table, prompts_per_image, 0.2, rng):
                image_of.append(n)
                self.cases.append(SynthItem(labels.case_ids[labels.case_of[index]], t.prompt))
                self.native_masks.append(np.isin(lab, t.labels))
        self.images = _Rows(torch.stack(imgs), torch.tensor(image_of))

    def __len__(self) -> int:
        return len(self.cases)


# ----------------------------------------------------------------------------- real-MR check: an atlas
# Structures an atlas such as AAL names, by the FreeSurfer value they are scored as (left, right)
ATLAS_STRUCTURES = {"Hippocampus": (17, 53), "Amygdala": (18, 54), "Caudate": (11, 50), "Putamen": (12, 51),
                    "Pallidum": (13, 52), "Thalamus": (10, 49)}


def atlas_prompt_table() -> PromptTable:
    """The brain prompts of the six structure pairs an AAL-style atlas names (each side, both sides)."""
    values = {v for pair in ATLAS_STRUCTURES.values() for v in pair}
    return PromptTable(tuple(t for t in BRAIN_PROMPTS.targets if set(t.labels) <= values))


def atlas_to_freesurfer(atlas: np.ndarray, names: dict[int, str]) -> np.ndarray:
    """AAL label values -> FreeSurfer values of :data:`ATLAS_STRUCTURES` (``Hippocampus_L`` -> 17, ...);
    every other atlas region becomes 0. ``names``: atlas value -> name (``aal.nii.txt``)."""
    out = np.zeros(atlas.shape, dtype=np.int16)
    for value, name in names.items():
        base, _, side = name.rpartition("_")
        if base in ATLAS_STRUCTURES and side in ("L", "R"):
            out[atlas == value] = ATLAS_STRUCTURES[base][0 if side == "L" else 1]
    return out


def read_atlas_names(path: str | Path) -> dict[int, str]:
    """``<value> <name> [<code>]`` per line (AAL's ``aal.nii.txt``; CRLF and blank lines are fine)."""
    names = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    if not names:
        raise ValueError(f"{path}: no '<value> <name>' lines")
    return names
