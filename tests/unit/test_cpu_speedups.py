"""CPU training speed-ups: the fast dropout keeps torch's semantics (rate, scale, gradient, seeding); allocator settings."""

import pytest
import torch
from torch import nn

from llmkit import fastdropout
from llmkit.fastdropout import FastDropout, dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_rate_and_scale(dtype, p):
    torch.manual_seed(0)
    x = torch.randn(400_000, dtype=dtype)
    y = dropout(x, p)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 0.005  # the standard error is < 0.0008
    kept = y != 0
    # kept values are x times 1/(1-p) in float32, rounded once into the dtype
    assert torch.equal(y[kept], (x[kept].float() * torch.tensor(1 / (1 - p))).to(dtype))
    assert y.dtype == dtype and y.shape == x.shape


def test_every_element_position_and_bit_slice_is_dropped_alike():
    # four elements share one 64-bit draw: each of the four 16-bit slices must be equally random
    torch.manual_seed(1)
    y = dropout(torch.ones(4 * 100_000), 0.25).view(-1, 4)
    rates = (y == 0).float().mean(0)
    assert torch.all((rates - 0.25).abs() < 0.01), rates


def test_gradient_goes_through_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(64, 33, requires_grad=True)  # odd size: the last 64-bit draw is only partly used
    y = dropout(x, 0.3)
    g = torch.randn_like(y)
    y.backward(g)
    kept = y != 0
    assert torch.allclose(x.grad, torch.where(kept, g / 0.7, torch.zeros_like(g)))
    assert torch.allclose(y, torch.where(kept, x / 0.7, torch.zeros_like(x)))


def test_masks_follow_the_global_seed():
    x = torch.ones(1000)
    torch.manual_seed(3)
    a = dropout(x, 0.1)
    torch.manual_seed(3)
    b = dropout(x, 0.1)
    c = dropout(x, 0.1)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_torch_runs_where_the_fast_path_does_not_apply(monkeypatch):
    x = torch.randn(10)
    assert dropout(x, 0.1, training=False) is x
    assert dropout(x, 0.0) is x
    seen = []
    monkeypatch.setattr(fastdropout, "_torch_dropout", lambda *a: seen.append(a[1]) or x)
    for p in (1e-6, 1 - 1e-6):  # 16 bits cannot state these rates: torch's dropout takes them
        dropout(x, p)
    assert seen == [1e-6, 1 - 1e-6]
    monkeypatch.undo()
    assert torch.equal(dropout(x, 1.0), torch.zeros(10))
    y = x.clone()
    dropout(y, 0.5, inplace=True)  # torch's in-place dropout
    assert ((y == 0) | torch.isclose(y, 2 * x)).all() and (y == 0).any()
    with pytest.raises(ValueError):
        dropout(x, 1.5)


def _tiny(kind: str, attn: str = "eager"):
    import transformers

    configs = {
        "t5": transformers.T5Config(
            vocab_size=64, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2, decoder_start_token_id=0
        ),
        "bert": transformers.BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        ),
        "gpt2": transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2),
    }
    auto = {"t5": "AutoModelForSeq2SeqLM", "bert": "AutoModelForMaskedLM", "gpt2": "AutoModelForCausalLM"}[kind]
    return getattr(transformers, auto).from_config(configs[kind], attn_implementation=attn)


def _batch(kind):
    ids = torch.randint(1, 64, (2, 12))
    batch = {"input_ids": ids, "labels": ids}
    if kind == "t5":
        batch["labels"] = ids[:, :5].contiguous()
    return batch


