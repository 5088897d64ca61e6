"""LDM's BERT uncased WordPiece tokenizer (models/wordpiece.py) against transformers' BertTokenizer (on
`tokenizers`) and its pure-Python BertTokenizerLegacy (the original BERT algorithm), from the same vocab.txt;
and the word interface the edit engine uses, as for CLIP."""
import shutil
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from models.tokenizer import MAX_LENGTH, PromptTruncatedWarning
from models.wordpiece import BertTokenizer

CLS, SEP, PAD, UNK = 101, 102, 0, 100
PROMPTS = [
    "a photo of a cat", "Hello, world!", "A PHOTO of  a Cat!", "", "   ",
    "café crème, naïve Ångström", "cafe\u0301 with a decomposed accent", "İstanbul at dusk", "ΟΔΟΣ",
    "a tyrannosaurus on a chair", "don't stop, it's fine; we'll see", "the year 1984, pi is 3.14159",
    "punctuation!!! ... ?!? -- (brackets) [x] {y} \"quotes\" 'single'",
    "e-mail: someone@example.com #hashtag @user $100 50% a/b a_b",
    "a 🐱 on a 🪑", "一只猫坐在椅子上", "東京タワー at night", "고양이", "a\tphoto\nof\r\na cat\x00\x1c!",
    "x[SEP]y [MASK] [unused3] [cls]", "supercalifragilisticexpialidocious" * 4,  # > 100 chars: one [UNK]
    "a photo of " + "a very " * 40 + "big cat", " ".join(f"word{i}" for i in range(100)),
]


@pytest.fixture(scope="module")
def tok(bert_vocab_dir):
    return BertTokenizer.from_path(bert_vocab_dir)


@pytest.fixture(scope="module")
def hf(bert_vocab_dir):
    from transformers import BertTokenizer as RefBertTokenizer
    return RefBertTokenizer.from_pretrained(str(bert_vocab_dir))


@pytest.fixture(scope="module")
def legacy(bert_vocab_dir):
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
    return BertTokenizerLegacy(str(bert_vocab_dir / "vocab.txt"))


def ref_ids(ref, prompts):
    """LDMTextToImagePipeline's call: padding="max_length", max_length=77, truncation=True."""
    return torch.tensor(ref(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True)["input_ids"])


def quietly(tok, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        return tok.encode(prompts)


def test_layout_and_special_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (CLS, SEP, PAD, UNK)
    ids = tok.encode(["a cat", ""])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    cat = tok._tok.token_to_id("cat")
    assert ids[0, :4].tolist() == [CLS, tok._tok.token_to_id("a"), cat, SEP] and (ids[0, 4:] == PAD).all()
    assert ids[1].tolist() == [CLS, SEP] + [PAD] * 75  # the unconditional prompt ""


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_match_transformers_and_the_original_algorithm(tok, hf, legacy, prompt):
    ours = quietly(tok, prompt)[0].tolist()
    assert ours == ref_ids(hf, [prompt])[0].tolist()
    assert ours == ref_ids(legacy, [prompt])[0].tolist()


def test_batch_matches_transformers(tok, hf):
    assert torch.equal(quietly(tok, PROMPTS), ref_ids(hf, PROMPTS))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=60))
def test_ids_match_transformers_on_random_text(tok, hf, prompt):
    assert quietly(tok, prompt)[0].tolist() == ref_ids(hf, [prompt])[0].tolist()


def test_tokens_and_decode(tok, hf):
    assert tok.tokens("Hello, world!")[:2] == ["hello", ","]
    pieces = tok.tokens("a tyrannosaurus")
    assert len(pieces) > 2 and all(p.startswith("##") for p in pieces[2:])  # continuation pieces
    assert pieces == hf.tokenize("a tyrannosaurus")
    for prompt in PROMPTS:
        row = quietly(tok, prompt)[0]
        assert tok.decode(row) == hf.decode(row.tolist(), skip_special_tokens=True), prompt
    assert tok.decode(tok.encode(["Café au lait!", "a cat"])) == ["cafe au lait!", "a cat"]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.decode([10 ** 6])


# ----------------------------------------------------------------------------- words

def test_word_spans_and_indices(tok):
    p = "a tyrannosaurus on a chair, café!"
    spans = tok.word_spans(p)
    n = len(tok.tokens("tyrannosaurus"))
    assert [w for w, _ in spans] == ["a", "tyrannosaurus", "on", "a", "chair,", "café!"]
    assert spans[1][1] == list(range(2, 2 + n))  # every ## piece belongs to the word it continues
    assert tok.word_token_indices(p, "tyrannosaurus") == list(range(2, 2 + n))
    assert tok.word_token_indices(p, "a") == [1, 3 + n]
    chair = tok.word_token_indices(p, "chair")
    assert tok.word_token_indices(p, "chair,") == chair + [chair[-1] + 1]  # punctuation only when spelt out
    assert tok.word_token_indices(p, "CAFE") == tok.word_token_indices(p, "café")  # accents stripped, as BERT
    assert tok.word_token_indices(p, 4) == chair and tok.word_token_indices(p, "on a") == [2 + n, 3 + n]


