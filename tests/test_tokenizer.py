"""Tests for models/tokenizer.py against transformers' CLIPTokenizer and a pure-Python OpenAI reference."""

import json
import shutil
import unicodedata
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from models.tokenizer import BOS_ID, EOS_ID, MAX_LENGTH, CLIPTokenizer, PromptTruncatedWarning
from tests.conftest import openai_bpe_path

PROMPTS = [
    "a photo of a cat", "Hello, world!", "A PHOTO of  a Cat!", "", "   ",
    "don't stop, it's fine; we'll see. They've said I'm here, you're there, he'd go",
    "the year 1984, pi is 3.14159 and 1,000,000 people",
    "café crème, naïve Ångström", "cafe\u0301 with a decomposed accent", "İstanbul at dusk",
    "a 🐱 on a 🪑", "👩‍👩‍👧 family 🏳️‍🌈", "一只猫坐在椅子上", "東京タワー at night", "고양이",
    "a  photo\tof\n a cat  ", "\n\n leading and trailing \t", "MiXeD CaSe WORDS",
    "punctuation!!! ... ?!? -- (brackets) [x] {y} \"quotes\" 'single'",
    "e-mail: someone@example.com #hashtag @user $100 50% a/b a_b",
    "x<|endoftext|>y", "a tyrannosaurus on a chair",
    "a photo of " + "a very " * 40 + "big cat",
    " ".join(f"word{i}" for i in range(100)),
]
GREEK = "ΟΔΟΣ"  # final sigma: Python's str.lower() gives 'ς', the tokenizers Lowercase normalizer gives 'σ'


# ----------------------------------------------------------------------------- references

class OpenAIReference:
    """OpenAI's simple_tokenizer.py re-typed (BPE in pure Python), minus ftfy/html.unescape."""

    def __init__(self, vocab_dir):
        import regex
        self.encoder = json.loads((vocab_dir / "vocab.json").read_text(encoding="utf-8"))
        merges = (vocab_dir / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
        self.ranks = {tuple(m.split()): i for i, m in enumerate(m for m in merges if m)}
        visible = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
        hidden = [b for b in range(256) if b not in visible]
        self.byte_encoder = {**{b: chr(b) for b in visible}, **{b: chr(256 + i) for i, b in enumerate(hidden)}}
        self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                                 r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

    def bpe(self, token):
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text):
        text = " ".join(unicodedata.normalize("NFC", text).split()).lower()  # ftfy.fix_text ~ NFC here
        ids = []
        for piece in self.pat.findall(text):
            if piece in ("<|startoftext|>", "<|endoftext|>"):
                ids.append(self.encoder[piece])
            else:
                ids += [self.encoder[s] for s in self.bpe("".join(self.byte_encoder[b] for b in piece.encode()))]
        ids = [BOS_ID] + ids[:MAX_LENGTH - 2] + [EOS_ID]
        return ids + [EOS_ID] * (MAX_LENGTH - len(ids))


@pytest.fixture(scope="module")
def tok(clip_vocab_dir):
    return CLIPTokenizer.from_path(clip_vocab_dir)


@pytest.fixture(scope="module")
def hf(clip_vocab_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(clip_vocab_dir))


@pytest.fixture(scope="module")
def openai_ref(clip_vocab_dir):
    pytest.importorskip("regex")
    return OpenAIReference(clip_vocab_dir)


