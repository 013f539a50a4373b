"""Every load of a recipe's model pins the same Hub commit and remote-code choice (hf.hub_kwargs)."""

import json

import pytest
from conftest import RECIPES

from llmkit import modeling
from llmkit.config import load_recipe
from llmkit.tasks import get_task

PINNED = {"revision": "0123abc", "trust_remote_code": True}


class Loaded(Exception):
    """Raised by the recording stand-ins: the load was reached with these kwargs."""


@pytest.fixture
def loads(monkeypatch):
    import transformers

    calls: list = []

    def record(name):
        def load(*args, **kwargs):
            calls.append((name, args, kwargs))
            raise Loaded

        return classmethod(lambda cls, *a, **k: load(*a, **k))

    for cls in ("AutoConfig", "AutoTokenizer", "AutoModelForSequenceClassification", "AutoModelForSeq2SeqLM"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", record(cls))
    monkeypatch.setattr(
        transformers.EncoderDecoderModel, "from_encoder_decoder_pretrained", record("from_encoder_decoder_pretrained")
    )
    return calls


def _recipe(name, *overrides):
    pins = ["model.revision=0123abc", "model.trust_remote_code=true"]
    return load_recipe(RECIPES / "tiny" / f"{name}.yaml", ["trainer.output_dir=runs/x", *pins, *overrides])


def test_pretrained_model_config_and_tokenizer(loads):
    from llmkit.tokenizer import load_tokenizer

    recipe = _recipe("classification", "model.name_or_path=org/model", "model.config=null", "tokenizer.train=null")
    with pytest.raises(Loaded):
        modeling.build_model(recipe, get_task("classification"), None, {})
    with pytest.raises(Loaded):
        load_tokenizer("org/model", recipe)
    assert [(name, kwargs) for name, _, kwargs in loads] == [("AutoConfig", PINNED), ("AutoTokenizer", PINNED)]


@pytest.mark.parametrize("meta", [False, True])
def test_encoder_decoder_parts(loads, meta):
    recipe = _recipe("summarization", "model.encoder=org/enc", "model.decoder=org/dec", "model.config=null")
    with pytest.raises(Loaded):
        modeling.build_model(recipe, get_task("summarization"), None, {}, meta=meta)
    name, args, kwargs = loads[0]
    if meta:
        assert (name, args, kwargs) == ("AutoConfig", ("org/enc",), PINNED)
    else:
        assert name == "from_encoder_decoder_pretrained" and args == ("org/enc", "org/dec")
        assert kwargs == {f"{part}_{k}": v for part in ("encoder", "decoder") for k, v in PINNED.items()}


def test_the_base_of_a_lora_run(loads, tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "base_model").mkdir(parents=True)
    (run / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base"}))
    monkeypatch.setattr(modeling, "_adapter_base_config", lambda run: "the run's base config")
    recipe = _recipe("classification", f"model.name_or_path={run}", "model.config=null")
    with pytest.raises(Loaded):
        modeling.build_model(recipe, get_task("classification"), None, {})
    assert loads == [
        ("AutoModelForSequenceClassification", ("org/base",), {"config": "the run's base config", **PINNED})
    ]


def _tiny(kind):
    import transformers as t

    bert = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    if kind == "classification":
        return t.BertForSequenceClassification(t.BertConfig(**bert)), {"labels": [1, 0]}
    if kind == "bert2bert":
        enc, dec = t.BertConfig(**bert), t.BertConfig(**bert, is_decoder=True, add_cross_attention=True)
        model = t.EncoderDecoderModel(config=t.EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec))
        model.config.decoder_start_token_id, model.config.pad_token_id = 1, 0
        return model, {"labels": [[3, 4, 5], [6, 7, 8]]}
    cfg = t.T5Config(vocab_size=50, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2, decoder_start_token_id=0)
    return t.T5ForConditionalGeneration(cfg), {"labels": [[3, 4, 5], [6, 7, 8]]}


@pytest.mark.parametrize("kind", ["classification", "bert2bert", "t5"])
def test_unused_parameters_are_known_without_running_a_step(kind):
    # What DDP's find_unused_parameters would search for at every step, checked against a real backward.
    import torch

    model, labels = _tiny(kind)
    ids = torch.tensor([[2, 5, 6, 7], [2, 8, 9, 3]])
    model(input_ids=ids, labels=torch.tensor(labels["labels"])).loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert bool(unused) == modeling.has_unused_parameters(model) == (kind == "bert2bert")
    if unused:
        assert all(".pooler." in n for n in unused)
