#!/usr/bin/env python
"""Build ``gputrain/``: what a smoke run of ``Training/train.py`` on a GPU machine needs, small enough
to travel there (no hub, no MiniLM, no dataset on that machine).

    python benchmarks/make_gpu_train_check.py [--data-root ../shared/data/qata]
    # then, on the GPU machine (bf16, and fp16 with loss scaling by pretending bf16 is missing):
    python Training/train.py --config gputrain/tgcnet_gpu_check.yaml --set train.epochs=4
    python -c "import runpy, sys, torch; torch.cuda.is_bf16_supported = lambda *a, **k: False; \\
      sys.argv = ['Training/train.py', '--config', 'gputrain/tgcnet_gpu_check.yaml', '--set', 'train.epochs=4', \\
      'output_dir=gputrain/run16', 'export.dir=gputrain/run16/model']; runpy.run_path('Training/train.py', run_name='__main__')"

Contents: 48 train + 16 val QaTa cases (copied from the data root; never commit them), the shipped
TGC-Net's frozen CLIP image tower saved as a ``CLIPVisionModel`` directory, and a config that is
``tgcnet_qata_cpu.yaml`` pointing at those and at the shipped CLIP text tower. It checks the loop
(autocast, loss scaling, validation, export, engine evaluation on CUDA), not accuracy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "TextGuidedSegLib" / "pretrained" / "tgcnet-qata-cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "qata")
    parser.add_argument("--out", type=Path, default=REPO / "gputrain")
    args = parser.parse_args()
    from transformers import CLIPVisionConfig, CLIPVisionModel

    out, src = args.out, args.data_root
    if out.exists():
        shutil.rmtree(out)
    split = json.loads((src / "split.json").read_text(encoding="utf-8"))
    subset = {"train": split["train"][:48], "val": split["val"][:16]}
    for folder, ext in (("images", ".png"), ("masks", ".png"), ("reports", ".txt")):
        (out / "qata" / folder).mkdir(parents=True)
        for cid in subset["train"] + subset["val"]:
            shutil.copy(src / folder / f"{cid}{ext}", out / "qata" / folder / f"{cid}{ext}")
    (out / "qata" / "split.json").write_text(json.dumps(subset), encoding="utf-8")

    cfg = json.loads((SHIPPED / "config.json").read_text(encoding="utf-8"))["config"]
    tower = CLIPVisionModel(CLIPVisionConfig(**cfg["clip_vision"]))
    weights = load_file(str(SHIPPED / "model.safetensors"))
    tower.load_state_dict({k[len("clip."):]: v for k, v in weights.items() if k.startswith("clip.")})
    tower.save_pretrained(out / "clip_vision")

    config = yaml.safe_load((REPO / "Training" / "configs" / "tgcnet_qata_cpu.yaml").read_text(encoding="utf-8"))
    rel = lambda p: str(Path(p).resolve().relative_to(REPO))  # noqa: E731  (paths as seen from the repo root)
    config.update(name="tgcnet_gpu_check", output_dir=rel(out / "run"),
                  export={"dir": rel(out / "run" / "model"), "half": False})
    config["model"]["clip_name_or_path"] = rel(out / "clip_vision")
    config["model"]["text"]["name_or_path"] = rel(SHIPPED / "text_encoder")
    config["data"]["root"] = rel(out / "qata")
    config["train"].update(epochs=2, max_time_minutes=0)
    (out / "tgcnet_gpu_check.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    print(f"wrote {out} ({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    sys.exit(main())
