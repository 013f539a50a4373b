"""GPU levers (llmkit/gpu.py): off on a CPU, on for a (faked) CUDA device, and a recipe's own setting wins."""

import logging
import types

import pytest
import torch

from llmkit import gpu, modeling
from llmkit.config import load_recipe
from llmkit.hf import runtime_settings
from llmkit.tasks import get_task


@pytest.fixture
def cuda(monkeypatch):
    """A CUDA device of the given compute capability, as far as llmkit's probes can tell."""

    def fake(capability=(9, 0)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)

    return fake


def test_cpu_gets_no_gpu_lever():
    assert not torch.cuda.is_available()
    assert gpu.runtime_levers({}) == {"dataloader_pin_memory": False}
    assert runtime_settings({})["dataloader_pin_memory"] is False
    assert "tf32" not in runtime_settings({}) and "dataloader_num_workers" not in runtime_settings({})
    assert gpu.flash_attention({}) is None


def test_cuda_turns_levers_on(cuda):
    cuda((9, 0))
    assert gpu.runtime_levers({}) == {
        "dataloader_pin_memory": True,
        "tf32": True,
        "dataloader_num_workers": 2,
        "dataloader_persistent_workers": True,
    }
    cuda((7, 5))  # Turing: no TF32
    assert gpu.runtime_levers({})["tf32"] is False


def test_the_recipe_wins(cuda):
    cuda()
    named = {"dataloader_num_workers": 0, "tf32": False, "dataloader_pin_memory": False}
    assert gpu.runtime_levers(named) == {}  # no workers asked for: no persistent workers either
    assert gpu.runtime_levers({"use_cpu": True}) == {"dataloader_pin_memory": False}


def test_flash_attention_where_installed_with_fallback(cuda, monkeypatch, caplog):
    cuda()
    monkeypatch.setattr(gpu, "installed", lambda name: name == "flash_attn")
    assert gpu.flash_attention({}) == "flash_attention_2"
    assert gpu.flash_attention({"use_cpu": True}) is None
    m = types.SimpleNamespace(attn_implementation=None)
    asked = []

    def load(attention):  # a model class without flash attention, as transformers refuses it
        asked.append(attention)
        if attention.get("attn_implementation") == "flash_attention_2":
            raise ValueError("BertModel does not support Flash Attention 2.0 yet.")
        return "model"

    with caplog.at_level(logging.INFO, logger="llmkit"):
        assert modeling._with_attention(load, m, {}) == "model"
    assert asked == [{"attn_implementation": "flash_attention_2"}, {}]
    assert "flash attention 2 not used (BertModel does not support" in caplog.text
    asked.clear()
    m.attn_implementation = "eager"  # the recipe's choice is never second-guessed
    assert modeling._with_attention(load, m, {}) == "model" and asked == [{"attn_implementation": "eager"}]


def _model(model_type):
    return types.SimpleNamespace(config=types.SimpleNamespace(model_type=model_type))


def test_liger_for_causal_lms_it_covers(cuda, monkeypatch, caplog):
    clm, ner = get_task("clm"), get_task("ner")
    recipe = load_recipe("recipes/gpt2.yaml")
    assert not gpu.use_liger(recipe, clm, _model("llama"))  # no CUDA
    cuda()
    monkeypatch.setattr(gpu, "installed", lambda name: False)
    assert not gpu.use_liger(recipe, clm, _model("llama"))  # not installed
    monkeypatch.setattr(gpu, "installed", lambda name: name == "liger_kernel")
    table = types.ModuleType("liger_kernel.transformers.monkey_patch")
    table.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": None, "qwen2": None}
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(__import__("sys").modules, name, types.ModuleType(name))
    monkeypatch.setitem(__import__("sys").modules, table.__name__, table)
    assert gpu.use_liger(recipe, clm, _model("llama"))
    assert not gpu.use_liger(recipe, ner, _model("llama"))  # a fused *causal LM* loss
    with caplog.at_level(logging.INFO, logger="llmkit"):
        assert not gpu.use_liger(recipe, clm, _model("gpt2"))
    assert "no kernels for model type gpt2" in caplog.text
    distilled = load_recipe("recipes/gpt2-distill.yaml")
    assert not gpu.use_liger(distilled, clm, _model("llama"))  # the teacher needs the student's logits
    assert not gpu.use_liger(load_recipe("recipes/gpt2.yaml", ["trainer.use_liger_kernel=false"]), clm, _model("llama"))
