"""WikiText-103 from user-supplied files: tiny copies in the exact standard layouts (word-tokenized
`wikitext-103/wiki.*.tokens` and untokenized `wikitext-103-raw/wiki.*.raw`), converted into the cache."""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkvlab.cli.main import main
from qkvlab.data.sources import SOURCES, resolve
from qkvlab.data.tokenizer import TextTokenizer, token_dir_tokenizer, tokenizer_files, tokenizer_from_record, train_bpe
from qkvlab.data.tokens import open_tokens
from qkvlab.data.wikitext import EOS, STANDARD_VOCAB, UNK, wikitext_tokens
from qkvlab.errors import QkvlabError
from qkvlab.tasks.registry import data_for, get_task

# The standard files' shape: a leading space, headings ` = Title = ` and ` = = Section = = `, blank
# lines " ", split numbers and hyphens (` @-@ `, ` @,@ `, ` @.@ `), and `<unk>` in the tokenized version.
TOKENS = {
    "train": [" ", " = Valkyria Chronicles III = ", " ",
              " Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : 戦場のヴァルキュリア3 ) is a tactical "
              "role @-@ playing video game developed by Sega . ",
              " The game began development in 2010 , carrying over a large portion of the work done on "
              "Valkyria Chronicles II . ", " ",
              " = = Gameplay = = ", " ",
              " As with previous <unk> Chronicles games , the game is a tactical role @-@ playing game where "
              "players take control of a military unit . It sold 1 @,@ 000 copies at 3 @.@ 5 dollars . ", " "],
    "valid": [" ", " = Robert Boulter = ", " ",
              " Robert Boulter is an English film , television and theatre actor . The game is a zebra . ", " "],
    "test": [" ", " = Tower Building of the Little Rock Arsenal = ", " ",
             " The Tower Building of the Little Rock Arsenal , also known as U.S. Arsenal Building , "
             "is a building . ", " "],
}
RAW = {split: [line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".").replace("<unk>", "Valkyria")
               for line in lines] for split, lines in TOKENS.items()}
STEMS = {"train": "train", "val": "valid", "test": "test"}


def write_wikitext(root: Path, splits: dict[str, list[str]] = TOKENS, layout: str = "tokens") -> Path:
    """`root/wikitext-103/wiki.{train,valid,test}.tokens` (or `-raw/...raw`), one line per item."""
    folder = root / ("wikitext-103" if layout == "tokens" else "wikitext-103-raw")
    folder.mkdir(parents=True, exist_ok=True)
    for stem, lines in splits.items():
        (folder / f"wiki.{stem}.{layout}").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return folder