def test_word_errors_are_the_clip_tokenizer_messages(tok):
    with pytest.raises(ValueError) as info:
        tok.word_token_indices("a cat on a mat", "dog")
    assert str(info.value) == "'dog' is not a word of the prompt 'a cat on a mat' (its words: a, cat, on, a, mat)"
    with pytest.raises(ValueError, match=r"word index 5 is out of range .* 5 words"):
        tok.word_token_indices("a cat on a mat", 5)
    with pytest.raises(ValueError, match="empty word"):
        tok.word_token_indices("a cat", " ")
    with pytest.raises(ValueError, match=r"'chair' is in the prompt .* only after the first 75 tokens"):
        tok.word_token_indices("a " * 80 + "chair", "chair")


def test_truncation_warning(tok, hf):
    prompt = "a " * 71 + "cat on a lion chair"  # 76 content tokens: 75 fit
    with pytest.warns(PromptTruncatedWarning, match=r"is 78 tokens, more than the 77 .* dropped: 'chair'$"):
        ids = tok.encode(prompt)
    assert torch.equal(ids, ref_ids(hf, [prompt]))
    assert ids[0, 76] == SEP and tok.count(prompt) == 78
    n = len(tok.tokens("tyrannosaurus"))
    with pytest.warns(PromptTruncatedWarning, match=r"dropped: 'on a chair' and the end of 'tyrannosaurus'$"):
        tok.encode("a " * (76 - n) + "tyrannosaurus on a chair")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.encode("a " * 75)  # exactly 77: no warning


WORDS = ["a", "cat", "Cat,", "tyrannosaurus", "don't", "1984", "3.14", "café", "naïve", "Ångström", "🐱", "猫坐",
         "photo.", "(red)", "HELLO!", "x-ray", "…", "a@b.com", "[SEP]", "東京"]


@st.composite
def word_prompts(draw):
    words = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=45))
    seps = draw(st.lists(st.sampled_from([" ", "  ", "\t", "\n"]), min_size=len(words) + 1, max_size=len(words) + 1))
    return seps[0] + "".join(w + s for w, s in zip(words, seps[1:])), words


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(word_prompts())
def test_word_spans_partition_content_tokens(tok, prompt_and_words):
    prompt, words = prompt_and_words
    spans = tok.word_spans(prompt)
    assert [w for w, _ in spans] == words
    ids = quietly(tok, prompt)[0]
    n = int((ids[1:] != PAD).sum()) - 1  # content tokens that fit (without [SEP])
    assert [p for _, ps in spans for p in ps] == list(range(1, n + 1))
    for word, ps in spans:
        if ps and len(ps) == len(tok.tokens(word)):  # a complete word decodes to itself (lowercased, no accents)
            assert tok.decode(ids[ps]).replace(" ", "") == tok.decode(tok.encode(word)[0]).replace(" ", "")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=60))
def test_word_spans_partition_on_random_text(tok, prompt):
    spans = tok.word_spans(prompt)
    assert [w for w, _ in spans] == prompt.split()
    n = int((quietly(tok, prompt)[0, 1:] != PAD).sum()) - 1
    assert [p for _, ps in spans for p in ps] == list(range(1, n + 1))


# ----------------------------------------------------------------------------- loading

def test_construction_paths_agree(tok, hf, bert_vocab_dir, tmp_path):
    hf.save_pretrained(str(tmp_path / "saved"))  # transformers 5 writes tokenizer.json
    pipeline = tmp_path / "pipeline"
    shutil.copytree(bert_vocab_dir, pipeline / "tokenizer")
    tok.save(tmp_path / "ours")
    expected = quietly(tok, PROMPTS)
    for path in [tmp_path / "saved", tmp_path / "saved" / "tokenizer.json", bert_vocab_dir / "vocab.txt", pipeline,
                 tmp_path / "ours"]:
        assert torch.equal(quietly(BertTokenizer.from_path(path), PROMPTS), expected), path


def _expect_error(path, *fragments, error=ValueError):
    with pytest.raises(error) as info:
        BertTokenizer.from_path(path)
    for fragment in (str(path),) + fragments:
        assert fragment in str(info.value)


def test_bad_tokenizer_files(tmp_path, bert_vocab_dir, clip_vocab_dir):
    _expect_error(tmp_path / "nope", "found nothing", "vocab.txt", "tokenizer.json", error=FileNotFoundError)
    _expect_error(clip_vocab_dir, "found a folder holding merges.txt, vocab.json", "vocab.txt")
    (tmp_path / "vocab.txt").write_text("a\nb\nc\n")
    _expect_error(tmp_path / "vocab.txt", "lacks [CLS], [SEP], [PAD], [UNK]")
    cased = tmp_path / "cased"
    shutil.copytree(bert_vocab_dir, cased)
    (cased / "tokenizer_config.json").write_text('{"do_lower_case": false}')
    _expect_error(cased, "cased BERT tokenizer")
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    Tokenizer(BPE()).save(str(tmp_path / "tokenizer.json"))
    _expect_error(tmp_path / "tokenizer.json", "is not a BERT WordPiece tokenizer")
