"""Distillation's losses on hand-made logits (known KL values, the positions each task's loss reads) and
students cut from their teacher (weights, config, layer numbers, a save/load round trip)."""

import math

import pytest
import torch

from llmkit.distill import cosine_loss, cut_from_teacher, kl_loss, soft_positions
from llmkit.errors import RecipeError
from llmkit.tasks.base import LABELLED, NEXT, SEQUENCE


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def test_kl_matches_the_formula_at_temperature_one():
    teacher = torch.tensor([[0.0, math.log(3.0)]])  # softmax: [0.25, 0.75]
    student = torch.tensor([[0.0, 0.0]])  # [0.5, 0.5]
    assert kl_loss(student, teacher, 1.0).item() == pytest.approx(_kl([0.25, 0.75], [0.5, 0.5]), rel=1e-5)
    assert kl_loss(teacher, teacher, 1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_temperature_softens_both_and_scales_by_its_square():
    teacher = torch.tensor([[0.0, math.log(3.0)]])
    student = torch.tensor([[0.0, 0.0]])
    p = [1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))]  # softmax of teacher / 2
    assert kl_loss(student, teacher, 2.0).item() == pytest.approx(4 * _kl(p, [0.5, 0.5]), rel=1e-5)


def test_kl_is_the_mean_over_rows():
    teacher = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    student = torch.zeros(2, 2)
    assert kl_loss(student, teacher, 1.0).item() == pytest.approx(_kl([0.25, 0.75], [0.5, 0.5]) / 2, rel=1e-5)


def test_multi_label_rows_are_independent_bernoullis():
    teacher, student = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])  # p=.5,.5; q=.75,.5
    expected = _kl([0.5, 0.5], [0.75, 0.25])  # the second label agrees: 0
    assert kl_loss(student, teacher, 1.0, multi_label=True).item() == pytest.approx(expected, rel=1e-5)


def test_no_rows_is_zero_and_keeps_the_graph():
    student = torch.zeros(0, 5, requires_grad=True)
    loss = kl_loss(student, torch.zeros(0, 5), 2.0)
    loss.backward()
    assert loss.item() == 0.0 and student.grad is not None


def test_labelled_positions_are_those_with_a_label():
    logits = torch.arange(2 * 3 * 4, dtype=torch.float).reshape(2, 3, 4)
    labels = torch.tensor([[-100, 1, -100], [2, -100, 0]])
    rows = soft_positions(logits, labels, LABELLED)
    assert torch.equal(rows, torch.stack([logits[0, 1], logits[1, 0], logits[1, 2]]))


def test_next_token_positions_shift_by_one():
    logits = torch.randn(1, 4, 3)
    labels = torch.tensor([[5, 6, -100, 7]])  # position 1 predicts label 2 (-100): not compared
    rows = soft_positions(logits, labels, NEXT)
    assert torch.equal(rows, torch.stack([logits[0, 0], logits[0, 2]]))


def test_rows_already_selected_and_sequence_logits_pass_through():
    masked = torch.randn(3, 10)  # MLM's masked-only head: one row per masked token
    labels = torch.tensor([[-100, 4, 5, -100, 6]])
    assert soft_positions(masked, labels, LABELLED) is masked
    sequence = torch.randn(2, 3)
    assert soft_positions(sequence, torch.tensor([0, 2]), SEQUENCE) is sequence


def test_cosine_loss_over_the_masked_positions():
    a = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [5.0, 5.0]]])
    b = torch.tensor([[[2.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]])
    assert cosine_loss(a, b).item() == pytest.approx((0 + 2 + (1 - math.sqrt(0.5))) / 3, rel=1e-5)
    assert cosine_loss(a, b, torch.tensor([[1, 1, 0]])).item() == pytest.approx(1.0)


def _bert(layers=4):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32
    )
    return BertForSequenceClassification(config).eval()


def test_cut_student_copies_the_chosen_layers_embeddings_and_head(tmp_path):
    from transformers import AutoModelForSequenceClassification

    teacher = _bert()
    student = cut_from_teacher(teacher, [0, 2])
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    assert len(teacher.bert.encoder.layer) == 4  # the teacher is untouched
    for new, old in enumerate([0, 2]):
        a, b = student.bert.encoder.layer[new].state_dict(), teacher.bert.encoder.layer[old].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert student.bert.encoder.layer[new].attention.self.layer_idx == new
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    assert student.bert.embeddings.word_embeddings.weight is not teacher.bert.embeddings.word_embeddings.weight
    ids = torch.tensor([[1, 5, 7, 2]])
    student.save_pretrained(tmp_path)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert torch.allclose(again(input_ids=ids).logits, student(input_ids=ids).logits)


def test_cut_gpt2_and_t5_follow_their_config_names():
    from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=3, n_head=2, n_positions=16))
    student = cut_from_teacher(gpt, [2])
    assert student.config.n_layer == 1 and len(student.transformer.h) == 1
    assert student.transformer.h[0].attn.layer_idx == 0
    out = student.generate(torch.tensor([[1, 2]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 5)  # the cache indexes by the renumbered layers

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=16, d_ff=32, d_kv=8, num_layers=2, num_heads=2))
    student = cut_from_teacher(t5, [0])
    assert (student.config.num_layers, student.config.num_decoder_layers) == (1, 1)
    assert len(student.encoder.block) == len(student.decoder.block) == 1
    with pytest.raises(RecipeError, match="layer 0 holds weights"):  # T5's position bias lives in block 0
        cut_from_teacher(t5, [1])


def test_layers_out_of_range_name_the_teachers_depth():
    with pytest.raises(RecipeError, match=r"\[4\] out of range: the teacher has 4 layers \(0 to 3\)"):
        cut_from_teacher(_bert(), [0, 4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_kl_matches_autograd_in_value_and_gradient(dtype, monkeypatch):
    import llmkit.distill as distill

    monkeypatch.setattr(distill, "_CHUNK_BYTES", 4 * 50 * 7)  # 7 rows a block: several blocks and a ragged last one
    torch.manual_seed(0)
    student = torch.randn(30, 50, dtype=dtype, requires_grad=True)
    teacher = torch.randn(30, 50, dtype=dtype)
    ref_student = student.detach().clone().requires_grad_(True)
    s, t = torch.log_softmax(ref_student.float() / 2, -1), torch.log_softmax(teacher.float() / 2, -1)
    ref = torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean") * 4
    (3 * ref).backward()
    ours = kl_loss(student, teacher, 2.0)
    (3 * ours).backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert student.grad.dtype == dtype
    tolerance = (1e-2 if dtype == torch.bfloat16 else 1e-5) * ref_student.grad.abs().max().item()
    assert (student.grad.float() - ref_student.grad.float()).abs().max().item() <= tolerance
