import json

import pytest
import torch

from lora_null_core.calibration.batches import tokenize_batches
from lora_null_core.calibration.sources import load_rows
from lora_null_core.calibration.texts import choose_texts


@pytest.fixture
def rows():
    return [{"text": f"Ada Varga was born in Lisbon . {i}", "id": i} for i in range(30)]


def test_every_file_format_and_a_dataset_give_the_same_texts(tmp_path, rows, tokenizer):
    import datasets

    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.json").write_text(json.dumps(rows))
    dataset = datasets.Dataset.from_list(rows)
    dataset.to_parquet(str(tmp_path / "c.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    sources = [
        rows,
        dataset,
        str(tmp_path / "c.jsonl"),
        str(tmp_path / "c.json"),
        str(tmp_path / "c.parquet"),
        str(tmp_path / "saved"),
    ]
    chosen = [choose_texts(s, tokenizer, 20, 5, seed=3, text_field="text") for s in sources]
    for texts in chosen:
        assert texts.calibration == chosen[0].calibration and texts.holdout == chosen[0].holdout
    assert len(chosen[0].calibration) == 20 and len(chosen[0].holdout) == 5
    assert not set(chosen[0].calibration) & set(chosen[0].holdout)  # disjoint
    assert choose_texts(rows, tokenizer, 20, 5, 4, "text").calibration != chosen[0].calibration  # seed matters


def test_plain_strings_other_fields_and_chat_messages(tokenizer):
    assert choose_texts(["a b", "c d"], tokenizer, 5, 0, 0, "text").calibration in (["a b", "c d"], ["c d", "a b"])
    assert choose_texts([{"question": "Where ?"}], tokenizer, 1, 0, 0, "question").calibration == ["Where ?"]
    chat = [{"messages": [{"role": "user", "content": "Where was Ada Varga born ?"}]}]
    text = choose_texts(chat, tokenizer, 1, 0, 0, "text").calibration[0]
    assert text == tokenizer.apply_chat_template(chat[0]["messages"], tokenize=False)
    ids = tokenize_batches([text], tokenizer, 64, 1)[0].input_ids[0].tolist()
    assert ids.count(tokenizer.bos_token_id) == 1  # the template's BOS is not doubled


def test_batches_are_right_padded_truncated_and_masked(tokenizer):
    texts = ["Ada Varga was born in Lisbon .", "Ada .", "Hugo Novak studied law . " * 10]
    batches = tokenize_batches(texts, tokenizer, max_length=12, batch_size=2)
    assert [b.input_ids.shape[0] for b in batches] == [2, 1]
    lengths = sorted(int(n) for b in batches for n in b.attention_mask.sum(1))
    assert lengths == [3, 8, 12]  # BOS + words; the long one cut at 12
    for b in batches:
        for row, mask in zip(b.input_ids, b.attention_mask, strict=True):
            assert torch.all(row[mask == 0] == tokenizer.pad_token_id)
            assert mask.tolist() == sorted(mask.tolist(), reverse=True)  # padding only on the right


def test_a_hub_name_goes_to_datasets_and_fails_clearly_offline(monkeypatch, tokenizer):
    import datasets

    from lora_null_core.errors import CalibrationDataError

    calls = []

    def fake_load_dataset(name, split=None, **kwargs):
        calls.append((name, split))
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(CalibrationDataError, match="nq_open"):
        load_rows("google-research-datasets/nq_open:validation")
    assert calls == [("google-research-datasets/nq_open", "validation")]


def test_batches_are_filled_by_a_token_budget_not_a_row_count(tokenizer, knowledge):
    """Thousands of short prompts cost a few forward passes: rows × the batch's longest row stays within the
    budget, every text lands in exactly one batch, and a row cap or a process count still holds."""
    texts = knowledge[:300]
    batches = tokenize_batches(texts, tokenizer, max_length=64, batch_tokens=512)
    assert all(b.input_ids.numel() <= 512 for b in batches)
    assert sum(b.input_ids.shape[0] for b in batches) == len(texts)
    assert len(batches) < len(texts) / 8  # what the old 8-row default would have taken
    widths = [b.input_ids.shape[1] for b in batches]
    assert widths == sorted(widths, reverse=True)  # sorted by length: little padding
    capped = tokenize_batches(texts, tokenizer, max_length=64, batch_size=8, batch_tokens=512)
    assert max(b.input_ids.shape[0] for b in capped) == 8
    assert len(tokenize_batches(texts[:5], tokenizer, max_length=64, batch_tokens=10**6, min_batches=2)) == 2
    long_text = tokenize_batches(["word " * 200], tokenizer, max_length=64, batch_tokens=16)
    assert [b.input_ids.shape for b in long_text] == [(1, 64)]  # one row wider than the budget still runs


def test_a_malformed_jsonl_line_and_a_column_of_numbers_are_named(tmp_path, tokenizer):
    from lora_null_core import CalibrationDataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three",}\n{"text": "four"}\n')
    with pytest.raises(CalibrationDataError, match=r"bad.jsonl, line 3, is not JSON .*three"):
        load_rows(str(bad))
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text("".join(json.dumps({"text": i, "question": f"q{i}"}) + "\n" for i in range(8)))
    with pytest.raises(CalibrationDataError, match="column 'text' holds int values .*not text"):
        choose_texts(str(numbers), tokenizer, 4, 0, 0, "text")
    gaps = tmp_path / "gaps.jsonl"  # rows that lack the field are skipped, not an error
    gaps.write_text("".join(json.dumps({"text": f"fact {i}"} if i % 2 else {"other": i}) + "\n" for i in range(8)))
    assert sorted(choose_texts(str(gaps), tokenizer, 8, 0, 0, "text").calibration) == [
        f"fact {i}" for i in (1, 3, 5, 7)
    ]


def test_a_tokenized_training_set_reads_back_as_the_text_the_model_will_see(tokenizer, knowledge):
    """TokenizedRows: what a trainer tokenized (its input_ids), decoded when drawn; only the drawn rows decode."""
    from datasets import Dataset

    from lora_null_core.calibration.sources import TokenizedRows, describe
    from lora_null_core.errors import CalibrationDataError

    class Counted(list):
        reads = 0

        def __getitem__(self, index):
            Counted.reads += 1
            return super().__getitem__(index)

    ids = [tokenizer(text)["input_ids"] for text in knowledge[:40]]
    rows = TokenizedRows(Counted({"input_ids": i} for i in ids), tokenizer)
    drawn = choose_texts(rows, tokenizer, 8, 0, 0, "text")
    assert Counted.reads == 8  # of 40
    assert drawn.source == describe(rows) == "the training data as the trainer tokenized it (40 rows)"
    assert all(tokenizer(text, add_special_tokens=False)["input_ids"] in ids for text in drawn.calibration)
    assert rows[0:2] == [tokenizer.decode(i) for i in ids[:2]]
    tokenized = Dataset.from_dict({"input_ids": ids, "completion_mask": [[1] * len(i) for i in ids]})
    assert TokenizedRows(tokenized, tokenizer)[3] == rows[3]
    with pytest.raises(CalibrationDataError, match="no 'input_ids' column"):
        TokenizedRows(Dataset.from_dict({"text": ["a"]}), tokenizer)


def test_distinct_contexts_count_every_prefix_once_in_bulk_and_one_by_one():
    # Shared prefixes, exact and prefix-of-another duplicates, an empty sequence: against the set of all prefixes.
    import random

    from lora_null_core.calibration.contexts import Contexts

    rng = random.Random(0)
    stems = [[rng.randrange(5) for _ in range(rng.randrange(1, 6))] for _ in range(8)]
    sequences = [stem + [rng.randrange(5) for _ in range(rng.randrange(0, 4))] for stem in stems * 5]
    sequences += [sequences[3], sequences[3][:2], []]

    def prefixes(seqs):
        return len({tuple(s[:k]) for s in seqs for k in range(1, len(s) + 1)})

    bulk = Contexts()
    assert bulk.add(sequences[:30]) == len(bulk) == prefixes(sequences[:30])
    for end in range(31, len(sequences) + 1):  # then one at a time, as the reading past num_samples adds them
        assert bulk.add([sequences[end - 1]]) == prefixes(sequences[:end])
    assert Contexts().add(sequences) == prefixes(sequences)
    assert Contexts().add([[7] * 9] * 200) == 9  # 200 copies of one text count once


def test_token_ids_of_many_texts_equal_each_texts_own(tokenizer, knowledge):
    from lora_null_core.calibration.batches import token_ids, token_ids_of

    texts = [*knowledge[:20], f"{tokenizer.bos_token}already has its special token", ""]
    assert token_ids_of(texts, tokenizer, 16) == [token_ids(text, tokenizer, 16) for text in texts]
    assert token_ids_of(texts, tokenizer, 16)[-2][0] == tokenizer.bos_token_id  # not doubled