def split_ids(out: Path, split: str) -> list[int]:
    return [int(i) for shard in open_tokens(out).split(split).shards for i in np.asarray(shard)]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Every test converts into its own cache, never the user's."""
    monkeypatch.setenv("QKVLAB_DATA", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_word_level_vocabulary_tokens_and_round_trip(tmp_path, cache):
    write_wikitext(tmp_path / "user")
    before = snapshot(tmp_path / "user")
    out = wikitext_tokens(tmp_path / "user")
    assert cache in out.parents and snapshot(tmp_path / "user") == before  # nothing written into the input

    counts = Counter(w for line in TOKENS["train"] for w in line.split())
    counts[EOS] = len(TOKENS["train"])
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab == sorted(counts, key=lambda w: (-counts[w], w))  # train only, by frequency then alphabetically
    assert vocab[0] == EOS and UNK in vocab and "zebra" not in vocab and "Boulter" not in vocab
    tokens = open_tokens(out)
    assert tokens.vocab_size == len(vocab) and tokens.meta["eot"] == vocab.index(EOS)
    assert tokens.meta["tokenizer"] == "wikitext-103-word"

    for split, stem in STEMS.items():
        lines = TOKENS[stem]
        expected = [w if w in vocab else UNK for line in lines for w in (*line.split(), EOS)]
        ids = split_ids(out, split)
        assert [vocab[i] for i in ids] == expected  # unknown val/test words are <unk>, one <eos> per line
        n_words = sum(len(line.split()) for line in lines)
        assert len(ids) == n_words + len(lines) and ids.count(vocab.index(EOS)) == len(lines)
        assert tokens.meta["words"][split] == n_words and tokens.meta["lines"][split] == len(lines)
        assert tokens.split(split).chars == sum(len(line) + 1 for line in lines)  # the file's characters
        assert tokens.meta["unk"][split] == expected.count(UNK)
    assert tokens.meta["unk"]["val"] > 0 and "zebra" in TOKENS["valid"][3]


def test_generate_decodes_words_from_the_tokenizer_record(tmp_path):
    write_wikitext(tmp_path / "user")
    out = wikitext_tokens(tmp_path / "user")
    tok = token_dir_tokenizer(out)
    ids = split_ids(out, "train")
    text = " ".join(w for line in TOKENS["train"] for w in (*line.split(), EOS))
    assert tok is not None and tok.decode(ids) == text and tok.encode(text) == ids
    assert tok.encode("the zebra game") == tok.encode("the <unk> game")
    record, files = tokenizer_files(tok)  # what a checkpoint stores beside its weights
    assert record["kind"] == "words" and record["eot"] == ids[-1]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    assert tokenizer_from_record(record, tmp_path).decode(ids) == text


def test_raw_layout_for_words_and_subwords(tmp_path):
    write_wikitext(tmp_path / "raw", RAW, "raw")
    out = wikitext_tokens(tmp_path / "raw")
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab[-1] == UNK and "role-playing" in vocab  # no <unk> in raw train: kept anyway, count 0

    bpe = TextTokenizer("tiny-bpe", train_bpe(["".join(line + "\n" for line in RAW["train"])], 300))
    write_wikitext(tmp_path / "both")
    write_wikitext(tmp_path / "both", RAW, "raw")
    words, subwords = wikitext_tokens(tmp_path / "both"), wikitext_tokens(tmp_path / "both", bpe)
    assert "-tokens-" in words.name and "-raw-" in subwords.name  # words prefer .tokens, subwords .raw
    tokens = open_tokens(subwords)
    assert tokens.meta["tokenizer"] == "tiny-bpe" and tokens.vocab_size == bpe.vocab_size
    for split, stem in STEMS.items():
        text = "".join(line + "\n" for line in RAW[stem])
        assert bpe.decode(split_ids(subwords, split)) == text  # byte-level BPE is lossless
        assert tokens.split(split).chars == len(text)
    reread = token_dir_tokenizer(subwords)  # the directory carries its tokenizer.json
    assert reread is not None and reread.decode(split_ids(subwords, "val")) == "".join(x + "\n" for x in RAW["valid"])


def test_vocab_size_cap_maps_rare_words_to_unk(tmp_path):
    write_wikitext(tmp_path / "user")
    out = wikitext_tokens(tmp_path / "user", vocab_size=6)
    vocab = json.loads((out / "vocab.json").read_text())
    assert len(vocab) == 6 and {EOS, UNK} <= set(vocab) and out != wikitext_tokens(tmp_path / "user")
    words = [w for line in TOKENS["train"] for w in line.split()]
    counts = Counter(words)
    kept = set(vocab) - {EOS, UNK}
    assert min(counts[w] for w in kept) >= max(counts[w] for w in counts if w not in kept and w != UNK)
    ids = split_ids(out, "train")
    assert len(ids) == len(words) + len(TOKENS["train"])
    assert ids.count(vocab.index(UNK)) == sum(1 for w in words if w not in kept)
    for bad in (1, 2.5, "10"):
        with pytest.raises(QkvlabError, match=f"vocab_size must be an integer >= 2.*got {bad!r}"):
            wikitext_tokens(tmp_path / "user", vocab_size=bad)


def test_cache_is_reused_and_converted_again_when_a_file_changes(tmp_path):
    folder = write_wikitext(tmp_path / "user")
    out = wikitext_tokens(tmp_path / "user")
    ready = out / "READY.json"
    stamp = ready.stat().st_mtime_ns
    assert wikitext_tokens(folder) == out and ready.stat().st_mtime_ns == stamp  # the same folder, reused
    write_wikitext(tmp_path / "other")
    assert wikitext_tokens(tmp_path / "other") != out  # another input folder, another cache entry

    with open(folder / "wiki.valid.tokens", "a", encoding="utf-8") as f:
        f.write(" The game . \n")
    assert wikitext_tokens(tmp_path / "user") == out and ready.stat().st_mtime_ns != stamp
    assert open_tokens(out).meta["lines"]["val"] == len(TOKENS["valid"]) + 1
    stamp = ready.stat().st_mtime_ns
    os.utime(folder / "wiki.test.tokens", ns=(1, 1))  # same size, other mtime: converted again
    wikitext_tokens(tmp_path / "user")
    assert ready.stat().st_mtime_ns != stamp
    shard = out / "train-000000.bin"
    shard.write_bytes(shard.read_bytes()[:8])  # a damaged conversion is redone
    assert len(split_ids(wikitext_tokens(tmp_path / "user"), "train")) > 2


def test_clear_errors(tmp_path):
    with pytest.raises(QkvlabError, match=r"WikiText-103 directory .*nowhere does not exist; expected it to hold "
                                          r"wikitext-103/ with wiki.train.tokens"):
        wikitext_tokens(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QkvlabError, match=r"WikiText-103 not found in .*empty: expected wikitext-103/.*"
                                          r"pass data_dir=DIR"):
        wikitext_tokens(tmp_path / "empty")
    folder = write_wikitext(tmp_path / "user")
    (folder / "wiki.test.tokens").unlink()
    with pytest.raises(QkvlabError, match=r"WikiText-103 folder .*user/wikitext-103 has no wiki.test.tokens; "
                                          r"expected wikitext-103/ with wiki.train.tokens"):
        wikitext_tokens(tmp_path / "user")
    write_wikitext(tmp_path / "user", {**TOKENS, "valid": [" ", " ", ""]})
    with pytest.raises(QkvlabError, match=r"wiki.valid.tokens holds no words: the val split would be empty"):
        wikitext_tokens(tmp_path / "user")
    (folder / "wiki.valid.tokens").write_bytes(b" caf\xe9 \n")
    with pytest.raises(QkvlabError, match=r"wiki.valid.tokens is not UTF-8 text"):
        wikitext_tokens(tmp_path / "user")
    with pytest.raises(QkvlabError, match="a subword tokenizer has its own size"):
        wikitext_tokens(tmp_path / "user", TextTokenizer("bytes"), vocab_size=10)


def test_cache_inside_the_input_folder_is_refused(tmp_path, monkeypatch):
    folder = write_wikitext(tmp_path / "user")
    monkeypatch.setenv("QKVLAB_DATA", str(folder / "cache"))
    with pytest.raises(QkvlabError, match="lies inside the WikiText-103 folder"):
        wikitext_tokens(tmp_path / "user")


def _train(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(["train", *argv, "preset=tiny", "train.steps=2", "train.eval_batches=1", "train.threads=1",
                 "train.progress=false", "train.tensorboard=false"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_trains_end_to_end_and_records_the_word_tokenizer(tmp_path, capsys):
    from qkvlab.models.tokenizer import recorded_tokenizer

    long = {stem: lines * 8 for stem, lines in TOKENS.items()}  # more than one 33-token window per split
    write_wikitext(tmp_path / "user", long)
    run = tmp_path / "run"
    code, out, err = _train(["task=wikitext-103", f"data_dir={tmp_path / 'user'}", f"train.out_dir={run}"], capsys)
    assert code == 0, err
    assert "wikitext-103" in out and "perplexity" in out
    tok = recorded_tokenizer(run)
    assert tok is not None and tok.name == "wikitext-103-word" and tok.decode(tok.encode("The game")) == "The game"


@pytest.mark.parametrize("argv, message", [
    (["data_dir={tmp}/nowhere"], "WikiText-103 directory {tmp}/nowhere does not exist"),
    ([], "WikiText-103 not found in {tmp}/cache: expected wikitext-103/ with wiki.train.tokens"),
    (["data_dir={tmp}/user"], "has no wiki.valid.tokens"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "cache").mkdir()
    folder = write_wikitext(tmp_path / "user")
    (folder / "wiki.valid.tokens").unlink()
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, _, err = _train(["task=wikitext-103", *argv, f"train.out_dir={tmp_path / 'run'}"], capsys)
    assert code == 2 and err.count("\n") == 1 and message.format(tmp=tmp_path) in err, err
    if not argv:
        assert "pass data_dir=DIR (qkvlab train task=wikitext-103 data_dir=DIR)" in err


def test_registry_and_data_list_show_it_as_user_supplied(tmp_path, capsys):
    source = SOURCES["wikitext-103"]
    assert source.origin == "user" and not source.fetchable
    with pytest.raises(QkvlabError, match="'wikitext-103' cannot be fetched.*wikitext-103/wiki"):
        resolve(["wikitext-103"])
    assert main(["data", "list", "--data-dir", str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("wikitext-103 "))
    assert " no " in row and "supply: wikitext-103/wiki.{train,valid,test}.tokens" in row
    write_wikitext(tmp_path)
    assert main(["data", "list", "--data-dir", str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("wikitext-103 "))
    assert " yes " in row

    task = get_task("wikitext-103")  # no files anywhere: the standard vocabulary, nothing read
    assert task.vocab_size == STANDARD_VOCAB and task.model_config("QKV", "quick").vocab_size == 267_776
    assert get_task("wikitext-103", data_dir=str(tmp_path)).vocab_size == len(
        json.loads((wikitext_tokens(tmp_path) / "vocab.json").read_text()))
    assert get_task("wikitext-103-bpe").vocab_size == 50257 and data_for(["wikitext-103-bpe"]) == ["gpt2"]


def test_bpe_task_names_the_fetch_command_without_gpt2(tmp_path):
    write_wikitext(tmp_path / "user")
    with pytest.raises(QkvlabError, match=r"wikitext-103-bpe.*GPT-2.*qkvlab data fetch gpt2"):
        get_task("wikitext-103-bpe", data_dir=str(tmp_path / "user")).train_batch(0, 2, 0)


WORDS = st.sampled_from(["the", "game", "=", "@-@", "<unk>", "Valkyria", "é", "3"])
LINES = st.lists(st.lists(WORDS, max_size=6).map(lambda ws: " " + " ".join(ws) + " " if ws else " "),
                 min_size=1, max_size=8)


@settings(max_examples=20, deadline=None)
@given(train=LINES, valid=LINES, test=LINES)
def test_any_corpus_converts_to_words_plus_lines(train, valid, test):
    splits = {"train": [*train, " x "], "valid": [*valid, " y "], "test": [*test, " the "]}
    with tempfile.TemporaryDirectory() as tmp:
        write_wikitext(Path(tmp) / "user", splits)
        out = wikitext_tokens(Path(tmp) / "user", cache=Path(tmp) / "cache")
        vocab = json.loads((out / "vocab.json").read_text())
        train_words = {w for line in splits["train"] for w in line.split()}
        assert set(vocab) == train_words | {EOS, UNK}
        for split, stem in STEMS.items():
            lines = splits[stem]
            ids = split_ids(out, split)
            assert [vocab[i] for i in ids] == [w if w in train_words | {EOS} else UNK
                                               for line in lines for w in (*line.split(), EOS)]
