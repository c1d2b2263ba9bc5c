"""Saved models record their tokenizer: train -> checkpoint -> convert -> export -> generate need no
--tokenizer, a different one is refused in one line, GPT-2-vocabulary models generate text."""

import json

import pytest
import torch

from qkvlab.cli.main import main
from qkvlab.data.tokenizer import (
    TOKENIZER_KEY,
    TextTokenizer,
    VocabTokenizer,
    load_tokenizer,
    same_tokenizer,
    tokenizer_files,
    tokenizer_from_record,
    train_bpe,
)
from qkvlab.errors import QkvlabError
from qkvlab.models import ModelConfig, build_model
from qkvlab.models.io import load_model, save_model
from qkvlab.models.tokenizer import model_tokenizer, recorded_tokenizer
from qkvlab.weights import read_metadata

CHARS = list(" abcdefghijklmnopqrstuvwxyz.,:\n")


def _tokenizers():
    bpe = TextTokenizer("tiny-bpe", train_bpe(["the cat sat on the mat"] * 20 + ["a dog"] * 5, 300))
    return [VocabTokenizer("chars", CHARS, False), VocabTokenizer("words", ["<unk>", "the", "cat"], True, eot=0,
                                                                  unknown="<unk>"),
            bpe, TextTokenizer("bytes")]


def _model(vocab: int, variant: str = "Q-K=V"):
    torch.manual_seed(0)
    return build_model(ModelConfig(kind="decoder", variant=variant, n_layers=1, d_model=16, n_heads=2,
                                   max_seq_len=32, vocab_size=vocab)).eval()


@pytest.mark.parametrize("tok", _tokenizers(), ids=lambda t: t.name)
def test_a_record_rebuilds_the_same_tokenizer(tok, tmp_path):
    record, files = tokenizer_files(tok)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    again = tokenizer_from_record(json.loads(json.dumps(record)), tmp_path)
    text = "the cat sat, a dog." if tok.name != "words" else "the cat dog"
    assert again.encode(text) == tok.encode(text) and again.vocab_size == tok.vocab_size
    assert again.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert same_tokenizer(again, tok) and again.name == tok.name


def test_save_model_records_the_tokenizer_beside_the_weights(tmp_path):
    tok = _tokenizers()[0]
    save_model(_model(32), tmp_path / "m", tok)
    record = json.loads(read_metadata(tmp_path / "m" / "model.safetensors")[TOKENIZER_KEY])
    assert record["name"] == "chars" and record["kind"] == "chars" and record["vocab_size"] == len(CHARS)
    assert "vocab.json" in json.loads((tmp_path / "m" / "manifest.json").read_text())["files"]
    assert same_tokenizer(recorded_tokenizer(tmp_path / "m"), tok)
    save_model(_model(32), tmp_path / "none")
    assert recorded_tokenizer(tmp_path / "none") is None


def test_a_different_tokenizer_is_refused_and_an_altered_file_named(tmp_path):
    save_model(_model(300), tmp_path / "m", _tokenizers()[0])
    with pytest.raises(QkvlabError, match=r"--tokenizer bytes \(256 tokens\) is not the tokenizer .* chars \(31 tok"):
        model_tokenizer(tmp_path / "m", "bytes")
    (tmp_path / "m" / "vocab.json").write_text(json.dumps(CHARS[::-1]))
    with pytest.raises(QkvlabError, match="vocab.json"):
        recorded_tokenizer(tmp_path / "m")
    with pytest.raises(QkvlabError, match="vocab.json"):
        load_model(tmp_path / "m")  # the manifest lists it too


def test_convert_carries_the_tokenizer(tmp_path, capsys):
    save_model(_model(32, "QKV"), tmp_path / "src", _tokenizers()[0])
    assert main(["convert", str(tmp_path / "src"), "--variant", "Q-K=V", "--out", str(tmp_path / "kv")]) == 0
    assert "tokenizer chars" in capsys.readouterr().out
    assert same_tokenizer(recorded_tokenizer(tmp_path / "kv"), _tokenizers()[0])


def test_convert_lsq_needs_calibration_text(tmp_path, capsys):
    save_model(_model(32, "QKV"), tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), "--variant", "Q-K=V", "--merge", "lsq",
                 "--out", str(tmp_path / "kv")]) == 2
    err = capsys.readouterr().err
    assert "--calibration TASK" in err and err.count("\n") == 1 and not (tmp_path / "kv").exists()


def test_generate_reads_the_recorded_tokenizer_and_refuses_another(tmp_path, capsys):
    save_model(_model(32), tmp_path / "m", _tokenizers()[0])
    argv = ["generate", str(tmp_path / "m"), "--prompt", "the cat", "--max-new-tokens", "6", "--seed", "0", "--json"]
    assert main(argv) == 0
    completion = json.loads(capsys.readouterr().out)["outputs"][0]["completion"]
    assert len(completion) == 6 and set(completion) <= set(CHARS)
    assert main(argv + ["--tokenizer", "bytes"]) == 2
    err = capsys.readouterr().err
    assert "is not the tokenizer" in err and err.count("\n") == 1


