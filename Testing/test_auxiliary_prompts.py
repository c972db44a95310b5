"""DATE's auxiliary prompts: the offline knowledge expander (deterministic, laterality kept on every
real report), the stored table (generated once, atomic), and a transformers generator."""

from __future__ import annotations

import json


from TextGuidedSegLib.data import read_dataset
from TextGuidedSegLib.text.auxiliary import (KnowledgeExpander, TransformersGenerator, auxiliary_prompt_file,
                                             expand_prompt, load_or_generate)


def test_the_issue_example():
    assert expand_prompt("Bilateral pulmonary infection, two infected areas, all left lung and lower right lung.") == (
        "diffuse left and focal right lower zone opacities; two separate lesions; bilateral viral pneumonia pattern")
    assert expand_prompt("Unilateral pulmonary infection, one infected area, lower left lung.") == (
        "focal left lower zone opacities; a single lesion; unilateral viral pneumonia pattern")
    assert expand_prompt("one medium yellow round polyp, located in right of the image") == (
        "raised mucosal lesion (polyp) in the right of the view; a single lesion; medium, yellow, round appearance")


def test_every_real_report_keeps_its_laterality_words(shared_data):
    texts = {c.text for split in ("train", "val") for c in read_dataset("qata", shared_data / "qata", split)}
    texts |= {c.text for c in read_dataset("kvasir", shared_data / "kvasir", "train", prompt="p6")}
    assert len(texts) > 150
    for text in texts:
        aux = expand_prompt(text)
        assert aux == expand_prompt(text)  # deterministic
        for word in ("left", "right", "bilateral", "unilateral"):
            if word in text.lower():
                assert word in aux, (text, aux)
        assert aux != text and len(aux) > 5


def test_stored_table_is_generated_once(tmp_path):
    calls = []

    class Counting(KnowledgeExpander):
        def __call__(self, prompts):
            calls.append(list(prompts))
            return super().__call__(prompts)

    path = auxiliary_prompt_file(tmp_path, "knowledge")
    assert path == tmp_path / "auxiliary_prompts.knowledge.json"
    table = load_or_generate(["lower left lung", "lower left lung", "all right lung"], Counting(), path)
    assert calls == [["lower left lung", "all right lung"]]
    assert json.loads(path.read_text(encoding="utf-8")) == table
    load_or_generate(["all right lung"], Counting(), path)  # nothing new: no call, file unchanged
    assert len(calls) == 1
    load_or_generate(["upper right lung"], Counting(), path)
    assert calls[-1] == ["upper right lung"] and len(json.loads(path.read_text(encoding="utf-8"))) == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_transformers_generator_is_greedy_and_reproducible(tmp_path):
    """A tiny random GPT-2 saved here stands in for the user's LLM (no hub access)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from TextGuidedSegLib.text.encoder import resolve_text_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_text_model_path("packaged:all-MiniLM-L6-v2"))
    model = GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=128, n_embd=16, n_layer=1,
                                       n_head=2, bos_token_id=tokenizer.cls_token_id,
                                       eos_token_id=tokenizer.sep_token_id))
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    generator = TransformersGenerator(str(tmp_path / "lm"), max_new_tokens=6)
    assert generator.name == "lm-lm"
    first = generator(["lower left lung", "all right lung"])
    assert first == generator(["lower left lung", "all right lung"])
    assert all(isinstance(t, str) and t for t in first)
