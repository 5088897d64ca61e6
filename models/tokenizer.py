"""
CLIP byte-level BPE tokenizer with the Stable Diffusion v1 conventions.

Built on the Hugging Face `tokenizers` library, with the same pipeline that
transformers uses for its (fast) CLIPTokenizer:
  normalise:      NFC, collapse runs of whitespace to one space, lowercase
                  (OpenAI's original also runs ftfy and html.unescape; we don't)
  pre-tokenise:   CLIP's regex (contractions, letter runs, single digits,
                  punctuation runs), then the GPT-2 byte -> unicode mapping
  BPE:            OpenAI's 48894 merges, words end with the suffix "</w>"
An encoded prompt is [bos] + ids[:75] + [eos], padded to 77 with eos (SD v1 pads
with <|endoftext|>, not with 0).

For Prompt-to-Prompt we also need to know which of the 77 positions belong to
which word of the prompt. A "word" is a whitespace-separated chunk of the prompt;
tokens are assigned to words with the character offsets `tokenizers` reports.
That part, and the 77-long id rows, are shared with LDM's WordPiece tokenizer
(models/wordpiece.py) through `PromptTokenizer`, so the edit engine works on both.
"""

import gzip
import json
import re
import unicodedata
import warnings
from bisect import bisect_right
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .errors import MissingFileError, UserError

BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = 49406, 49407
MAX_LENGTH = 77  # bos + 75 content tokens + eos
CLIP_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
                r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
N_MERGES = 49152 - 256 - 2  # merges OpenAI reads from bpe_simple_vocab_16e6.txt.gz
EXPECTED_FORMS = ("expected one of: (a) a diffusers-style tokenizer folder with vocab.json and "
                  "merges.txt, (b) a folder holding tokenizer.json, or a tokenizer.json file, "
                  "(c) OpenAI's bpe_simple_vocab_16e6.txt.gz")


def folder_contents(path: Path) -> str:
    """What a folder holds, for error messages: 'a folder holding a, b, ...' or 'an empty folder'."""
    names = sorted(p.name for p in path.iterdir())
    return f"a folder holding {', '.join(names[:10])}{', ...' if len(names) > 10 else ''}" if names else "an empty folder"


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the text encoder takes; the end was dropped."""


def bytes_to_unicode():
    """OpenAI/GPT-2 table byte -> printable unicode char, in the order the vocab uses."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b], n = chr(256 + n), n + 1
    return table  # insertion order: the printable bytes first, then the others


# ----------------------------------------------------------------------------- loading

def _read_text(path, opener=open):
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except (OSError, EOFError, UnicodeDecodeError) as e:  # EOFError: truncated .gz
        raise UserError(f"cannot read {path}: {e} (corrupt or truncated file?)") from e


def _read_json(path):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); is the file truncated or corrupt?") from None


def _parse_merges(lines, source):
    merges = []
    for i, line in enumerate(lines):
        pair = line.split() if isinstance(line, str) else list(line)
        if len(pair) != 2:
            raise UserError(f"{source}: merge #{i + 1} is {line!r}, expected two symbols")
        merges.append(tuple(pair))
    return merges


def _load_folder(folder):
    vocab = _read_json(folder / "vocab.json")
    lines = _read_text(folder / "merges.txt").split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return vocab, _parse_merges([l for l in lines if l.strip()], folder / "merges.txt")


def _load_tokenizer_json(path):
    model = _read_json(path).get("model") or {}
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
        raise UserError(f"{path} is not a CLIP tokenizer (needs a BPE model with end-of-word suffix "
                        f"'</w>', found type={model.get('type')!r}, suffix={model.get('end_of_word_suffix')!r})")
    return dict(model["vocab"]), _parse_merges(model["merges"], path)


def _load_openai_bpe(path):
    lines = _read_text(path, gzip.open).split("\n")[1:N_MERGES + 1]  # line 0 is a header
    merges = _parse_merges(lines, path)
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


