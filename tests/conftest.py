"""Shared pytest fixtures."""

import gzip
import importlib.util
import json
import os
from pathlib import Path

import pytest


def pytest_configure(config):
    """The fast suite runs at one thread per process (unless OMP_NUM_THREADS says otherwise): its models are
    tiny, and several tests start subprocesses (the CLI, torchrun with two ranks) that would otherwise each
    take every core and oversubscribe the machine. The slow full-size checks (-m slow) keep torch's default."""
    if "not slow" in (config.option.markexpr or "") and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by subprocesses
        import torch

        torch.set_num_threads(1)


def openai_bpe_path():
    """OpenAI's CLIP BPE file shipped inside the open_clip package (found without importing it), or None."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    return path if path.is_file() else None


def write_clip_vocab_dir(bpe_gz, out_dir):
    """Write a diffusers-style tokenizer folder (vocab.json + merges.txt) from OpenAI's BPE file.

    Follows OpenAI's recipe (clip/simple_tokenizer.py) independently of models/tokenizer.py:
    256 byte symbols, the same with '</w>', one entry per merge, then the two special tokens.
    """
    visible = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    n_hidden = 256 - len(visible)
    symbols = [chr(b) for b in sorted(visible)] + [chr(256 + i) for i in range(n_hidden)]
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out_dir


@pytest.fixture(scope="session")
def clip_vocab_dir(tmp_path_factory):
    """A diffusers-style CLIP tokenizer folder built from the real OpenAI vocabulary (read-only please)."""
    bpe = openai_bpe_path()
    if bpe is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("the real CLIP vocabulary is unavailable: open_clip/bpe_simple_vocab_16e6.txt.gz not "
                    "found (pip install --no-deps open_clip_torch)")
    return write_clip_vocab_dir(bpe, tmp_path_factory.mktemp("clip_tokenizer"))


# --- a BERT uncased WordPiece vocabulary (LDM's tokenizer), made here: the hub is out of reach --------------

CAPTIONS = ["a painting of a squirrel eating a burger", "a photo of a cat on a chair", "a lion", "a dog and a deer",
            "a snowy mountain at night", "a house in winter", "a bicycle and a car", "a castle, drawing", "pink bear"]


def write_bert_vocab(out_dir, size=3000):
    """A diffusers-style BERT tokenizer folder (vocab.txt): special tokens where bert-base-uncased has them
    ([PAD] 0, [unused0..98] 1-99, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, more [unused] up to 998),
    then a WordPiece vocabulary trained with `tokenizers` on the Python documentation and a few captions
    (so that common caption words are one token and rare ones, like 'tyrannosaurus', several)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import WordPiece

    tok = Tokenizer(WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    lines = [line for text in topics.values() for line in text.split("\n")] + CAPTIONS * 200
    tok.train_from_iterator(lines, trainers.WordPieceTrainer(vocab_size=size, show_progress=False))
    learned = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    special = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    special += [f"[unused{i}]" for i in range(99, 994)]
    vocab = special + [t for t in learned + ["猫", "椅"] if t not in special]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    return out_dir


@pytest.fixture(scope="session")
def bert_vocab_dir(tmp_path_factory):
    """A diffusers-style BERT tokenizer folder (vocab.txt) with bert-base-uncased's special ids (read-only please)."""
    return write_bert_vocab(tmp_path_factory.mktemp("bert_tokenizer"))
