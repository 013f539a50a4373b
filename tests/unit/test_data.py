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
