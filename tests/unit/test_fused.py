"""fused.py: the causal LM head fused with its loss (same loss and gradients as transformers') and the fused GELU."""

import copy
from types import SimpleNamespace as NS

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from llmkit import fused

COMMON = dict(
    vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    intermediate_size=64, max_position_embeddings=64, head_dim=8, pad_token_id=0,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, dropout=0.0, attention_dropout=0.0,
)  # fmt: skip
EXTRA = {
    "gpt_neo": dict(num_layers=2, attention_types=[[["global", "local"], 1]], embed_dropout=0.0),
    "gptj": dict(rotary_dim=4),
}


def _lm(model_type: str = "gpt2"):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **COMMON, **EXTRA.get(model_type, {}))
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()


def _pair(model_type: str = "gpt2", **kw):
    plain = _lm(model_type)
    mine = copy.deepcopy(plain)
    assert fused.fuse_head_and_loss(mine, **kw)
    return plain, mine


def _ids(rows: int = 3, width: int = 11):
    torch.manual_seed(1)
    ids = torch.randint(1, 97, (rows, width))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt the loss ignores
    labels[2, 7] = -100
    return ids, labels


def _loss_and_grads(model, autocast: bool = False, **inputs):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("model_type", sorted(fused.PLAIN_HEADS))
def test_fused_loss_and_gradients_equal_the_models_own(model_type):
    plain, mine = _pair(model_type)
    ids, labels = _ids()
    want, want_grads = _loss_and_grads(plain, input_ids=ids, labels=labels)
    got, got_grads = _loss_and_grads(mine, input_ids=ids, labels=labels)
    assert got.logits.shape[1] == 0  # the logits were never computed
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_and_the_trainers_item_count():
    plain, mine = _pair()
    ids, labels = _ids()
    items = torch.tensor(40)  # the Trainer's count over an accumulated batch: loss = sum / items
    want, want_grads = _loss_and_grads(plain, True, input_ids=ids, labels=labels, num_items_in_batch=items)
    got, got_grads = _loss_and_grads(mine, True, input_ids=ids, labels=labels, num_items_in_batch=items)
    assert got.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss, want.loss, rtol=2e-3, atol=1e-3)
    for name, grad in want_grads.items():
        assert (got_grads[name] - grad).norm() <= 0.02 * grad.norm() + 1e-6, name


def test_the_head_dtype_is_autocasts_where_accelerate_wraps_only_forward(monkeypatch):
    # Accelerate's mixed precision wraps `model.forward` in autocast; the loss hook runs outside it
    _, mine = _pair()
    mine.forward = torch.autocast("cpu", dtype=torch.bfloat16)(mine.forward)
    seen, compute = [], fused.linear_cross_entropy
    monkeypatch.setattr(fused, "linear_cross_entropy", lambda *a: seen.append(a[-1]) or compute(*a))
    ids, labels = _ids()
    mine(input_ids=ids, labels=labels).loss.backward()
    assert seen == [torch.bfloat16]


