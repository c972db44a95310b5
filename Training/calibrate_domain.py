#!/usr/bin/env python
"""Fit and calibrate a model's input-domain check (see ``TextGuidedSegLib/domain.py``), and measure it.

Fits the thumbnail statistics on the training split, sets the threshold at the 99th percentile of
the validation split's scores, then measures on inputs of other domains how many the check refuses
(the learned score alone, and combined with the metadata rules). Writes ``domain.json`` +
``domain.safetensors`` into each model folder given, and prints the table the README quotes::

    python Training/calibrate_domain.py --dataset qata --data-root ../shared/data/qata \\
        --domain Training/configs/domains/qata.json \\
        --models TextGuidedSegLib/pretrained/tmc-qata-cpu TextGuidedSegLib/pretrained/ssa-qata-cpu ... \\
        --other kvasir=../shared/data/kvasir --other volumes=../shared/data/volumes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from TextGuidedSegLib.data import read_dataset  # noqa: E402
from TextGuidedSegLib.domain import (DomainStatistics, ModelDomain, metadata_problems, describe_slices,  # noqa: E402
                                     write_domain)
from TextGuidedSegLib.io import read_volume  # noqa: E402

FALSE_ALARM_PERCENTILE = 99.0
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def _picture_inputs(kind: str, root: str, split: str) -> list[Path]:
    return [c.image_path for c in read_dataset(kind, root, split)]


def _volume_inputs(root: Path) -> list[Path]:
    """Every image volume under ``root`` (label maps and atlases left out)."""
    out = []
    for path in sorted(root.rglob("*")):
        name = path.name.lower()
        if not name.endswith(VOLUME_SUFFIXES) or "label" in str(path.relative_to(root)).lower():
            continue
        if name.startswith(("aal", "ch2bet")) or "synthseg" in str(path).lower():
            continue
        out.append(path)
    return out


def _scores(paths: list[Path], stats: DomainStatistics | None, domain: ModelDomain | None = None
            ) -> tuple[np.ndarray, np.ndarray, list]:
    """Per input: descriptors (fit) or median score, and whether the metadata rules refuse it."""
    descriptors, scores, refused = [], [], []
    for path in paths:
        vol = read_volume(path)
        d = describe_slices(vol.array, vol.ijk_to_ras)
        if stats is None:
            descriptors.append(d)
        else:
            scores.append(float(np.median(stats.score(d))))
        if domain is not None:
            refused.append(bool(metadata_problems(domain, vol.array, colour=vol.colour)))
    if stats is None:
        return np.concatenate(descriptors), np.array([]), refused
    return np.array([]), np.array(scores), refused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, choices=("qata", "kvasir", "msd", "volumes"),
                        help="training dataset; msd: a volume dataset in the MSD / nnU-Net layout")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--domain", required=True, help="JSON with the ModelDomain fields (modality, ...)")
    parser.add_argument("--models", nargs="+", required=True, help="model folders to write the domain into")
    parser.add_argument("--other", action="append", default=[], metavar="NAME=PATH",
                        help="other-domain inputs: qata=DIR / kvasir=DIR (their val split) or volumes[-name]=DIR "
                             "(every image volume under DIR)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--metadata-only", default=None, metavar="WHY",
                        help="fit no learned score (say why, e.g. the training images are generated); --dataset is "
                             "then 'volumes' and --data-root a folder of the model's own kind of real inputs, on "
                             "which the rules' false alarms are measured")
    args = parser.parse_args()

    start = time.perf_counter()
    domain = ModelDomain(**json.loads(Path(args.domain).read_text(encoding="utf-8")))
    if args.metadata_only:
        return metadata_only(args, domain, start)
    train = _picture_inputs(args.dataset, args.data_root, "train")
    val = _picture_inputs(args.dataset, args.data_root, "val")
    descriptors, _, _ = _scores(train, None)
    stats = DomainStatistics.fit(descriptors)
    _, val_scores, val_refused = _scores(val, stats, domain)
    threshold = float(np.percentile(val_scores, FALSE_ALARM_PERCENTILE))
    unit = "volumes" if args.dataset == "msd" else "images"
    domain.threshold = round(threshold, 4)
    calibration = {
        "fitted_on": f"{args.dataset} train ({len(train)} {unit})",
        "threshold_from": f"{args.dataset} val ({len(val)} {unit}), {FALSE_ALARM_PERCENTILE:g}th percentile",
        "validation_false_alarm_rate": {
            "learned_score": float((val_scores > domain.threshold).mean()),
            "metadata_rules": float(np.mean(val_refused)),
            "combined": float(np.mean((val_scores > domain.threshold) | np.array(val_refused))),
        },
        "detection_rate": {},
    }
    for item in args.other:
        name, _, path = item.partition("=")
        paths = (_volume_inputs(Path(path)) if name.startswith("volumes") else _picture_inputs(name, path, "val"))
        _, scores, refused = _scores(paths, stats, domain)
        learned = scores > domain.threshold
        what = "volumes" if name.startswith("volumes") else "val images"
        calibration["detection_rate"][f"{name} ({len(paths)} {what})"] = {
            "learned_score": float(learned.mean()),
            "metadata_rules": float(np.mean(refused)),
            "combined": float(np.mean(learned | np.array(refused))),
        }
    domain.calibration = calibration
    domain.training_data = calibration["fitted_on"]
    for folder in args.models:
        write_domain(folder, domain, stats)
    print(f"threshold {domain.threshold:.4f} ({time.perf_counter() - start:.0f} s)")
    print(f"{'inputs':40s} {'learned':>8s} {'metadata':>8s} {'combined':>8s}")
    rows = [(f"{args.dataset} val: false alarms", calibration["validation_false_alarm_rate"])]
    rows += [(f"{k}: refused", v) for k, v in calibration["detection_rate"].items()]
    for label, r in rows:
        print(f"{label:40s} {r['learned_score']:8.4f} {r['metadata_rules']:8.4f} {r['combined']:8.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(domain.to_dict(), indent=2) + "\n", encoding="utf-8")


def _refused_by_rules(paths: list[Path], domain: ModelDomain) -> list[bool]:
    refused = []
    for path in paths:
        vol = read_volume(path)
        refused.append(bool(metadata_problems(domain, vol.array, colour=vol.colour)))
    return refused


def metadata_only(args: argparse.Namespace, domain: ModelDomain, start: float) -> None:
    """A domain with the metadata rules only: their false alarms on the model's own kind of real
    inputs (``--data-root``: every image volume under it) and what they refuse elsewhere."""
    own = [p for root in args.data_root.split(",") for p in _volume_inputs(Path(root))]
    own_refused = _refused_by_rules(own, domain)
    calibration = {
        "learned_score": f"not fitted: {args.metadata_only}",
        "threshold_from": f"no threshold; metadata rules checked on {len(own)} real volumes of the model's kind",
        "validation_false_alarm_rate": {"metadata_rules": float(np.mean(own_refused))},
        "detection_rate": {},
    }
    for item in args.other:
        name, _, path = item.partition("=")
        paths = (_volume_inputs(Path(path)) if name.startswith("volumes") else _picture_inputs(name, path, "val"))
        refused = _refused_by_rules(paths, domain)
        what = "volumes" if name.startswith("volumes") else "val images"
        calibration["detection_rate"][f"{name} ({len(paths)} {what})"] = {"metadata_rules": float(np.mean(refused))}
    domain.threshold, domain.calibration = None, calibration
    domain.training_data = domain.training_data or args.metadata_only
    for folder in args.models:
        write_domain(folder, domain, None)
    print(f"metadata rules only ({time.perf_counter() - start:.0f} s): false alarms on {len(own)} own volumes "
          f"{calibration['validation_false_alarm_rate']['metadata_rules']:.4f}")
    for k, v in calibration["detection_rate"].items():
        print(f"{k:40s} refused {v['metadata_rules']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(domain.to_dict(), indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
