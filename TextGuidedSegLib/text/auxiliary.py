"""Auxiliary prompts (TGC-Net's DATE): a second wording of the same finding, in clinical terms.

TGC-Net reads the user's prompt T_p together with an auxiliary prompt T_a that restates it in the
domain's vocabulary ("all left lung and lower right lung" -> "diffuse left and focal right lower
zone opacities"). The paper asks an LLM once, offline, for every training report. Here the
generator is pluggable:

- :class:`KnowledgeExpander` (the default, offline, deterministic): rules over the hybrid-text
  parse (location clauses -> anatomical zones and extent, counts -> lesion counts, the finding ->
  its radiological / endoscopic wording). It never drops a laterality word of the input.
- :class:`TransformersGenerator`: any ``transformers`` text-generation model the user has (an HF id
  or a local directory), greedy decoding from a fixed instruction, so the output is reproducible.

Training generates T_a once for every distinct report and stores the table beside the dataset
(:func:`auxiliary_prompt_file`); the engine generates T_a from the user's prompt the same way.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Protocol

from .hybrid import parse_report

_WORDS = re.compile(r"[a-z]+")
LATERALITY_WORDS = ("left", "right", "bilateral", "unilateral")
_COUNTS = {"a": "a single", "one": "a single", "single": "a single", "two": "two separate",
           "three": "three separate", "four": "four separate", "five": "five separate", "six": "six separate",
           "multiple": "multiple", "several": "several", "many": "multiple"}
_CHEST = {"lung", "lungs", "pulmonary", "infection", "pneumonia", "covid", "opacity", "opacities", "consolidation"}
_ZONE_ORDER = ("upper", "middle", "lower")


def _words(text: str) -> list[str]:
    return _WORDS.findall(text.lower())


def _zone(sides: Iterable[str], vertical: frozenset[str], depth: frozenset[str]) -> str:
    """'focal right lower zone' / 'diffuse left' for one location clause."""
    whole = not vertical or set(vertical) >= set(_ZONE_ORDER)
    extent = "diffuse" if whole else "focal"
    side = " and ".join(s for s in ("left", "right") if s in set(sides))
    zone = "" if whole else " ".join(v for v in _ZONE_ORDER if v in vertical) + " zone"
    return " ".join(x for x in (extent, side, " ".join(sorted(depth)), zone) if x)


def expand_prompt(prompt: str) -> str:
    """The offline clinical-knowledge auxiliary prompt of ``prompt`` (deterministic)."""
    parsed = parse_report(prompt)
    words = _words(prompt)
    chest = bool(set(words) & _CHEST)
    polyp = bool({"polyp", "polyps"} & set(words))
    finding = "opacities" if chest else "raised mucosal lesion (polyp)" if polyp else "abnormality"

    parts = []
    zones = [_zone(c.sides, c.vertical, c.depth) for c in parsed.clauses]
    if zones and polyp:
        parts.append(f"{finding} in the " + " and ".join(z.replace("diffuse ", "").replace("focal ", "")
                                                          .replace(" zone", "") for z in zones) + " of the view")
    elif zones:
        parts.append(" and ".join(zones) + f" {finding}")
    else:
        parts.append(finding)
    count = next((_COUNTS[w] for w in _words(parsed.descriptive) if w in _COUNTS), None)
    if count:
        plural = count != "a single"
        parts.append(f"{count} {'lesions' if plural else 'lesion'}")
    looks = [w for w in _words(parsed.descriptive)
             if w not in _COUNTS and w not in {"infected", "area", "areas", "polyp", "polyps"}]
    if looks:
        parts.append(", ".join(dict.fromkeys(looks)) + " appearance")
    if chest:
        pattern = "bilateral" if parsed.bilateral else "unilateral" if "unilateral" in words else ""
        parts.append(" ".join(x for x in (pattern, "viral pneumonia pattern") if x))
    text = "; ".join(parts)
    missing = [w for w in LATERALITY_WORDS if w in words and w not in _words(text)]
    if missing:  # laterality is never lost, whatever the rules above made of the clauses
        text += "; " + " ".join(missing)
    return text


class AuxiliaryPromptGenerator(Protocol):
    """Anything that turns prompts into auxiliary prompts; ``name`` keys the stored table."""

    name: str

    def __call__(self, prompts: list[str]) -> list[str]: ...


class KnowledgeExpander:
    """The offline default: :func:`expand_prompt`."""

    name = "knowledge"

    def __call__(self, prompts: list[str]) -> list[str]:
        return [expand_prompt(p) for p in prompts]


class TransformersGenerator:
    """A ``transformers`` causal language model (HF id or local directory), greedy decoding.

    The instruction asks for the finding restated in clinical terms on one line; the first line of
    the continuation is the auxiliary prompt (the knowledge expander's answer when it is empty).
    """

    INSTRUCTION = ("Rewrite the finding in precise clinical terms, keeping every location and side.\n"
                   "Finding: {prompt}\nClinical description:")

    def __init__(self, name_or_path: str, max_new_tokens: int = 40) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        local = Path(name_or_path).is_dir() or os.environ.get("HF_HUB_OFFLINE") == "1"
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)
        self.model = AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=local).eval()
        self.max_new_tokens = max_new_tokens
        self.name = "lm-" + re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name_or_path).name or name_or_path)

    def __call__(self, prompts: list[str]) -> list[str]:
        import torch

        out = []
        for prompt in prompts:
            inputs = self.tokenizer(self.INSTRUCTION.format(prompt=prompt), return_tensors="pt")
            with torch.no_grad():
                ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
            text = self.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
            out.append(line or expand_prompt(prompt))
        return out


def auxiliary_prompt_file(data_root: str | Path, generator_name: str) -> Path:
    """Where a dataset's auxiliary prompts live: beside the data, one table per generator."""
    return Path(data_root) / f"auxiliary_prompts.{generator_name}.json"


def load_or_generate(prompts: Iterable[str], generator: AuxiliaryPromptGenerator, path: str | Path) -> dict[str, str]:
    """The stored table ``{prompt: auxiliary prompt}``; prompts it lacks are generated once and
    the table is rewritten atomically (a partly written file never replaces a good one)."""
    path = Path(path)
    table: dict[str, str] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    missing = [p for p in dict.fromkeys(prompts) if p not in table]
    if missing:
        table.update(zip(missing, generator(missing)))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(dict(sorted(table.items())), f, indent=1)
        os.replace(tmp, path)
    return table