def test_linear_cross_entropy_with_a_bias_and_ignored_rows_over_several_chunks(monkeypatch):
    monkeypatch.setattr(fused, "MIN_ROWS", 16)
    monkeypatch.setattr(fused, "CHUNK_BYTES", 16 * 4 * 1000)  # 400 kept rows: 25 chunks
    torch.manual_seed(0)
    hidden, weight, bias = (torch.randn(*s, requires_grad=True) for s in ((2, 300, 16), (1000, 16), (1000,)))
    targets = torch.randint(0, 1000, (2, 300))
    targets[:, ::3] = -100
    want = F.cross_entropy(F.linear(hidden, weight, bias).reshape(-1, 1000), targets.reshape(-1))
    expected = torch.autograd.grad(want, (hidden, weight, bias))
    got = fused.linear_cross_entropy(hidden, weight, bias, targets)
    torch.testing.assert_close(got, want)
    for g, e in zip(torch.autograd.grad(got, (hidden, weight, bias)), expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_evaluation_computes_no_gradient_and_the_same_loss():
    plain, mine = _pair()
    ids, labels = _ids()
    plain.eval(), mine.eval()
    counted = []
    for model in (plain, mine):
        with torch.no_grad(), FlopCounterMode(display=False) as flops:
            counted.append(model(input_ids=ids, labels=labels).loss)
        counted.append(flops.get_total_flops())
    want, plain_flops, got, fused_flops = counted
    torch.testing.assert_close(got, want)
    assert fused_flops <= plain_flops  # the head once (at the predicted positions only), not its gradients


def test_metrics_keep_evaluation_logits_and_other_calls_are_left_alone():
    plain, mine = _pair(logits_in_eval=True)
    ids, labels = _ids()
    assert mine(input_ids=ids).logits.shape == (3, 11, 97)  # no labels: generation and predict
    want = plain(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(mine(input_ids=ids, labels=labels, return_dict=False)[0], want)
    keep = torch.arange(11)  # logits_to_keep as the positions to keep: all of them
    assert mine(input_ids=ids, labels=labels, logits_to_keep=keep).logits.shape == (3, 11, 97)
    with pytest.raises(IndexError):  # a forward that raises leaves nothing behind for the next call
        mine(input_ids=ids + 1000, labels=labels)
    assert mine.lm_head(torch.ones(3, 11, 32)).shape == (3, 11, 97)
    plain.eval(), mine.eval()
    with torch.no_grad():
        got, want = mine(input_ids=ids, labels=labels), plain(input_ids=ids, labels=labels)
    assert got.logits.shape == (3, 11, 97)
    torch.testing.assert_close(got.loss, want.loss)


def test_lora_on_the_head_falls_back_and_lora_elsewhere_fuses():
    from peft import LoraConfig, get_peft_model

    ids, labels = _ids()
    for targets, fuses in ((["c_attn"], True), (["c_attn", "lm_head"], False)):
        plain, mine = _pair()
        config = LoraConfig(
            r=2, target_modules=targets, task_type="CAUSAL_LM", fan_in_fan_out=True, init_lora_weights=False
        )
        plain, mine = get_peft_model(plain, config), get_peft_model(mine, copy.deepcopy(config))
        mine.load_state_dict(plain.state_dict())
        want, want_grads = _loss_and_grads(plain, input_ids=ids, labels=labels)
        got, got_grads = _loss_and_grads(mine, input_ids=ids, labels=labels)
        assert (got.logits.shape[1] == 0) is fuses, targets
        torch.testing.assert_close(got.loss, want.loss)
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_when_the_clm_task_fuses(monkeypatch):
    from llmkit.tasks import get_task

    args = NS(torch_compile=False, fsdp=[], deepspeed=None, n_gpu=1)
    plain = NS(distill=None, args=args, metrics=None)
    for recipe, model_type, expected in (
        (plain, "gpt2", True),
        (plain, "llama", True),
        (plain, "gemma2", False),  # soft-capped logits: not a plain head
        (NS(distill=NS(alpha=0.5), args=args, metrics=None), "gpt2", False),  # distillation reads the logits
        (NS(distill=None, args=NS(**{**vars(args), "torch_compile": True}), metrics=None), "gpt2", False),
        (NS(distill=None, args=NS(**{**vars(args), "fsdp": ["full_shard"]}), metrics=None), "gpt2", False),
        ("FSDP", "gpt2", False),  # `accelerate launch --config_file recipes/accelerate/fsdp.yaml`
        ("DEEPSPEED", "gpt2", False),
    ):
        if isinstance(recipe, str):
            monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
            monkeypatch.setenv(f"ACCELERATE_USE_{recipe}", "true")
            recipe = plain
        model = _lm(model_type)
        get_task("clm").prepare_model(recipe, model)
        ids, labels = _ids()
        assert (model(input_ids=ids, labels=labels).logits.shape[1] == 0) is expected, (model_type, recipe)


def test_gelu_tanh_swaps_the_elementwise_gelu_for_the_same_function():
    from transformers.activations import GELUTanh, NewGELUActivation

    plain = _lm("gpt2")
    mine = copy.deepcopy(plain)
    assert fused.gelu_tanh(mine) == 2 and fused.gelu_tanh(mine) == 0
    assert not any(isinstance(m, NewGELUActivation) for m in mine.modules())
    assert sum(isinstance(m, GELUTanh) for m in mine.modules()) == 2
    assert mine.state_dict().keys() == plain.state_dict().keys()
    ids, _ = _ids()
    torch.testing.assert_close(mine(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert fused.gelu_tanh(_lm("llama")) == 0  # SiLU: nothing to swap