@pytest.mark.slow
def test_tokenizer_carried_through_train_export_generate(tmp_path, fetched, capsys):
    """A tiny shakespeare-char run records its characters; export and generate need no --tokenizer."""
    fetched("shakespeare")
    run = tmp_path / "run"
    assert main(["train", "task=shakespeare-char", "preset=tiny", "variant=Q-K=V", "train.steps=3",
                 f"train.out_dir={run}", "train.progress=false"]) == 0
    tok = recorded_tokenizer(run)
    assert tok is not None and tok.name == "shakespeare" and tok.vocab_size == 84
    assert same_tokenizer(tok, load_tokenizer("shakespeare"))
    assert main(["convert", str(run), "--variant", "Q-GQA-2", "--merge", "lsq", "--calibration", "shakespeare-char",
                 "--out", str(tmp_path / "qgqa")]) == 0
    assert same_tokenizer(recorded_tokenizer(tmp_path / "qgqa"), tok)
    pytest.importorskip("transformers")
    assert main(["export", str(tmp_path / "qgqa"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "tokenizer shakespeare" in capsys.readouterr().out
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    for model in (run, tmp_path / "qgqa"):
        assert main(["generate", str(model), "--prompt", "ROMEO:", "--max-new-tokens", "12", "--seed", "0",
                     "--json"]) == 0
        row = json.loads(capsys.readouterr().out)["outputs"][0]
        assert len(row["tokens"]) == 12 and max(row["tokens"]) < 84 and len(row["completion"]) == 12
    assert main(["export", str(run), "--format", "hf", "--tokenizer", "bytes", "--out", str(tmp_path / "x")]) == 2
    assert "is not the tokenizer" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_init_from_a_model_with_another_tokenizer_is_refused(tmp_path, fetched, capsys):
    fetched("shakespeare")
    other = VocabTokenizer("other", [chr(0x4E00 + i) for i in range(84)], False)
    save_model(_model(128, "QKV"), tmp_path / "m", other)
    code = main(["train", "task=shakespeare-char", "preset=tiny", f"init_from={tmp_path / 'm'}", "train.steps=1",
                 f"train.out_dir={tmp_path / 'run'}", "train.progress=false", "model.n_layers=1", "model.d_model=16",
                 "model.n_heads=2"])
    err = capsys.readouterr().err
    assert code == 2 and "was trained with tokenizer other (84 tokens)" in err and err.count("\n") == 1


@pytest.mark.parametrize("temperature", ["0", "1.5"])
def test_a_gpt2_vocabulary_model_generates_text(tmp_path, fetched, capsys, temperature):
    """GPT-2's 50,257 tokens in an embedding padded to 50,304: the padding is never sampled, text decodes."""
    fetched("gpt2")
    save_model(_model(50304), tmp_path / "g", load_tokenizer("gpt2"))
    assert main(["generate", str(tmp_path / "g"), "--prompt", "Hello, world", "--prompt", "Once upon a time",
                 "--max-new-tokens", "16", "--temperature", temperature, "--seed", "0", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["outputs"]
    assert all(len(r["tokens"]) == 16 and max(r["tokens"]) < 50257 and isinstance(r["completion"], str)
               for r in rows)
    assert main(["generate", str(tmp_path / "g"), "--prompt", "Hi", "--max-new-tokens", "4", "--seed", "1"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("Hi") and "Traceback" not in out.err


def test_a_tokenized_directory_knows_its_tokenizer(tmp_path):
    from qkvlab.data.tokenize import tokenize_files
    from qkvlab.data.tokenizer import token_dir_tokenizer

    bpe = _tokenizers()[2]
    (tmp_path / "a.txt").write_text("the cat sat on the mat\n" * 50)
    tokenize_files([tmp_path / "a.txt"], bpe, tmp_path / "tokens", val_every=1)
    tok = token_dir_tokenizer(tmp_path / "tokens")
    assert tok is not None and same_tokenizer(tok, bpe) and tok.encode("the mat") == bpe.encode("the mat")


@pytest.mark.slow  # imports transformers (~5 s)
def test_eval_takes_the_recorded_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    from qkvlab.cli.eval import load_model_and_tokenizer

    save_model(_model(32), tmp_path / "m", _tokenizers()[0])
    _, tokenizer = load_model_and_tokenizer(str(tmp_path / "m"), None, "cpu")
    assert tokenizer("the cat")["input_ids"] == _tokenizers()[0].encode("the cat")
    with pytest.raises(QkvlabError, match="is not the tokenizer"):
        load_model_and_tokenizer(str(tmp_path / "m"), "bytes", "cpu")