def _check(vocab, merges, source):
    """Catch truncated or mismatched vocab/merges before `tokenizers` silently mis-tokenises."""
    missing = [t for t in (BOS_TOKEN, EOS_TOKEN) if t not in vocab]
    if missing:
        raise UserError(f"{source}: the vocabulary lacks {', '.join(missing)}; not a CLIP vocabulary?")
    if len(merges) != len(vocab) - 2 * 256 - 2:
        raise UserError(f"{source}: {len(merges)} merges for {len(vocab)} vocabulary entries "
                        f"(CLIP has {len(vocab) - 514}); is one of the files truncated?")
    bad = next((m for m in merges if m[0] not in vocab or m[1] not in vocab or m[0] + m[1] not in vocab), None)
    if bad is not None:
        raise UserError(f"{source}: merge {' '.join(bad)!r} uses symbols missing from the vocabulary")


# ----------------------------------------------------------------------------- words

def _core(text):
    """(start, end) of `text` without its leading/trailing punctuation."""
    keep = [i for i, c in enumerate(text) if c.isalnum() or unicodedata.category(c).startswith("M")]
    return (keep[0], keep[-1] + 1) if keep else (0, 0)


def _key(text):
    return unicodedata.normalize("NFC", text).lower()


class PromptTokenizer:
    """What the Prompt-to-Prompt engine needs of a tokenizer: (B, 77) id rows [start] + content[:75] + [end]
    + padding, and which of the 77 positions belong to which word of a prompt.

    A subclass sets `_tok` (a `tokenizers.Tokenizer` whose offsets refer to the prompt's characters),
    `bos_id`, `eos_id`, `pad_id`, and implements `tokens`, `decode` and `_key` (the normalisation under
    which a typed word equals a prompt word).
    """

    _tok: Tokenizer
    source: str  # where it was loaded from, for messages
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def _key(self, text: str) -> str:
        return _key(text)

    # ------------------------------------------------------------------------- ids

    def _encode(self, prompts):
        return self._tok.encode_batch(prompts, add_special_tokens=False)

    def encode(self, prompts: str | list[str]) -> torch.LongTensor:
        """(B, 77) ids: bos, at most 75 content tokens, eos, then padding (SD v1: eos; LDM: [PAD] = 0).
        Warns on truncation."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a str or a list of str, got {prompts!r}")
        ids = torch.full((len(prompts), MAX_LENGTH), self.pad_id, dtype=torch.long)
        ids[:, 0] = self.bos_id
        for row, (prompt, enc) in enumerate(zip(prompts, self._encode(list(prompts)))):
            content = enc.ids[:MAX_LENGTH - 2]
            ids[row, 1:1 + len(content)] = torch.tensor(content, dtype=torch.long)
            ids[row, 1 + len(content)] = self.eos_id
            if len(enc.ids) > len(content):
                self._warn_truncated(prompt, enc)
        return ids

    __call__ = encode

    def count(self, prompt: str) -> int:
        """Length of the prompt's token sequence with bos and eos, before any truncation (fits if <= 77)."""
        return len(self._encode([prompt])[0].ids) + 2

    def _warn_truncated(self, prompt, enc):
        dropped, cut = [], None
        for word in self._words(prompt, enc):
            kept = len(word.positions())
            if kept == 0 and word.tokens:
                dropped.append(word.text)
            elif kept < len(word.tokens):
                cut = word.text
        what = " and ".join(([repr(" ".join(dropped))] if dropped else []) + ([f"the end of {cut!r}"] if cut else []))
        short = prompt if len(prompt) <= 40 else prompt[:37] + "..."
        warnings.warn(f"prompt {short!r} is {len(enc.ids) + 2} tokens, more than the {MAX_LENGTH} the text "
                      f"encoder takes; dropped: {what}", PromptTruncatedWarning, stacklevel=3)

    # ------------------------------------------------------------------------- words

    def _words(self, prompt, enc=None):
        """The prompt's words (`_Word`s), each holding its tokens."""
        enc = self._encode([prompt])[0] if enc is None else enc
        chunks = [(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+", prompt)]
        if not chunks:
            return []
        owned = [[] for _ in chunks]
        starts = [start for _, start, _ in chunks]
        for i, (token_start, _) in enumerate(enc.offsets):
            # a token between words (e.g. from '\x1c', whitespace to Python but not to the regex) joins the word before
            owned[max(bisect_right(starts, token_start) - 1, 0)].append((i + 1, token_start))
        return [_Word(word, start, own, self._key) for (word, start, _), own in zip(chunks, owned)]

    def word_spans(self, prompt: str) -> list[tuple[str, list[int]]]:
        """For each whitespace-separated word, its token positions in the 77-long sequence (bos is 0)."""
        return [(w.text, w.positions()) for w in self._words(prompt)]

    def word_token_indices(self, prompt: str, word: str | int) -> list[int]:
        """Positions of every occurrence of `word` (case-insensitive; a phrase of consecutive words
        is fine), or of the word at index `word` of prompt.split(). Surrounding punctuation of a
        prompt word is left out unless `word` spells it too."""
        words = self._words(prompt)
        listing = f"(its words: {', '.join(w.text for w in words)})" if words else "(it has no words)"
        if isinstance(word, int) and not isinstance(word, bool):
            if not -len(words) <= word < len(words):
                raise UserError(f"word index {word} is out of range for the prompt {prompt!r}, which has "
                                f"{len(words)} words {listing}")
            found, label = [words[word].positions(core=True)], f"word {word} ({words[word].text!r})"
        else:
            parts, label = [self._key(p) for p in str(word).split()], repr(word)
            if not parts:
                raise UserError(f"empty word {word!r}; give a word of the prompt {prompt!r} {listing}")
            found = []
            for i in range(len(words) - len(parts) + 1):
                match = [words[i + j].match(part) for j, part in enumerate(parts)]
                if all(m is not None for m in match):
                    found.append(sorted(p for m in match for p in m))
            if not found:
                raise UserError(f"{word!r} is not a word of the prompt {prompt!r} {listing}")
        positions = sorted({p for occurrence in found for p in occurrence})
        if not positions:
            raise UserError(f"{label} is in the prompt {prompt!r} but only after the first "
                            f"{MAX_LENGTH - 2} tokens, which is all the text encoder takes")
        return positions


class CLIPTokenizer(PromptTokenizer):
    """CLIP BPE tokenizer producing (B, 77) id tensors for the SD v1 text encoder."""

    pad_token = EOS_TOKEN  # SD v1 pads with <|endoftext|>

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], source: str = "<memory>"):
        _check(vocab, merges, source)
        self.source, self.vocab_size = str(source), len(vocab)
        self.bos_id, self.eos_id = vocab[BOS_TOKEN], vocab[EOS_TOKEN]
        if self.pad_token not in vocab:
            raise UserError(f"{source}: the vocabulary lacks the padding token {self.pad_token!r}")
        self.pad_id = vocab[self.pad_token]
        try:
            bpe = BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                      fuse_unk=False, unk_token=EOS_TOKEN, dropout=None)
        except Exception as e:
            raise UserError(f"{source}: `tokenizers` rejected the vocabulary/merges: {e}") from e
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),  # keep matches
            # use_regex=True re-splits only the pieces "<|startoftext|>"/"<|endoftext|>" (as transformers does)
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        # typed "<|endoftext|>" maps to its id, as in OpenAI's and transformers' tokenizers
        tok.add_special_tokens([AddedToken(t, special=True) for t in (BOS_TOKEN, EOS_TOKEN)])
        self._tok = tok
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}

    @classmethod
    def from_path(cls, path) -> "CLIPTokenizer":
        """Load from a diffusers tokenizer/ folder, a tokenizer.json (or its folder), or OpenAI's .txt.gz."""
        path = Path(path)
        if path.is_file() and path.name in ("vocab.json", "merges.txt"):
            path = path.parent
        if path.is_dir():
            if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
                return cls(*_load_folder(path), source=path)
            if (path / "tokenizer.json").is_file():
                return cls.from_path(path / "tokenizer.json")
            if (path / "tokenizer").is_dir():  # a whole diffusers pipeline folder
                return cls.from_path(path / "tokenizer")
            found = folder_contents(path)
            raise UserError(f"cannot load a CLIP tokenizer from {path}: found {found}; {EXPECTED_FORMS}")
        if path.is_file() and path.suffix == ".json":
            return cls(*_load_tokenizer_json(path), source=path)
        if path.is_file() and path.suffix == ".gz":
            return cls(*_load_openai_bpe(path), source=path)
        if not path.exists():
            raise MissingFileError(f"cannot load a CLIP tokenizer from {path}: found nothing (no such file "
                                   f"or folder); {EXPECTED_FORMS}")
        raise UserError(f"cannot load a CLIP tokenizer from {path}: found a file named {path.name!r}; "
                        f"{EXPECTED_FORMS}")

    def tokens(self, prompt: str) -> list[str]:
        """Readable strings of the content tokens that fit (tokens(p)[i] sits at position i + 1)."""
        enc = self._encode([prompt])[0]
        # a token holding part of a multi-byte character (emoji, CJK) shows its bytes, e.g. '\\xf0\\x9f'
        return [self._to_text(t.removesuffix("</w>"), "backslashreplace") for t in enc.tokens[:MAX_LENGTH - 2]]

    def _to_text(self, symbols, errors="replace"):
        if symbols in (BOS_TOKEN, EOS_TOKEN):
            return symbols
        return bytes(self._byte_decoder[c] for c in symbols).decode("utf-8", errors=errors)

    def decode(self, ids) -> str | list[str]:
        """Text of a 1-D id sequence (bos/eos/padding skipped); a list of texts for a 2-D batch."""
        ids = torch.as_tensor(ids)
        if ids.dim() == 2:
            return [self.decode(row) for row in ids]
        symbols = []
        for i in ids.tolist():
            if i in (self.bos_id, self.eos_id):
                continue
            token = self._tok.id_to_token(i)
            if token is None:
                raise ValueError(f"id {i} is not in the vocabulary (size {self.vocab_size})")
            symbols.append(token)
        return self._to_text("".join(symbols)).replace("</w>", " ").strip()


