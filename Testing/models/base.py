"""Shared model tester (in the style of segmentation_models_pytorch's ``tests/models/base``).

A model's test file subclasses :class:`BaseModelTester`, sets ``model_type`` and implements
``make_config``; it inherits the contract every registered model must keep: registry
round-trip, output shape and finiteness, gradients reaching every part, text that really
changes the output, and helpful errors for missing text or badly sized images.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from TextGuidedSegLib.models import available_models, build_model, config_from_dict, encode_prompts


class BaseModelTester:
    model_type: str = ""
    batch_size: int = 2
    #: the model's own auxiliary losses (e.g. TMC's alignment loss)
    aux_losses: tuple[str, ...] = ()
    #: name prefix -> human name; every group must receive finite, non-zero gradients
    gradient_groups: dict[str, str] = {}
    #: parameters that are by design outside the graph of the loss (documented per model)
    unused_parameter_prefixes: tuple[str, ...] = ()
    #: a size the model must refuse, and a string the error must contain
    bad_image_size: tuple[int, int] | None = None
    bad_image_message: str = ""

    # ---------------------------------------------------------------- to implement
    def make_config(self):
        raise NotImplementedError

    # ---------------------------------------------------------------- helpers
    @pytest.fixture
    def config(self):
        return self.make_config()

    @pytest.fixture
    def model(self, config):
        torch.manual_seed(0)
        return build_model(config)

    @pytest.fixture
    def text(self, model, minilm):
        """What the model reads (through the same ``encode_prompts`` as training and the engine)."""
        return encode_prompts(model, minilm, [
            "bilateral pulmonary infection, all left lung and all right lung.",
            "unilateral pulmonary infection, one infected area, lower right lung."][: self.batch_size])

    def image(self, config, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.rand(self.batch_size, config.in_channels, config.image_size, config.image_size, generator=g)

    # ---------------------------------------------------------------- the contract
    def test_registered(self):
        assert self.model_type in available_models()

    def test_config_dict_round_trip(self, config, model):
        data = config.to_dict()
        assert data["model_type"] == self.model_type
        again = config_from_dict(data)
        assert type(again) is type(config)
        assert dataclasses.asdict(again) == dataclasses.asdict(config)
        twin = build_model(data)
        assert type(twin) is type(model)
        assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}

    def test_config_refuses_unknown_fields(self, config):
        with pytest.raises(ValueError, match="unknown"):
            config_from_dict({**config.to_dict(), "not_a_field": 1})

    def test_forward_shape_and_finite(self, config, model, text):
        out = model(self.image(config), text)
        logits = out["logits"]
        assert logits.shape == (self.batch_size, 1, config.image_size, config.image_size)
        assert logits.dtype == torch.float32
        assert torch.isfinite(logits).all()
        assert logits.std() > 0  # not a constant map
        assert set(self.aux_losses) <= set(out["losses"])
        for name in self.aux_losses:
            loss = out["losses"][name]
            assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0, (name, loss)

    def test_training_losses_are_finite_under_bf16_autocast(self, config, model, text):
        """The training script trains under autocast on GPUs (bf16 where supported); CPU autocast runs
        the same reduced-precision matmuls, so a loss that breaks in bf16 (InfoNCE's identical-text
        test did: NaN at the first GPU step) fails here too."""
        model.train()
        x = self.image(config)
        extra = {"target": (self.image(config, seed=1)[:, :1] > 0.5).float()} if getattr(model, "uses_target", False) \
            else {}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, text, **extra)
        assert torch.isfinite(out["logits"].float()).all()
        for name, loss in out["losses"].items():
            assert torch.isfinite(loss).all(), (name, loss)
        assert set(self.aux_losses) <= set(out["losses"])

    def test_eval_is_deterministic(self, config, model, text):
        model.eval()
        x = self.image(config)
        with torch.no_grad():
            a = model(x, text)["logits"]
            b = model(x, text)["logits"]
        assert torch.equal(a, b)

    def test_backward_reaches_every_part(self, config, model, text):
        model.train()
        out = model(self.image(config), text)
        target = (self.image(config, seed=1)[:, :1] > 0.5).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out["logits"], target)
        loss = loss + sum(out["losses"].values())
        loss.backward()
        missing = []
        for name, p in model.named_parameters():
            unused = name.startswith(self.unused_parameter_prefixes) if self.unused_parameter_prefixes else False
            if p.grad is None:
                if not unused:
                    missing.append(name)
                continue
            assert not unused, f"{name} is declared unused but got a gradient: update unused_parameter_prefixes"
            assert torch.isfinite(p.grad).all(), name
        assert not missing, f"parameters without gradient: {missing[:5]}"
        for prefix, human in self.gradient_groups.items():
            grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix) and p.grad is not None]
            assert grads, f"no parameters under {prefix!r} ({human})"
            total = sum(float(g.abs().sum()) for g in grads)
            assert total > 0, f"{human} ({prefix}) gets zero gradients"

    def test_text_changes_the_output(self, config, model, minilm):
        model.eval()
        x = self.image(config)[:1]
        with torch.no_grad():
            a = model(x, encode_prompts(model, minilm, ["upper left lung"]))["logits"]
            b = model(x, encode_prompts(model, minilm, ["colon polyp, round and yellow, in the right of the image"]))[
                "logits"]
        assert (a - b).abs().max() > 1e-6, "the prompt does not influence the prediction"

    def test_missing_text_raises(self, config, model):
        with pytest.raises(ValueError, match="prompt"):
            model(self.image(config), None)

    def test_bad_image_size_raises(self, config, model, text):
        if self.bad_image_size is None:
            pytest.skip("model accepts any image size")
        h, w = self.bad_image_size
        x = torch.rand(self.batch_size, config.in_channels, h, w)
        with pytest.raises(ValueError) as exc:
            model(x, text)
        assert self.bad_image_message in str(exc.value)