@pytest.mark.parametrize("kind", ["t5", "bert", "gpt2"])
def test_install_covers_dropout_layers_and_attention_probabilities(kind, monkeypatch):
    model = _tiny(kind)
    before = sum(type(m) is nn.Dropout for m in model.modules())
    assert fastdropout.install(model) == before > 0
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert model.config._attn_implementation == "eager"

    calls = []
    real = fastdropout._MaskedScale.apply
    monkeypatch.setattr(fastdropout._MaskedScale, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    layer_calls = []
    for m in model.modules():
        if isinstance(m, FastDropout) and m.p > 0:
            m.register_forward_hook(lambda *_: layer_calls.append(1))
    attention_layers = {"t5": 3, "bert": 1, "gpt2": 1}[kind]  # T5: encoder, decoder and cross attention
    model.train()
    loss = model(**_batch(kind)).loss
    loss.backward()
    assert len(calls) == len(layer_calls) + attention_layers
    assert sum(len(s) == 4 for s in calls) == attention_layers  # attention probabilities: [batch, heads, q, k]
    calls.clear()
    model.eval()
    model(**_batch(kind))  # no dropout, and the attention modules leave nothing behind
    assert calls == [] and not any(hasattr(m, "_llmkit_dropout_mode") for m in model.modules())


def test_an_attention_forward_that_raises_leaves_no_mode_behind():
    from torch.overrides import _get_current_function_mode_stack

    model = _tiny("bert")
    fastdropout.install(model)
    model.train()

    def fail(*_):
        raise RuntimeError("inside the attention module")

    model.bert.encoder.layer[0].attention.self.query.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="inside the attention"):
        model(input_ids=torch.randint(1, 64, (2, 12)))
    assert _get_current_function_mode_stack() == []


@pytest.mark.parametrize("kind", ["t5", "bert"])
def test_install_changes_nothing_in_eval(kind):
    torch.manual_seed(0)
    model = _tiny(kind).eval()
    batch = _batch(kind)
    with torch.no_grad():
        before = model(**batch).logits
    fastdropout.install(model)
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.allclose(before, after, atol=1e-6)


def test_sdpa_is_left_alone_when_named_or_without_attention_dropout():
    model = _tiny("bert", attn="sdpa")
    fastdropout.install(model)  # the recipe named sdpa
    assert model.config._attn_implementation == "sdpa"
    assert any(isinstance(m, FastDropout) for m in model.modules())

    model = _tiny("bert", attn="sdpa")
    model.config.attention_probs_dropout_prob = 0.0
    fastdropout.install(model, choose_attention=True)  # nothing to drop: SDPA's fused kernel stays
    assert model.config._attn_implementation == "sdpa"

    model = _tiny("t5", attn="sdpa")
    fastdropout.install(model, choose_attention=True)  # SDPA would fall back to the math path to drop
    assert model.config._attn_implementation == "eager"


def test_training_keeps_freed_memory_for_reuse_unless_opted_out(monkeypatch):
    import ctypes

    from llmkit import memory

    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.delenv("LLMKIT_MALLOC", raising=False)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setattr("platform.libc_ver", lambda: ("glibc", "2.36"))
    memory.keep_freed_memory()
    assert calls == [(-3, 32 << 20), (-1, 1 << 30)]  # M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 1 GiB
    calls.clear()
    Libc.mallopt = lambda self, param, value: calls.append((param, value)) or 0  # an older glibc refuses
    memory.keep_freed_memory()
    assert calls == [(-3, 32 << 20)]  # and the trim threshold alone would freeze mmap at 128 KiB: not set
    calls.clear()
    monkeypatch.setenv("LLMKIT_MALLOC", "default")
    memory.keep_freed_memory()
    assert calls == []


def _classifier(kind: str, attn: str, tokens: bool = False):
    """A tiny 2-layer encoder without dropout: a sequence classifier, or a token classifier with `tokens`."""
    import transformers

    common = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                  max_position_embeddings=40, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    config = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig,
              "electra": transformers.ElectraConfig}[kind](**common)  # fmt: skip
    config._attn_implementation = attn
    torch.manual_seed(0)
    auto = transformers.AutoModelForTokenClassification if tokens else transformers.AutoModelForSequenceClassification
    return auto.from_config(config)