class OpenCLIPTokenizer(CLIPTokenizer):
    """The same BPE with SD 2.x's padding: id 0 ("!") after eos, as open_clip's `tokenize` fills the 77 slots
    with zeros (the model was trained so; diffusers' tokenizer says pad_token "!"). A "!" typed in a prompt
    stays the token "!</w>" (256), as open_clip encodes it; transformers' tokenizer maps it to the pad id 0
    (diffusers issue #4153), so for prompts with "!" diffusers' SD 2 pipeline sees other ids than training did."""

    pad_token = "!"


class _Word:
    """A whitespace-separated chunk of a prompt and its (position, char offset) tokens."""

    def __init__(self, text, start, tokens, key=_key):
        self.text, self.start, self.tokens, self.key = text, start, tokens, key

    def positions(self, core=False):
        """Positions of the word's tokens that fit in the sequence; `core`: without the punctuation."""
        lo, hi = _core(self.text)
        fits = [(p, s - self.start) for p, s in self.tokens if p < MAX_LENGTH - 1]
        if not core or lo == hi:  # all punctuation: the core is the whole chunk
            return [p for p, _ in fits]
        return [p for p, s in fits if lo <= s < hi]

    def match(self, key):
        """Positions if `key` is this word, or this word without its surrounding punctuation; else None."""
        if self.key(self.text) == key:
            return self.positions()
        lo, hi = _core(self.text)
        return self.positions(core=True) if hi > lo and self.key(self.text[lo:hi]) == key else None
