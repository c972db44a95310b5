#!/usr/bin/env python
"""ProLearn: what the prototype bank costs per image vs encoding the report with the text encoder.

Same machine, same run, batch 1, the shipped ProLearn model and its own text encoder. "Bank
query + respond" is the cosine top-k over the query prototypes and the weighted sum of the linked
responses (the image feature itself comes from the segmentation encoder, which runs either way);
"text encoder" tokenises and encodes one report never seen before (no cache). Prints a table;
asserts nothing::

    python benchmarks/benchmark_prolearn_query.py [--model NAME_OR_DIR] [--reports 100] [--device auto]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from TextGuidedSegLib.engine import select_device  # noqa: E402
from TextGuidedSegLib.model_store import load_model  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "qata"


def distinct_reports(n: int) -> list[str]:
    """Distinct QaTa reports (train + val) when the dataset is beside the repo, else varied sentences."""
    reports: list[str] = []
    if (DATA / "split.json").is_file():
        from TextGuidedSegLib.data import read_dataset

        for split in ("val", "train"):
            reports += [c.text for c in read_dataset("qata", DATA, split)]
    reports = list(dict.fromkeys(reports))
    k = 0
    while len(reports) < n:  # pad with distinct made-up reports
        reports.append(f"unilateral pulmonary infection, {k + 1} infected areas, lower left lung, case {k}.")
        k += 1
    return reports[:n]


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="prolearn-qata-cpu-1pct")
    parser.add_argument("--reports", type=int, default=100, help="distinct reports to encode (one per image)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = select_device(args.device)
    loaded = load_model(args.model, device=device)
    net, encoder = loaded.model.eval(), loaded.text_encoder
    if getattr(net, "requires_text", True):
        raise SystemExit(f"{loaded.name} has no prototype bank (not a text-free ProLearn model)")
    cfg = loaded.config
    reports = distinct_reports(args.reports)
    images = torch.rand(len(reports), cfg.in_channels, cfg.image_size, cfg.image_size,
                        generator=torch.Generator().manual_seed(0)).to(device)

    with torch.inference_mode():
        features = [net.image_query(images[i:i + 1]) for i in range(len(reports))]
        net.respond(*net.query(features[0]))                   # warm-up
        encoder.encode(["warm-up report, lower left lung."])
        bank_ms = [timed(lambda f=f: net.respond(*net.query(f)), device) for f in features]
        text_ms = [timed(lambda r=r: encoder.encode([r]), device) for r in reports]
        text_tokens = [encoder.encode([r]).to(device) for r in reports[:10]]
        free_ms = [timed(lambda i=i: net(images[i:i + 1]), device) for i in range(10)]
        with_text_ms = [timed(lambda i=i: net(images[i:i + 1], text_tokens[i]), device) for i in range(10)]

    def row(name: str, values: list[float]) -> str:
        return f"| {name:<50} | {statistics.median(values):10.3f} | {statistics.mean(values):10.3f} | {len(values):5d} |"

    print(f"model {loaded.name} ({cfg.num_prototypes} prototypes, top-k {cfg.top_k}); text encoder "
          f"{cfg.text.name_or_path}; device {device}; torch threads {torch.get_num_threads()}")
    print(f"| {'step (per image, batch 1)':<50} | median ms  |  mean ms   |     n |")
    print(f"|{'-' * 52}|------------|------------|-------|")
    print(row("bank query + respond (text-free guidance)", bank_ms))
    print(row("text encoder on a new report (tokenise + encode)", text_ms))
    print(row("whole ProLearn forward, text-free", free_ms))
    print(row("whole ProLearn forward, given encoded text", with_text_ms))
    print(f"ratio text encoder / bank query (medians): {statistics.median(text_ms) / statistics.median(bank_ms):.1f}x")


if __name__ == "__main__":
    main()
