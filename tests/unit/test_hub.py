"""Without a network, a recipe that needs the Hub fails in seconds with one line instead of half a minute of
retries: the Hub's host name is looked up once, and llmkit works offline when it does not resolve."""

import socket
import time

import pytest
from conftest import RECIPES
from typer.testing import CliRunner

from llmkit import hf


@pytest.fixture
def no_network(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for module, name in (
        (huggingface_hub.constants, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
    ):
        monkeypatch.setattr(module, name, False)  # restored afterwards, whatever llmkit sets
    looked_up = []

    def getaddrinfo(host, *args, **kwargs):
        looked_up.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return looked_up


def test_a_hub_model_without_network_fails_in_seconds_with_one_line(no_network, tmp_path):
    from llmkit.cli import app

    started = time.monotonic()
    argv = ["finetune", "--task", "ner", f"trainer.output_dir={tmp_path}/run", "data.load=null"]
    argv += [f"data.train={RECIPES.parent}/tests/fixtures/ner/train.conll", "data.validation=null", "data.test=null"]
    result = CliRunner().invoke(app, argv)
    assert time.monotonic() - started < 5
    assert no_network == ["huggingface.co"]
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "cannot load" in errors[0] and "(offline mode)" in errors[0], result.stderr


def test_local_models_and_offline_switches_skip_the_lookup(no_network, monkeypatch):
    from llmkit.config import load_recipe

    load_recipe(RECIPES / "tiny/classification.yaml")  # a model from a config, a trained tokenizer, local files
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load_recipe(RECIPES / "ner.yaml")  # a Hub model, but offline was asked for
    assert no_network == []
    assert hf.hub_names(load_recipe(RECIPES / "ner.yaml")) == ["google-bert/bert-base-cased", "eriktks/conll2003"]
