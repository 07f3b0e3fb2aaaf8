"""recipes/llada/sample_quality.py: does a generated sample read (known words, no one-token runs)?"""

import shutil

import pytest
from text_to_shards import write_shards

from recipes.llada import sample_quality as q


def test_words_are_lower_cased_letter_runs_with_inner_apostrophes():
    assert q.words("The Government's 2001 plan: don't-stop, Zürich!") == ["the", "government's", "plan", "don't",
                                                                        "stop", "zürich"]
    assert q.words("12 ,.; 3") == [] and q.words("") == []


def test_longest_run_of_one_repeated_item():
    assert q.longest_run([]) == 0 and q.longest_run([7]) == 1
    assert q.longest_run([5, 5, 1, 5, 5, 5, 2]) == 3 and q.longest_run("ssssss") == 6
    assert q.longest_run(["the", "the", "cat"]) == 2


def test_garbage_scores_low_and_real_text_high():
    vocabulary = frozenset({"the", "government", "said", "on", "sunday", "it", "would", "act"})
    garbage = q.sample_scores("ssssssssssssssssssssssssssssssss", [9] * 32, vocabulary)
    assert garbage["known_words"] == 0.0 and garbage["longest_repeat"] == 32
    assert q.sample_scores(" ,,, 42", [11, 12, 13], vocabulary)["known_words"] == 0.0  # no word: no text
    fluent = q.sample_scores(" on Sunday it would act, the government said", list(range(20, 28)), vocabulary)
    assert fluent["known_words"] == 1.0 and fluent["longest_repeat"] == 1
    half = q.sample_scores(" the gvrmnt saiid act", [1, 2, 2, 3], vocabulary)
    assert half["known_words"] == 0.5 and half["longest_repeat"] == 2
    assert q.known_words(" the gvrmnt saiid act", vocabulary) == (2, 4)
    # Fragments are no words even where the training text has them as such ("U.S." -> "u", "s").
    assert q.known_words("s the s a I u", vocabulary | {"s", "u", "a", "i"}) == (3, 6)
    # Pooled over samples (each word weighs the same: 0 of 1, 8 of 8, 2 of 4), the worst run.
    assert q.summarize([garbage, fluent, half]) == {"sample_known_words": pytest.approx(10 / 13),
                                                  "sample_longest_repeat": 32.0}
    assert q.summarize([]) == {"sample_known_words": 0.0, "sample_longest_repeat": 0.0}
    line = q.annotate("The government said -> the gvrmnt saiid act", half)
    assert line == "The government said -> the gvrmnt saiid act  [known words 50%, longest repeat 2]"


def test_training_words_are_the_words_of_the_train_shards(tmp_path, tokenizer, english_docs):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tokenizer, data / "tokenizer.model")
    docs = english_docs(40, seed=3)
    index = write_shards(docs, data / "tokenizer.model", data / "train", shard_tokens=200, progress=False)
    assert len(index["shards"]) > 3
    expected = {w for d in docs for w in q.words(d)}
    assert q.training_words(str(data)) == expected and "river" in expected and "report" in expected
    first = index["shards"][0]["tokens"]  # a cap stops after the shard that reaches it
    assert q.training_words(str(data), max_tokens=first) < expected