def hf_ids(hf, prompts):
    out = hf(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    return out.input_ids


def encode_quietly(tok, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        return tok.encode(prompts)


# ----------------------------------------------------------------------------- ids

@pytest.mark.parametrize("prompt, expected", [
    ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
    ("Hello, world!", [49406, 3306, 267, 1002, 256, 49407]),
    ("A PHOTO of  a Cat!", [49406, 320, 1125, 539, 320, 2368, 256, 49407]),
])
def test_reference_ids(tok, prompt, expected):
    ids = tok.encode(prompt)
    assert ids.shape == (1, MAX_LENGTH) and ids.dtype == torch.long
    assert ids[0].tolist() == expected + [EOS_ID] * (MAX_LENGTH - len(expected))


def test_constants_and_vocab(tok):
    assert (BOS_ID, EOS_ID, MAX_LENGTH) == (49406, 49407, 77)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (BOS_ID, EOS_ID, 49408)


@pytest.mark.parametrize("prompt", PROMPTS + [GREEK, "<|ENDOFTEXT|> upper case"])
def test_ids_match_transformers(tok, hf, prompt):
    assert encode_quietly(tok, prompt)[0].tolist() == hf_ids(hf, [prompt])[0].tolist()


def test_batch_matches_transformers(tok, hf):
    assert torch.equal(encode_quietly(tok, PROMPTS), hf_ids(hf, PROMPTS))
    assert tok.encode([]).shape == (0, MAX_LENGTH)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_match_openai_reference(tok, openai_ref, prompt):
    assert encode_quietly(tok, prompt)[0].tolist() == openai_ref.encode(prompt)


def test_final_sigma_follows_transformers_not_python_lower(tok, hf, openai_ref):
    ours = tok.encode(GREEK)[0].tolist()
    assert ours == hf_ids(hf, [GREEK])[0].tolist()
    assert ours != openai_ref.encode(GREEK)  # a known, documented difference from OpenAI's str.lower()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=60))
def test_ids_match_transformers_on_random_text(tok, hf, prompt):
    assert encode_quietly(tok, prompt)[0].tolist() == hf_ids(hf, [prompt])[0].tolist()


def test_empty_prompt_and_padding(tok):
    assert tok.encode("")[0].tolist() == [BOS_ID] + [EOS_ID] * 76
    assert tok.encode(" \t\n ")[0].tolist() == [BOS_ID] + [EOS_ID] * 76
    ids = tok.encode(["a photo of a cat", "a"])
    assert (ids[0, 7:] == EOS_ID).all() and (ids[1, 3:] == EOS_ID).all() and ids[1, 1] == 320
    with pytest.raises(TypeError, match="str or a list of str"):
        tok.encode(None)


def test_decode_and_tokens(tok, hf):
    ids = tok.encode(["A photo of a Cat!", "don't"])
    assert tok.decode(ids[0]) == "a photo of a cat !"
    assert tok.decode(ids) == ["a photo of a cat !", "don 't"]
    assert tok.decode([320, 2368]) == "a cat"
    for prompt in PROMPTS:
        row = encode_quietly(tok, prompt)[0]
        assert tok.decode(row) == hf.decode(row.tolist(), skip_special_tokens=True), prompt
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.decode([10**6])
    assert tok.tokens("A tyrannosaurus, don't!") == ["a", "tyran", "no", "saurus", ",", "don", "'t", "!"]
    assert tok.tokens("a 🐱") == ["a", "🐱"]
    assert tok.tokens("a 🪑") == ["a", "\\xf0\\x9f", "\\xaa", "\\x91"]  # one emoji, three byte tokens
    assert len(tok.tokens(" ".join(["cat"] * 100))) == 75


# ----------------------------------------------------------------------------- construction

def test_construction_paths_agree(tok, hf, clip_vocab_dir, tmp_path):
    saved = tmp_path / "saved"
    hf.save_pretrained(str(saved))  # transformers 5 writes tokenizer.json (+ tokenizer_config.json)
    hf.backend_tokenizer.save(str(tmp_path / "written_by_tokenizers.json"))
    pipeline = tmp_path / "pipeline"
    shutil.copytree(clip_vocab_dir, pipeline / "tokenizer")
    expected = encode_quietly(tok, PROMPTS)
    for path in [saved, saved / "tokenizer.json", tmp_path / "written_by_tokenizers.json", openai_bpe_path(),
                 pipeline, clip_vocab_dir / "vocab.json"]:
        assert torch.equal(encode_quietly(CLIPTokenizer.from_path(path), PROMPTS), expected), path


def _expect_error(path, *fragments, error=ValueError):
    with pytest.raises(error) as info:
        CLIPTokenizer.from_path(path)
    for fragment in (str(path),) + fragments:
        assert fragment in str(info.value)


FORMS = ("vocab.json and merges.txt", "tokenizer.json", "bpe_simple_vocab_16e6.txt.gz")


def test_missing_path(tmp_path):
    _expect_error(tmp_path / "nope", "found nothing", *FORMS, error=FileNotFoundError)


def test_folder_with_only_vocab(tmp_path, clip_vocab_dir):
    shutil.copy(clip_vocab_dir / "vocab.json", tmp_path)
    _expect_error(tmp_path, "found a folder holding vocab.json", *FORMS)
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect_error(empty, "found an empty folder", *FORMS)
    (tmp_path / "weights.bin").write_bytes(b"\0")
    _expect_error(tmp_path / "weights.bin", "found a file named 'weights.bin'", *FORMS)


def test_truncated_files(tmp_path, clip_vocab_dir):
    vocab, merges = (clip_vocab_dir / "vocab.json").read_text(), (clip_vocab_dir / "merges.txt").read_text()
    (tmp_path / "vocab.json").write_text(vocab[: len(vocab) // 2])
    (tmp_path / "merges.txt").write_text(merges)
    _expect_error(tmp_path, str(tmp_path / "vocab.json"), "not valid JSON", "truncated")
    (tmp_path / "vocab.json").write_text(vocab)
    (tmp_path / "merges.txt").write_text(merges[: len(merges) // 2])
    _expect_error(tmp_path, "merges", "truncated")
    gz = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    gz.write_bytes(openai_bpe_path().read_bytes()[:100_000])
    _expect_error(gz, "truncated")


def test_non_clip_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    _expect_error(tmp_path / "tokenizer.json", "is not a CLIP tokenizer")


# ----------------------------------------------------------------------------- truncation

def test_truncation_warning_names_dropped_words(tok):
    prompt = "a " * 72 + "cat on a sunny day"  # 77 content tokens: 75 fit
    with pytest.warns(PromptTruncatedWarning, match=r"is 79 tokens, more than the 77 .* dropped: 'sunny day'$"):
        ids = tok.encode(prompt)
    assert ids[0, 73:].tolist() == [2368, 525, 320, EOS_ID]  # cat on a, then eos kept
    with pytest.warns(PromptTruncatedWarning, match=r"dropped: 'on a chair' and the end of 'tyrannosaurus'$"):
        tok.encode("a " * 73 + "tyrannosaurus on a chair")
    assert issubclass(PromptTruncatedWarning, UserWarning)


def test_no_warning_at_exactly_75_tokens(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tok.encode(["a " * 75, "short"])
    assert ids[0, 75] == 320 and ids[0, 76] == EOS_ID
    with pytest.warns(PromptTruncatedWarning) as record:
        tok.encode(["a " * 76, "short"])
    assert len(record) == 1 and "is 78 tokens" in str(record[0].message)


# ----------------------------------------------------------------------------- words

def test_word_spans_examples(tok):
    assert tok.word_spans("a cat on a chair") == [("a", [1]), ("cat", [2]), ("on", [3]), ("a", [4]), ("chair", [5])]
    assert tok.word_spans("a tyrannosaurus on a chair") == [
        ("a", [1]), ("tyrannosaurus", [2, 3, 4]), ("on", [5]), ("a", [6]), ("chair", [7])]
    assert tok.word_spans("Hello,  world!") == [("Hello,", [1, 2]), ("world!", [3, 4])]
    assert tok.word_spans("") == [] and tok.word_spans("  ") == []
    spans = tok.word_spans("a " * 73 + "tyrannosaurus on a chair")
    assert spans[73] == ("tyrannosaurus", [74, 75]) and spans[74:] == [("on", []), ("a", []), ("chair", [])]


def test_tyrannosaurus_is_three_tokens_in_transformers(hf):
    assert hf.tokenize("tyrannosaurus") == ["tyran", "no", "saurus</w>"]


def test_word_token_indices(tok):
    p = "a cat on a chair"
    assert tok.word_token_indices(p, "cat") == [2]
    assert tok.word_token_indices(p, "a") == [1, 4]  # every occurrence
    assert tok.word_token_indices(p, "CHAIR") == [5]
    assert tok.word_token_indices(p, 1) == [2] and tok.word_token_indices(p, -1) == [5]
    assert tok.word_token_indices("a tyrannosaurus on a chair", "tyrannosaurus") == [2, 3, 4]
    assert tok.word_token_indices("a tyrannosaurus on a chair", "chair") == [7]
    # surrounding punctuation: left out unless spelt out
    p = "a cat, a (red) dog."
    assert tok.word_token_indices(p, "cat") == [2]
    assert tok.word_token_indices(p, "cat,") == [2, 3]
    assert tok.word_token_indices(p, "red") == [6] and tok.word_token_indices(p, "(red)") == [5, 6, 7]
    assert tok.word_token_indices(p, 1) == [2] and tok.word_token_indices(p, 4) == [8]
    assert tok.word_token_indices("don't stop", "don't") == [1, 2]
    assert tok.word_token_indices("café crème", "CAFE\u0301") == [1]  # NFC + case-insensitive
    # phrases: consecutive words
    p = "a red car and a red car"
    assert tok.word_token_indices(p, "red car") == [2, 3, 6, 7]
    assert tok.word_token_indices(p, "car and a") == [3, 4, 5]
    assert tok.word_token_indices("a red, car", "red car") == [2, 4]
    # truncation: survivors only
    assert tok.word_token_indices("a " * 73 + "tyrannosaurus", "tyrannosaurus") == [74, 75]


def test_word_errors(tok):
    with pytest.raises(ValueError) as info:
        tok.word_token_indices("a cat on a mat", "dog")
    assert str(info.value) == "'dog' is not a word of the prompt 'a cat on a mat' (its words: a, cat, on, a, mat)"
    with pytest.raises(ValueError, match=r"'car red' is not a word of the prompt"):
        tok.word_token_indices("a red car", "car red")
    with pytest.raises(ValueError, match=r"word index 5 is out of range .* 5 words \(its words: a, cat, on, a, mat\)"):
        tok.word_token_indices("a cat on a mat", 5)
    with pytest.raises(ValueError, match="word index -6"):
        tok.word_token_indices("a cat on a mat", -6)
    with pytest.raises(ValueError, match="empty word"):
        tok.word_token_indices("a cat", " ")
    with pytest.raises(ValueError, match=r"'chair' is in the prompt .* only after the first 75 tokens"):
        tok.word_token_indices("a " * 80 + "chair", "chair")


WORDS = ["a", "cat", "Cat,", "tyrannosaurus", "don't", "it's", "1984", "3.14", "café", "naïve", "Ångström",
         "🐱", "🪑", "猫", "東京", "photo.", "(red)", "HELLO!", "we'll", "x-ray", "…", "'quoted'", "a@b.com"]


@st.composite
def word_prompts(draw):
    words = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=45))
    seps = draw(st.lists(st.sampled_from([" ", "  ", "\t", "\n", " \n "]), min_size=len(words) + 1,
                         max_size=len(words) + 1))
    return seps[0] + "".join(w + s for w, s in zip(words, seps[1:])), words


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(word_prompts())
def test_word_spans_partition_content_tokens(tok, prompt_and_words):
    prompt, words = prompt_and_words
    spans = tok.word_spans(prompt)
    assert [w for w, _ in spans] == words
    n = int((encode_quietly(tok, prompt)[0, 1:] != EOS_ID).sum())  # content tokens that fit
    assert [p for _, ps in spans for p in ps] == list(range(1, n + 1))
    last = max((i for i, (_, ps) in enumerate(spans) if ps), default=-1)
    for i, (word, ps) in enumerate(spans):
        if ps and (n < MAX_LENGTH - 2 or i < last):  # complete words (the last one may be cut)
            assert tok.decode(ps_ids(tok, prompt, ps)).replace(" ", "") == word.lower()


def ps_ids(tok, prompt, positions):
    return encode_quietly(tok, prompt)[0, positions]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=60))
def test_word_spans_partition_on_random_text(tok, prompt):
    spans = tok.word_spans(prompt)
    assert [w for w, _ in spans] == prompt.split()
    n = int((encode_quietly(tok, prompt)[0, 1:] != EOS_ID).sum())
    if spans and "<|endoftext|>" not in prompt:
        assert [p for _, ps in spans for p in ps] == list(range(1, n + 1))
