"""
BERT uncased WordPiece tokenizer with the LDM text2img conventions (the tokenizer of LDMBert).

LDM-KL-8-G tokenizes with `bert-base-uncased` (CompVis `BERTEmbedder`; diffusers' `tokenizer/` folder
holds its vocab.txt). Built on the Hugging Face `tokenizers` library, with the pipeline transformers
uses for its BertTokenizer:
  normalise:      drop control characters, turn every whitespace into a space, put spaces around
                  CJK ideographs, lowercase, strip accents (NFD, then drop combining marks)
  pre-tokenise:   split on whitespace and on every punctuation character (each one its own token)
  WordPiece:      greedy longest match; continuation pieces are spelt "##x"; a word that cannot be
                  spelt (or is longer than 100 characters) is one [UNK]
An encoded prompt is [CLS] + ids[:75] + [SEP], padded to 77 with [PAD] = 0 (bert-base-uncased:
[CLS] = 101, [SEP] = 102, [UNK] = 100), as LDMTextToImagePipeline's
`tokenizer(prompt, padding="max_length", max_length=77, truncation=True)`.

Words, spans and truncation warnings are `PromptTokenizer`'s (models/tokenizer.py), so the edit
engine works unchanged: a "##" piece belongs to the word it continues, and a word's punctuation
tokens belong to it (and are left out of `word_token_indices` unless spelt out), as with CLIP.
"""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordPiece

from .errors import MissingFileError, UserError
from .tokenizer import MAX_LENGTH, PromptTokenizer, _read_json, _read_text, folder_contents

CLS, SEP, PAD, UNK, MASK = "[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"
PREFIX = "##"
EXPECTED_FORMS = ("expected one of: (a) a diffusers-style tokenizer folder with vocab.txt (as BertTokenizer "
                  "saves it), (b) a vocab.txt file, (c) a folder holding tokenizer.json, or a tokenizer.json file")


def _load_vocab_txt(path: Path) -> dict[str, int]:
    """One token per line, its id the line number (BERT's vocab.txt format)."""
    tokens = _read_text(path).split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    return {t: i for i, t in enumerate(tokens)}


def _load_tokenizer_json(path: Path) -> dict[str, int]:
    d = _read_json(path)
    model = d.get("model") or {}
    if model.get("type") != "WordPiece" or model.get("continuing_subword_prefix", PREFIX) != PREFIX:
        raise UserError(f"{path} is not a BERT WordPiece tokenizer (needs a WordPiece model with the '##' prefix, "
                        f"found type={model.get('type')!r})")
    norm = d.get("normalizer") or {}
    if norm.get("type") == "BertNormalizer" and norm.get("lowercase") is False:
        raise UserError(f"{path} is a cased BERT tokenizer; LDM's LDMBert was trained on bert-base-uncased tokens")
    return dict(model["vocab"])


def _check_config(folder: Path) -> None:
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file() and _read_json(cfg).get("do_lower_case") is False:
        raise UserError(f"{cfg} sets do_lower_case false (a cased BERT tokenizer); LDM's LDMBert was trained on "
                        "bert-base-uncased tokens")


def _strip_accents(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")


class BertTokenizer(PromptTokenizer):
    """bert-base-uncased WordPiece tokenizer producing (B, 77) id tensors for LDMBert."""

    def __init__(self, vocab: dict[str, int], source: str = "<memory>"):
        missing = [t for t in (CLS, SEP, PAD, UNK) if t not in vocab]
        if missing:
            raise UserError(f"{source}: the vocabulary lacks {', '.join(missing)}; not a BERT vocabulary (or truncated)?")
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise UserError(f"{source}: the vocabulary ids are not 0..{len(vocab) - 1} (duplicated tokens?)")
        self.source, self.vocab_size = str(source), len(vocab)
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = vocab[CLS], vocab[SEP], vocab[PAD], vocab[UNK]
        tok = Tokenizer(WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True,
                                                    lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix=PREFIX, cleanup=True)
        # typed special tokens ("[SEP]") map to their ids, as in transformers' BertTokenizer
        tok.add_special_tokens([AddedToken(t, special=True) for t in (PAD, UNK, CLS, SEP, MASK) if t in vocab])
        self._tok = tok

    @classmethod
    def from_path(cls, path) -> "BertTokenizer":
        """Load from a diffusers tokenizer/ folder (vocab.txt), a vocab.txt, or a tokenizer.json (or its folder)."""
        path = Path(path)
        if path.is_dir():
            if (path / "vocab.txt").is_file():
                _check_config(path)
                return cls(_load_vocab_txt(path / "vocab.txt"), source=path)
            if (path / "tokenizer.json").is_file():
                _check_config(path)
                return cls.from_path(path / "tokenizer.json")
            if (path / "tokenizer").is_dir():  # a whole diffusers pipeline folder
                return cls.from_path(path / "tokenizer")
            found = folder_contents(path)
            raise UserError(f"cannot load a BERT tokenizer from {path}: found {found}; {EXPECTED_FORMS}")
        if path.is_file() and path.suffix == ".txt":
            return cls(_load_vocab_txt(path), source=path)
        if path.is_file() and path.suffix == ".json":
            return cls(_load_tokenizer_json(path), source=path)
        if not path.exists():
            raise MissingFileError(f"cannot load a BERT tokenizer from {path}: found nothing (no such file or "
                                   f"folder); {EXPECTED_FORMS}")
        raise UserError(f"cannot load a BERT tokenizer from {path}: found a file named {path.name!r}; {EXPECTED_FORMS}")

    def save(self, folder) -> Path:
        """Write vocab.txt (and a tokenizer_config.json for transformers' BertTokenizer) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        vocab = sorted(self._tok.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1])
        (folder / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
        config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": MAX_LENGTH}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return folder

    def _key(self, text: str) -> str:
        return _strip_accents(text.lower())

    def tokens(self, prompt: str) -> list[str]:
        """The WordPiece strings of the content tokens that fit (tokens(p)[i] sits at position i + 1),
        e.g. ['a', 'ty', '##rann', '##osaurus']."""
        return self._encode([prompt])[0].tokens[:MAX_LENGTH - 2]

    def decode(self, ids) -> str | list[str]:
        """Text of a 1-D id sequence; a list of texts for a 2-D batch. Special tokens ([CLS], [SEP], [PAD],
        [UNK], [MASK]) are skipped, as transformers' `decode(..., skip_special_tokens=True)`."""
        ids = torch.as_tensor(ids)
        if ids.dim() == 2:
            return [self.decode(row) for row in ids]
        ids = ids.tolist()
        bad = next((i for i in ids if self._tok.id_to_token(i) is None), None)
        if bad is not None:
            raise ValueError(f"id {bad} is not in the vocabulary (size {self.vocab_size})")
        return self._tok.decode(ids, skip_special_tokens=True)
