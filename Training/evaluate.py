#!/usr/bin/env python
"""Score a model on a dataset split: both Dice conventions, IoU, HD95, ASD, per-case CSV.

Same as ``textguidedseg evaluate`` (this script only forwards to it), e.g.::

    python Training/evaluate.py --model runs/tmc_qata_cpu/model --dataset qata \
        --data-root ../shared/data/qata --split val --per-case-csv val_cases.csv --save-predictions preds/
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from TextGuidedSegLib.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
