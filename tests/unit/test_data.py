"""Data loading: local formats, CoNLL, splits, caps, missing files and columns."""

import pytest

from llmkit.config import load_recipe
from llmkit.data import load_splits, pydoc_corpus_file, require_columns
from llmkit.datafiles import read_conll
from llmkit.errors import DataError, RecipeError


def _recipe(write, data: str, name="r.yaml"):
    text = (
        f"task: mlm\nmodel: {{config: {{model_type: bert}}}}\ntokenizer: {{train: {{type: wordpiece}}}}\ndata: {data}\n"
    )
    return load_recipe(write(name, text))


def test_read_conll(write):
    path = write("a.conll", "-DOCSTART- O\n\nEU B-ORG\nrejects O\n\n\nPeter\tB-PER\nBlackburn I-PER\n")
    assert read_conll(str(path)) == {
        "tokens": [["EU", "rejects"], ["Peter", "Blackburn"]],
        "ner_tags": [["B-ORG", "O"], ["B-PER", "I-PER"]],
    }


def test_read_conll_rejects_a_line_without_tag(write):
    with pytest.raises(DataError, match=r"b.conll:2: expected 'token tag'"):
        read_conll(str(write("b.conll", "EU B-ORG\nlonely\n")))


def test_text_file_with_carved_validation_and_caps(write):
    corpus = write("c.txt", "".join(f"line number {i}\n" for i in range(100)))
    ds = load_splits(_recipe(write, f"{{train: {corpus}, validation_split: 0.2, max_train_samples: 50}}"))
    assert set(ds) == {"train", "validation"}
    assert len(ds["train"]) == 50 and len(ds["validation"]) == 20
    again = load_splits(_recipe(write, f"{{train: {corpus}, validation_split: 0.2, max_train_samples: 50}}"))
    assert again["validation"]["text"] == ds["validation"]["text"]  # seeded


def test_jsonl_and_csv_splits(write):
    train = write("t.jsonl", '{"text": "a b"}\n{"text": "c d"}\n')
    val = write("v.jsonl", '{"text": "e f"}\n')
    ds = load_splits(_recipe(write, f"{{train: {train}, validation: {val}}}"))
    assert ds["train"]["text"] == ["a b", "c d"] and ds["validation"]["text"] == ["e f"]
    csv = write("t.csv", "text,label\nhello,1\nworld,0\n")
    ds = load_splits(_recipe(write, f"{{train: {csv}, validation_split: 0}}"))
    assert ds["train"].column_names == ["text", "label", "__row__"] and "validation" not in ds
    assert ds["train"]["__row__"] == list(range(1, len(ds["train"]) + 1))  # each row keeps its source row number


def test_missing_file_names_the_key(write, tmp_path):
    with pytest.raises(DataError, match=r"data file not found: .*nope.txt \(data.validation\).*data.validation="):
        load_splits(_recipe(write, f"{{source: pydoc, validation: {tmp_path / 'nope.txt'}}}"))


def test_unknown_extension(write):
    path = write("data.xyz", "x")
    with pytest.raises(DataError, match="unknown data file extension .xyz"):
        load_splits(_recipe(write, f"{{train: {path}}}"))


def test_missing_column_lists_found_columns(write):
    ds = load_splits(
        _recipe(
            write, f"{{train: {write('t.csv', 'review,label' + chr(10) + 'good,1' + chr(10))}, validation_split: 0}}"
        )
    )
    with pytest.raises(
        DataError, match=r"no column 'text' for text \(columns found: review, label\); set data.columns.text"
    ):
        require_columns(ds["train"], {"text": "text"}, "train")


def test_pydoc_corpus_is_real_prose():
    text = pydoc_corpus_file().read_text()
    assert len(text) > 300_000 and "the" in text.split()


def test_a_local_train_file_replaces_the_recipes_dataset(write):
    """`finetune recipes/classification.yaml data.train=my.csv`: the Hub dataset is not loaded (nor mixed in)."""
    train = write("my.csv", "review,label\ngood,1\nbad,0\nfine,1\nawful,0\n")
    ds = load_splits(_recipe(write, f"{{load: {{path: some/hub-dataset}}, train: {train}, validation_split: 0.25}}"))
    assert sorted(ds) == ["train", "validation"] and len(ds["train"]) == 3


def test_a_glob_names_every_matching_file_in_order(write, tmp_path):
    for name in ("b.txt", "a.txt", "c.json"):
        write(f"corpus/{name}", f"text of {name}\n")
    recipe = _recipe(write, f"{{train: '{tmp_path}/corpus/*.txt'}}")
    assert recipe.data.files("train") == [f"{tmp_path}/corpus/a.txt", f"{tmp_path}/corpus/b.txt"]
    assert load_splits(recipe)["train"]["text"][:1] == ["text of a.txt"]
    nothing = _recipe(write, f"{{train: '{tmp_path}/none/*.txt'}}")
    with pytest.raises(DataError, match=r"data file not found: .*none/\*\.txt \(data.train\)"):
        load_splits(nothing)


def test_a_prepared_folder_is_not_also_streamed(write):
    with pytest.raises(RecipeError, match="drop data.streaming"):
        _recipe(write, "{prepared: somewhere, streaming: true}")
    assert _recipe(write, "{prepared: somewhere}").data.prepared == "somewhere"  # no other data needed


def test_column_values_and_token_lengths_read_columns_at_once_through_a_selection():
    from datasets import Dataset

    from llmkit.data import column_values, token_lengths

    ds = Dataset.from_dict({"label": ["a", "b", "c", "d", "e"], "input_ids": [[1], [1, 2, 3], [], [4, 5], [6] * 7]})
    picked = ds.select([4, 0, 3])  # an indices mapping, as a shuffle or data.max_train_samples leaves
    assert column_values(picked, "label") == ["e", "a", "d"] == list(picked["label"])
    assert token_lengths(picked).to_pylist() == [7, 1, 2] and token_lengths(ds).to_pylist() == [1, 3, 0, 2, 7]
    assert token_lengths(ds, "label") is None and token_lengths(ds, "nope") is None


@pytest.mark.parametrize("select", [False, True])
def test_fast_length_grouping_samples_what_the_trainers_own_sampler_samples(tmp_path, select):
    import random

    import torch
    import transformers
    from datasets import Dataset

    from llmkit.data import GroupsByLengthFast

    rng = random.Random(0)
    ds = Dataset.from_dict({"input_ids": [[7] * rng.randint(1, 60) for _ in range(300)], "labels": [0] * 300})
    if select:
        ds = ds.shuffle(seed=3).select(range(200))

    class Plain:
        _get_train_sampler = transformers.Trainer._get_train_sampler

        def __init__(self, strategy):
            self.train_dataset, self.processing_class = ds, None
            self.args = transformers.TrainingArguments(
                output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=2,
                train_sampling_strategy=strategy, use_cpu=True, report_to="none",
            )  # fmt: skip

    class Fast(GroupsByLengthFast, Plain):
        pass

    ours, theirs = Fast("group_by_length")._get_train_sampler(), Plain("group_by_length")._get_train_sampler()
    assert ours.lengths == theirs.lengths and type(ours) is type(theirs)
    torch.manual_seed(5)
    first = list(ours)
    torch.manual_seed(5)
    assert first == list(theirs) and sorted(first) == list(range(len(ds)))
    plain = Fast("random")._get_train_sampler()  # any other strategy: the Trainer's own
    assert type(plain) is type(Plain("random")._get_train_sampler())