def _padded_batch(rows_labels):
    ids = torch.randint(5, 60, (4, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = mask[3, 3:] = 0  # right-padded rows
    labels = torch.randint(0, 3, (4, 12)).masked_fill(mask == 0, -100) if rows_labels is None else rows_labels
    return dict(input_ids=ids, attention_mask=mask, labels=labels), mask


def _same_outputs_and_gradients(full, fast, batch, real=slice(None)):
    """Both models' logits (at `real`), loss and every gradient agree; returns each model's FLOPs for the batch."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for name, model in (("full", full), ("fast", fast)):
        with FlopCounterMode(display=False) as counter:
            model(**batch).loss.backward()
        flops[name] = counter.get_total_flops()
    a, b = full(**batch), fast(**batch)
    assert torch.allclose(a.logits[real], b.logits[real], atol=1e-5) and torch.allclose(a.loss, b.loss, atol=1e-6)
    for (n, p), q in zip(full.named_parameters(), fast.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-5), n
    assert full.state_dict().keys() == fast.state_dict().keys()
    return flops


@pytest.mark.parametrize("kind", ["bert", "roberta", "electra"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_first_token_only_last_layer_keeps_logits_loss_and_gradients(kind, attn):
    import copy

    from llmkit.tasks.classification import last_layer_first_token_only

    full = _classifier(kind, attn)
    fast = copy.deepcopy(full)
    assert last_layer_first_token_only(fast) and last_layer_first_token_only(fast)  # a second call: no second hook
    batch, _ = _padded_batch(torch.tensor([0, 2, 1, 2]))
    flops = _same_outputs_and_gradients(full, fast, batch)
    assert flops["fast"] < 0.85 * flops["full"], flops  # the last of 2 layers works on one position of 12


def test_first_token_only_is_left_out_for_other_heads_and_the_hidden_loss():
    import transformers

    from llmkit.tasks.classification import TASK, last_layer_first_token_only

    gpt2 = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2))
    assert not last_layer_first_token_only(gpt2)  # reads the last token
    tokens = transformers.BertForTokenClassification(transformers.BertConfig(hidden_size=16, num_hidden_layers=1,
                                                                              num_attention_heads=2, intermediate_size=32))  # fmt: skip
    assert not last_layer_first_token_only(tokens)
    recipe = type("R", (), {"distill": type("D", (), {"hidden_loss": 1.0})(), "args": None})()
    model = _classifier("bert", "eager")
    TASK.prepare_model(recipe, model)
    block = model.bert.encoder.layer[-1].attention.output
    assert not getattr(block, "_llmkit_first_token", False)
    recipe.distill.hidden_loss = 0.0
    TASK.prepare_model(recipe, model)
    assert block._llmkit_first_token


@pytest.mark.parametrize("head", ["tokens", "sequence"])
@pytest.mark.parametrize("kind", ["bert", "roberta", "electra"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_skipping_padding_keeps_real_outputs_loss_and_gradients(head, kind, attn):
    import copy

    from llmkit.tasks.classification import last_layer_first_token_only
    from llmkit.unpad import skip_padding

    full = _classifier(kind, attn, tokens=head == "tokens")
    fast = copy.deepcopy(full)
    if head == "sequence":  # as classification installs both: the last layer keeps its first-token hook
        assert last_layer_first_token_only(full) and last_layer_first_token_only(fast)
    assert skip_padding(fast) and skip_padding(fast)  # a second call: no second set of hooks
    batch, mask = _padded_batch(None if head == "tokens" else torch.tensor([0, 2, 1, 2]))
    flops = _same_outputs_and_gradients(full, fast, batch, mask.bool() if head == "tokens" else slice(None))
    # 34 of 48 positions are real (gathered as 40: packed_size); a classifier's last layer already runs at the first
    # token only
    assert flops["fast"] < (0.92 if head == "tokens" else 0.98) * flops["full"], flops
    unpadded = dict(batch, attention_mask=torch.ones_like(mask))  # no padding: nothing gathered, same outputs
    assert torch.allclose(full(**unpadded).logits, fast(**unpadded).logits, atol=1e-5)
    left = dict(batch, attention_mask=mask.flip(1))  # left padding: position 0 is padding in short rows: left alone
    assert torch.allclose(full(**left).logits, fast(**left).logits, atol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "roberta", "electra"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_token_classifiers_last_layer_runs_at_its_labelled_positions_only(kind, attn):
    import copy

    from llmkit.unpad import packed_size, skip_padding

    full = _classifier(kind, attn, tokens=True)
    fast, real_only = copy.deepcopy(full), copy.deepcopy(full)
    assert skip_padding(fast, labelled_last_layer=True) and skip_padding(real_only)
    batch, mask = _padded_batch(None)
    batch["labels"][:, ::3] = -100  # as [CLS] and continuation pieces: 22 of the 34 real tokens labelled
    labelled = batch["labels"] != -100
    seen = []
    fast.base_model.encoder.layer[-1].intermediate.register_forward_hook(lambda m, a, out: seen.append(a[0].shape))
    flops = _same_outputs_and_gradients(full, fast, batch, labelled)
    assert seen[0] == torch.Size([1, 24, 16])  # the last feed-forward at 22 labelled positions (rounded to 24)
    full.zero_grad(set_to_none=True)
    assert flops["fast"] < 0.95 * _same_outputs_and_gradients(full, real_only, batch, mask.bool())["fast"], flops
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}  # prediction: every real position computed
    assert torch.allclose(full(**unlabelled).logits[mask.bool()], fast(**unlabelled).logits[mask.bool()], atol=1e-5)
    for other in (torch.ones_like(mask), mask.flip(1)):  # no padding, left padding: the labelled rows still
        labels = batch["labels"].masked_fill(other == 0, -100)
        seen.clear()
        a, b = (
            full(**dict(batch, attention_mask=other, labels=labels)),
            fast(**dict(batch, attention_mask=other, labels=labels)),
        )
        assert torch.allclose(a.logits[labels != -100], b.logits[labels != -100], atol=1e-5) and torch.allclose(
            a.loss, b.loss, atol=1e-6
        )
        assert seen[0][1] == packed_size(int((labels != -100).sum()))
    seen.clear()
    nothing = batch["labels"].masked_fill(torch.ones_like(mask, dtype=torch.bool), -100)  # no labelled position
    assert torch.allclose(
        full(**unlabelled).logits[mask.bool()], fast(**dict(batch, labels=nothing)).logits[mask.bool()], atol=1e-5
    )
    assert seen == [torch.Size([1, 40, 16])]  # every real token (34, rounded to 40)
    sequence = _classifier(kind, "eager")  # other heads' last layers are left as they are
    assert skip_padding(sequence, labelled_last_layer=True) and not sequence._forward_pre_hooks


def test_gathered_tokens_take_one_of_a_few_sizes_with_padding_positions_riding_along():
    from llmkit.unpad import packed_size, skip_padding

    assert [packed_size(n) for n in (1, 8, 9, 34, 470, 512, 513, 1000)] == [8, 8, 16, 40, 480, 512, 544, 1024]
    assert all(n <= packed_size(n) < n + max(8, n / 16) for n in range(1, 5000))
    assert len({packed_size(n) for n in range(1, 4097)}) == 96  # not 4,096 matmul shapes (oneDNN compiles each)
    model = _classifier("bert", "eager", tokens=True)
    assert skip_padding(model)
    seen = []
    model.bert.encoder.layer[0].attention.self.query.register_forward_hook(lambda m, a, out: seen.append(a[0].shape))
    batch, mask = _padded_batch(None)
    model(**batch)
    assert int(mask.sum()) == 34 and seen == [torch.Size([1, 40, 16])]  # 34 real tokens and 6 padding positions
    mask[0, 6:] = mask[2, 4:] = 0  # 20 real tokens, rounded to 24
    seen.clear()
    model(**dict(batch, attention_mask=mask))
    assert seen == [torch.Size([1, 24, 16])]
    full = torch.ones_like(mask)
    full[3, 11] = 0  # 47 real tokens round to 48: the whole batch, run padded
    seen.clear()
    model(**dict(batch, attention_mask=full))
    assert seen == [torch.Size([4, 12, 16])]


def test_skipping_padding_leaves_other_models_alone():
    import transformers

    from llmkit.unpad import skip_padding

    assert not skip_padding(
        transformers.GPT2ForSequenceClassification(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2))
    )
    decoder = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                      is_decoder=True)  # fmt: skip
    assert not skip_padding(transformers.BertForTokenClassification(decoder))
    from llmkit.tasks.classification import last_layer_first_token_only

    model = _classifier("bert", "eager")
    assert skip_padding(model) and not last_layer_first_token_only(model)  # not both hooks on one block


def test_positions_are_skipped_unless_told_or_on_a_tpu(monkeypatch):
    """Unset, `model.skip_positions` is on, but for a run on XLA (a TPU): every new gathered size is a compilation."""
    from types import SimpleNamespace as NS

    import transformers.utils

    from llmkit.unpad import positions_skipped

    def recipe(value=None, use_cpu=False):
        return NS(model=NS(skip_positions=value), args=NS(use_cpu=use_cpu))

    assert positions_skipped(recipe()) and not positions_skipped(recipe(False))
    monkeypatch.setattr(transformers.utils, "is_torch_xla_available", lambda: True)
    assert not positions_skipped(recipe()) and not positions_skipped(NS(model=NS(skip_positions=None), args=None))
    assert positions_skipped(recipe(True)) and positions_skipped(recipe(use_cpu=True))  # named, or on the CPU


@pytest.mark.parametrize("task_name", ["ner", "classification"])
def test_tasks_skip_padding_unless_the_hidden_loss_or_compile_needs_every_position(task_name):
    from types import SimpleNamespace as NS

    from llmkit.tasks import get_task

    task = get_task(task_name)
    plain = NS(distill=None, args=NS(torch_compile=False, n_gpu=1))
    for recipe, expected in (
        (plain, True),
        (NS(distill=NS(hidden_loss=1.0), args=plain.args), False),
        (NS(distill=None, args=NS(torch_compile=True, n_gpu=1)), False),
        (NS(distill=None, args=NS(torch_compile=False, n_gpu=2)), False),  # nn.DataParallel: replicas share hooks
        (NS(distill=None, args=plain.args, model=NS(skip_positions=False)), False),  # every position, as transformers
    ):
        model = _classifier("bert", "eager", tokens=task_name == "ner")
        task.prepare_model(recipe, model)
        assert getattr(model.bert, "_llmkit_skips_padding", False) is expected, recipe
        if task_name == "classification":  # the last layer at the first token: off only where every position is kept
            block = model.bert.encoder.layer[-1].attention.output
            kept = getattr(recipe, "model", NS(skip_positions=True)).skip_positions and recipe.distill is None
            assert getattr(block, "_llmkit_first_token", False) is kept, recipe
        # NER's last layer runs at the labelled positions: the labels are read where the model is called
        assert bool(model._forward_pre_hooks) is (expected and task_name == "ner"), recipe


@pytest.mark.parametrize("reentrant", [False, True])
def test_skipping_padding_under_gradient_checkpointing(reentrant):
    import copy

    from llmkit.unpad import skip_padding

    full = _classifier("bert", "eager", tokens=True)
    fast = copy.deepcopy(full)
    assert skip_padding(fast, labelled_last_layer=True)
    batch, _ = _padded_batch(None)
    batch["labels"][:, ::3] = -100
    for model in (full, fast):  # the backward pass runs each layer again: it must gather as the forward did
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        model(**batch).loss.backward()
    for (n, p), q in zip(full.named_parameters(), fast.parameters(), strict=True):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-5), n


def test_the_embedding_gradient_is_the_same_in_one_kept_buffer(monkeypatch):
    import copy

    from llmkit import memory

    monkeypatch.setattr(memory, "MMAP_THRESHOLD", 0)  # tiny models: any embedding counts as large
    plain = _classifier("bert", "eager", tokens=True)
    plain.config.pad_token_id = plain.bert.embeddings.word_embeddings.padding_idx = 0
    mine = copy.deepcopy(plain)
    assert memory.reuse_embedding_gradient(mine)
    batch, mask = _padded_batch(None)
    batch["input_ids"] = batch["input_ids"].masked_fill(mask == 0, 0)  # padding: id 0, whose row gets no gradient
    weights = (plain.bert.embeddings.word_embeddings.weight, mine.bert.embeddings.word_embeddings.weight)
    kept = []
    for step in range(3):
        for model in (plain, mine):
            model(**batch).loss.backward()
            if step == 1:  # gradient accumulation: a second batch adds to the first
                model(**batch).loss.backward()
        torch.testing.assert_close(weights[1].grad, weights[0].grad)
        assert not weights[1].grad[0].any()
        kept.append(weights[1].grad.data_ptr())
        plain.zero_grad(set_to_none=True), mine.zero_grad(set_to_none=True)
    assert len(set(kept)) == 1  # the same buffer every step
    twin = copy.deepcopy(mine)  # a copy looks up its own weight
    twin(**batch).loss.backward()
    assert twin.bert.embeddings.word_embeddings.weight.grad is not None and weights[1].grad is None


def test_the_kept_embedding_gradient_is_re_zeroed_row_by_row_unless_something_else_wrote_to_it(monkeypatch):
    """Each step's gradient equals torch's over batches of other tokens: the buffer is re-zeroed only at the rows the
    last lookups added to (also after clipping by a finite factor), and whole after a NaN clipping factor or any
    other write."""
    import copy

    from llmkit import memory
    from llmkit.clipping import clip_grad_norm

    monkeypatch.setattr(memory, "MMAP_THRESHOLD", 0)
    plain = _classifier("bert", "eager", tokens=True)
    mine = copy.deepcopy(plain)
    assert memory.reuse_embedding_gradient(mine)
    weights = (plain.bert.embeddings.word_embeddings.weight, mine.bert.embeddings.word_embeddings.weight)
    torch.manual_seed(1)
    for step in range(7):
        batch, _ = _padded_batch(None)
        batch["input_ids"] = torch.randint(5 + 10 * (step % 3), 15 + 10 * (step % 3), (4, 12))  # other rows each step
        other = dict(batch, input_ids=torch.randint(40, 60, (4, 12)))
        for model in (plain, mine):
            model(**batch).loss.backward()
            if step == 5:  # gradient accumulation: another batch's rows add to the same buffer, then a clip
                model(**other).loss.backward()
                clip_grad_norm([p.grad for p in model.parameters() if p.grad is not None], 1e-3)
        torch.testing.assert_close(weights[1].grad, weights[0].grad, rtol=0, atol=0)
        kept = mine.bert.embeddings.word_embeddings._llmkit_kept_grad
        if step == 2:  # clipped by a finite factor below 1: the untouched rows stay zero, and the row-wise re-zero
            for model in (plain, mine):
                clip_grad_norm([p.grad for p in model.parameters() if p.grad is not None], 1e-3)
            assert kept["version"] == kept["buffer"]._version  # only the rows in use were multiplied, bit for bit:
            torch.testing.assert_close(weights[1].grad, weights[0].grad, rtol=0, atol=0)
            assert not weights[1].grad.equal(torch.zeros_like(weights[1].grad))
        if step == 3:  # a NaN norm: the factor is NaN, and so is every row, the untouched ones too
            for model in (plain, mine):
                model.classifier.weight.grad[0, 0] = float("nan")
                clip_grad_norm([p.grad for p in model.parameters() if p.grad is not None], 1.0)
            assert kept["version"] != kept["buffer"]._version and weights[1].grad.isnan().all()
        if step == 4:  # anything else that writes to the buffer: the version moves on without it
            for w in weights:
                w.grad.add_(1.0)
            assert kept["version"] != kept["buffer"]._version
        plain.zero_grad(set_to_none=True), mine.zero_grad(set_to_none=True)
    # Only the rows added to are re-zeroed: a value put where no lookup wrote (behind the version counter's back,
    # as nothing in training does) is still there after the next step.
    buffer = mine.bert.embeddings.word_embeddings._llmkit_kept_grad["buffer"]
    buffer.data[63] = 7.0
    mine(**_padded_batch(None)[0]).loss.backward()
    assert bool((weights[1].grad[63] == 7.0).all())


def test_the_embedding_gradient_is_left_to_torch_where_it_cannot_be_kept(monkeypatch):
    from llmkit import memory

    assert not memory.reuse_embedding_gradient(_classifier("bert", "eager"))  # small: glibc reuses its blocks
    monkeypatch.setattr(memory, "MMAP_THRESHOLD", 0)
    frozen = _classifier("bert", "eager")
    frozen.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # LoRA
    assert not memory.reuse_embedding_gradient(frozen)
    normed = _classifier("bert", "eager")
    normed.bert.embeddings.word_embeddings.max_norm = 1.0
    assert not memory.reuse_embedding_gradient(normed)
