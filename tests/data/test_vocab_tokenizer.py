"""Character- and word-level tokenizers read from a token directory's vocab.json."""

import json

import pytest

from qkvlab.data.tokenizer import load_tokenizer
from qkvlab.data.tokens import TokenWriter
from qkvlab.errors import QkvlabError


def _token_dir(path, vocab, tokenizer, eot=None):
    writer = TokenWriter(path, len(vocab), tokenizer, eot=eot)
    writer.write("train", [0, 1])
    writer.close()
    (path / "vocab.json").write_text(json.dumps(vocab))
    return path


def test_characters_round_trip_and_unknown_characters_are_refused(tmp_path):
    tok = load_tokenizer(str(_token_dir(tmp_path / "chars", [" ", "a", "b", "c"], "char")))
    assert tok.encode("ab ca") == [1, 2, 0, 3, 1]
    assert tok.decode(tok.encode("ab ca")) == "ab ca"
    with pytest.raises(QkvlabError, match="no token for"):
        tok.encode("abz")


def test_words_map_unknown_words_to_unk(tmp_path):
    tok = load_tokenizer(str(_token_dir(tmp_path / "words", ["the", "<unk>", "<eos>", "cat"], "ptb-word", eot=2)))
    assert tok.encode("the  cat sat") == [0, 3, 1]
    assert tok.decode([0, 3, 2]) == "the cat <eos>"
    assert tok.eot == 2 and tok.vocab_size == 4


def test_unknown_tokenizer_lists_the_accepted_ones(tmp_path):
    with pytest.raises(QkvlabError, match="shakespeare"):
        load_tokenizer(str(tmp_path / "nothing"))


def test_a_corpus_tokenizes_with_a_character_vocabulary(tmp_path):
    # `qkvlab data tokenize --tokenizer shakespeare` once failed: VocabTokenizer has no encode_batch
    from qkvlab.data.tokenize import tokenize_files
    from qkvlab.data.tokens import open_tokens

    tok = load_tokenizer(str(_token_dir(tmp_path / "chars", [" ", "a", "b", "c"], "char")))
    (tmp_path / "a.txt").write_text("ab ca")
    tokenize_files([tmp_path / "a.txt"], tok, tmp_path / "out")
    assert open_tokens(tmp_path / "out").splits["train"].shards[0].tolist() == [1, 2, 0, 3, 1]
