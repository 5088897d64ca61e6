"""Tests for p2p/core/align.py: hand-computed mappers, the authors' behaviour for contrast, properties."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from models.tokenizer import MAX_LENGTH, CLIPTokenizer, PromptTruncatedWarning
from p2p.core.align import global_align, refine_mapper, refine_mappers, replace_mapper, replace_mappers, word_occurrences

# several of these take more than one CLIP token: tyrannosaurus (3), hippopotamus (3), axolotl (4),
# skyscraper (3), quokka (3), narwhal (3), armadillo (2)
WORDS = ["a", "the", "cat", "dog", "on", "chair", "of", "with", "in", "red", "big", "painting",
         "tyrannosaurus", "hippopotamus", "axolotl", "skyscraper", "quokka", "narwhal", "armadillo"]
# words to insert in refinement properties; their tokens appear in no word of WORDS (checked below)
EXTRA = ["golden", "snowy", "winter", "children", "drawing", "tiramisu", "velociraptor", "neon", "at"]
SETTINGS = settings(max_examples=60, deadline=None)


@pytest.fixture(scope="module")
def tok(clip_vocab_dir):
    return CLIPTokenizer.from_path(clip_vocab_dir)


def columns(A, js):
    """{j: {source position: weight}} for the listed target positions."""
    return {j: {i: round(A[i, j].item(), 6) for i in A[:, j].nonzero().flatten().tolist()} for j in js}


# ----------------------------------------------------------------------------- the authors' code, re-stated

def authors_replacement_mapper(tok, x, y):
    """AUTHORS' BEHAVIOUR, for contrast only: seq_aligner.get_replacement_mapper_ as described in
    p2p-official.md Sec. 5 (walk source i / target j; a swapped word of another token count spreads
    1/len(target tokens) over all pairs; after the last swapped word A[j, j] = 1). Our word positions
    stand in for their get_word_inds, which agrees on these plain prompts."""
    words_x, words_y = x.split(" "), y.split(" ")
    swapped = [k for k in range(len(words_y)) if words_y[k] != words_x[k]]
    src = [tok.word_token_indices(x, k) for k in swapped]
    tgt = [tok.word_token_indices(y, k) for k in swapped]
    A = np.zeros((MAX_LENGTH, MAX_LENGTH))
    i = j = cur = 0
    while i < MAX_LENGTH and j < MAX_LENGTH:
        if cur < len(src) and src[cur][0] == i:
            if len(src[cur]) == len(tgt[cur]):
                A[src[cur], tgt[cur]] = 1
            else:
                A[np.ix_(src[cur], tgt[cur])] = 1 / len(tgt[cur])
            i, j, cur = i + len(src[cur]), j + len(tgt[cur]), cur + 1
        elif cur < len(src):
            A[i, j] = 1
            i, j = i + 1, j + 1
        else:
            A[j, j] = 1  # the bug: should be A[i, j]
            i, j = i + 1, j + 1
    return torch.from_numpy(A).float()


def authors_refinement_mapper(tok, x, y):
    """AUTHORS' BEHAVIOUR, for contrast only: seq_aligner.get_mapper as described in p2p-official.md
    Sec. 6. Ties at a cell: left (insert target token), then up (drop source token), then diagonal;
    inserted tokens get -1; padding continues with mapper[j] = j."""
    def ids(p):
        n = len(tok.tokens(p))
        return tok.encode(p)[0, :n + 2].tolist()
    xs, ys = ids(x), ids(y)
    S = [[0] * (len(ys) + 1) for _ in range(len(xs) + 1)]
    T = [["L"] * (len(ys) + 1) for _ in range(len(xs) + 1)]
    for i in range(1, len(xs) + 1):
        T[i][0] = "U"
        for j in range(1, len(ys) + 1):
            left, up = S[i][j - 1], S[i - 1][j]
            diag = S[i - 1][j - 1] + (1 if xs[i - 1] == ys[j - 1] else -1)
            S[i][j] = max(left, up, diag)
            T[i][j] = "L" if S[i][j] == left else "U" if S[i][j] == up else "D"
    pairs, i, j = [], len(xs), len(ys)
    while i > 0 or j > 0:
        if T[i][j] == "D":
            i, j = i - 1, j - 1
            pairs.append(i)
        elif T[i][j] == "L":
            j -= 1
            pairs.append(-1)
        else:
            i -= 1
    pairs.reverse()
    mapper = torch.arange(MAX_LENGTH)
    mapper[:len(pairs)] = torch.tensor(pairs)
    alphas = torch.ones(MAX_LENGTH)
    alphas[:len(pairs)] = (mapper[:len(pairs)] != -1).float()
    return mapper, alphas, len(xs), len(ys)


# ----------------------------------------------------------------------------- word swap, by hand

def test_single_token_swap_is_the_identity(tok):
    A = replace_mapper(tok, "a cat on a chair", "a dog on a chair")
    assert torch.equal(A, torch.eye(MAX_LENGTH))
    assert torch.equal(authors_replacement_mapper(tok, "a cat on a chair", "a dog on a chair"), A)


def test_tyrannosaurus_keeps_later_tokens_aligned(tok):
    # source: BOS a cat on a chair EOS      -> positions 0 1 2 3 4 5 6, padding 7..76
    # target: BOS a tyran no saurus on a chair EOS -> 0 1 2 3 4 5 6 7 8, padding 9..76
    assert tok.word_spans("a tyrannosaurus on a chair")[1] == ("tyrannosaurus", [2, 3, 4])
    A = replace_mapper(tok, "a cat on a chair", "a tyrannosaurus on a chair")
    third = 0.333333  # each of the 3 new tokens takes a third of 'cat' (the authors' weights)
    expected = {0: {0: 1}, 1: {1: 1}, 2: {2: third}, 3: {2: third}, 4: {2: third},  # BOS, a, tyran/no/saurus
                5: {3: 1}, 6: {4: 1}, 7: {5: 1}, 8: {6: 1}}  # on, a, chair, EOS <- on, a, chair, EOS
    expected.update({8 + k: {6 + k: 1} for k in range(1, 69)})  # padding k <- source padding k
    assert columns(A, range(MAX_LENGTH)) == expected
    assert torch.allclose(A.sum(1)[:75], torch.ones(75))  # every source token's mass goes somewhere, once

    # the authors' mapper: tyrannosaurus tokens get 1/3 of cat each, then A[j, j]: target 'on' (5) takes
    # source 'chair' (5), target 'a' (6) the source EOS, target 'chair' (7) and EOS (8) source padding
    theirs = authors_replacement_mapper(tok, "a cat on a chair", "a tyrannosaurus on a chair")
    assert columns(theirs, range(9)) == {0: {0: 1}, 1: {1: 1}, 2: {2: 0.333333}, 3: {2: 0.333333},
                                         4: {2: 0.333333}, 5: {5: 1}, 6: {6: 1}, 7: {7: 1}, 8: {8: 1}}
    assert theirs[3].sum() == 0 and theirs[4].sum() == 0  # source 'on' and 'a' reach no target token
    for j in range(5, 9):
        assert not torch.equal(A[:, j], theirs[:, j])


def test_multi_token_source_word_swapped_for_one_token(tok):
    # source: BOS a tyran no saurus on a chair EOS (0..8); target: BOS a cat on a chair EOS (0..6)
    A = replace_mapper(tok, "a tyrannosaurus on a chair", "a cat on a chair")
    expected = {0: {0: 1}, 1: {1: 1}, 2: {2: 1, 3: 1, 4: 1},  # cat <- the sum of the 3 (their mass)
                3: {5: 1}, 4: {6: 1}, 5: {7: 1}, 6: {8: 1}}
    expected.update({6 + k: {min(8 + k, 76): 1} for k in range(1, 71)})  # padding, clipped at 76
    assert columns(A, range(MAX_LENGTH)) == expected
    assert torch.allclose(A.sum(1)[:76], torch.ones(76))
    theirs = authors_replacement_mapper(tok, "a tyrannosaurus on a chair", "a cat on a chair")
    assert columns(theirs, range(3, 7)) == {3: {3: 1}, 4: {4: 1}, 5: {5: 1}, 6: {6: 1}}  # 'on' <- 'no', ...
    assert theirs[:, 2].sum() == pytest.approx(3.0)  # 1/len(target) per pair: the column sums to 3


def test_swap_with_equal_token_counts_pairs_tokens(tok):
    # BOS a hippo potam us on a chair EOS -> BOS a tyran no saurus on a chair EOS: one-to-one, as theirs
    A = replace_mapper(tok, "a hippopotamus on a chair", "a tyrannosaurus on a chair")
    assert torch.equal(A, torch.eye(MAX_LENGTH))
    assert torch.equal(A, authors_replacement_mapper(tok, "a hippopotamus on a chair", "a tyrannosaurus on a chair"))


def test_several_swaps_and_repeated_words(tok):
    # BOS a quokka on a red chair EOS -> BOS a cat on a big axolotl EOS
    # source: a 1, qu ok ka 2-4, on 5, a 6, red 7, chair 8, EOS 9; target: a 1, cat 2, on 3, a 4, big 5,
    # ax o lot l 6-9, EOS 10
    A = replace_mapper(tok, "a quokka on a red chair", "a cat on a big axolotl")
    q = 0.25  # axolotl's 4 tokens share chair's map
    assert columns(A, range(12)) == {0: {0: 1}, 1: {1: 1}, 2: {2: 1, 3: 1, 4: 1}, 3: {5: 1},
                                     4: {6: 1}, 5: {7: 1}, 6: {8: q}, 7: {8: q}, 8: {8: q}, 9: {8: q},
                                     10: {9: 1}, 11: {10: 1}}


def test_truncated_prompts(tok):
    # 1 + 3 + 80 tokens: the encoder keeps a, tyran, no, saurus and 71 'red' (positions 5..75), EOS at 76
    long_src, long_tgt = "a tyrannosaurus" + " red" * 80, "a cat" + " red" * 80
    A = replace_mapper(tok, long_src, long_tgt)  # target keeps a, cat and 73 'red' (positions 3..75)
    assert (A >= 0).all()
    assert columns(A, [2, 3, 73]) == {2: {2: 1, 3: 1, 4: 1}, 3: {5: 1}, 73: {75: 1}}
    # target 'red' #71 and #72 have no source counterpart left: they take the source EOS
    assert columns(A, [74, 75, 76]) == {74: {76: 1}, 75: {76: 1}, 76: {76: 1}}
    B = replace_mapper(tok, long_tgt, long_src)  # the other way: the last two source 'red' go unused
    assert columns(B, [5, 75, 76]) == {5: {3: 1}, 75: {73: 1}, 76: {76: 1}}
    assert torch.equal(replace_mapper(tok, long_src, long_src), torch.eye(MAX_LENGTH))

    with pytest.warns(PromptTruncatedWarning):
        mapper, alphas = refine_mapper(tok, long_tgt, long_src)
    assert ((0 <= mapper) & (mapper < MAX_LENGTH)).all()
    assert alphas[76] == 1 and mapper[76] == 76  # EOS <- EOS
    with pytest.warns(PromptTruncatedWarning):
        mapper, alphas = refine_mapper(tok, long_src, long_src)
    assert torch.equal(mapper, torch.arange(MAX_LENGTH)) and (alphas == 1).all()


def test_batched_mappers(tok):
    targets = ["a dog on a chair", "a tyrannosaurus on a chair"]
    A = replace_mappers(tok, "a cat on a chair", targets)
    assert A.shape == (2, MAX_LENGTH, MAX_LENGTH)
    assert torch.equal(A[1], replace_mapper(tok, "a cat on a chair", targets[1]))
    mappers, alphas = refine_mappers(tok, "a cat", ["a big cat", "a cat on a chair"])
    assert mappers.shape == alphas.shape == (2, MAX_LENGTH) and mappers.dtype == torch.long
    assert torch.equal(mappers[0], refine_mapper(tok, "a cat", "a big cat")[0])
    assert replace_mappers(tok, "a cat", []).shape == (0, MAX_LENGTH, MAX_LENGTH)
    assert refine_mappers(tok, "a cat", [])[0].shape == (0, MAX_LENGTH)


# ----------------------------------------------------------------------------- refinement, by hand

@pytest.mark.parametrize("source, target, aligned", [
    # BOS a castle EOS -> BOS children drawing of a castle EOS
    ("a castle", "children drawing of a castle", {0: 0, 4: 1, 5: 2, 6: 3}),
    # BOS a photo of a house on a mountain EOS (0..9) -> ... mountain(8) at(9) winter(10) EOS(11)
    ("a photo of a house on a mountain", "a photo of a house on a mountain at winter",
     {**{j: j for j in range(9)}, 11: 9}),
    # BOS soup EOS -> BOS pea soup EOS
    ("soup", "pea soup", {0: 0, 2: 1, 3: 2}),
])
def test_refinement_examples(tok, source, target, aligned):
    mapper, alphas = refine_mapper(tok, source, target)
    target_len = len(tok.tokens(target)) + 2
    for j in range(target_len):
        assert alphas[j] == (1.0 if j in aligned else 0.0)
        assert mapper[j] == aligned.get(j, j)  # inserted tokens: mapper[j] = j
    k = torch.arange(MAX_LENGTH - target_len)
    assert torch.equal(mapper[target_len:], target_len + k) and (alphas[target_len:] == 1).all()  # identity

    theirs, their_alphas, _, _ = authors_refinement_mapper(tok, source, target)
    assert torch.equal(alphas, their_alphas)
    assert torch.equal(mapper[alphas == 1][:len(aligned)], theirs[their_alphas == 1][:len(aligned)])
    assert torch.equal(theirs[target_len:], target_len + k)  # theirs pads with the identity j -> j


def test_refinement_tie_breaking(tok):
    # BOS a cat EOS -> BOS a a cat EOS: two co-optimal alignments; preferring "left" at the cell of the
    # second 'a' makes it the new token (a diagonal-first traceback would pick the first 'a')
    mapper, alphas = refine_mapper(tok, "a cat", "a a cat")
    assert alphas[:5].tolist() == [1, 1, 0, 1, 1] and mapper[[0, 1, 3, 4]].tolist() == [0, 1, 2, 3]
    # BOS a a cat EOS -> BOS a cat EOS: "up" before "diagonal" drops the second source 'a'
    mapper, alphas = refine_mapper(tok, "a a cat", "a cat")
    assert alphas[:4].tolist() == [1, 1, 1, 1] and mapper[:4].tolist() == [0, 1, 3, 4]
    # BOS a cat EOS -> BOS cat a EOS: keep 'a' or keep 'cat'? At the cell (cat, a) "left" beats "up", so the
    # target 'a' is new and 'cat' is kept (up-first would keep 'a' and make 'cat' new)
    mapper, alphas = refine_mapper(tok, "a cat", "cat a")
    assert alphas[:4].tolist() == [1, 1, 0, 1] and mapper[[0, 1, 3]].tolist() == [0, 2, 3]
    # BOS a cat EOS -> BOS a dog EOS: 'dog' is new, 'cat' dropped (a mismatch never wins with gap 0)
    mapper, alphas = refine_mapper(tok, "a cat", "a dog")
    assert alphas[:4].tolist() == [1, 1, 0, 1] and mapper[[0, 1, 3]].tolist() == [0, 1, 3]
    assert global_align([5, 7], [5, 7]) == [0, 1] and global_align([], [3]) == [-1]


# ----------------------------------------------------------------------------- errors

def test_word_swap_needs_equal_word_counts(tok):
    with pytest.raises(ValueError, match=r"'a cat' has 2, 'a big cat' has 3; use mode='refine'"):
        replace_mapper(tok, "a cat", "a big cat")


def test_word_occurrences(tok):
    prompts = ["a cat on a chair", "a tyrannosaurus on a chair"]
    assert word_occurrences(tok, prompts, "tyrannosaurus", "test") == [(1, [2, 3, 4])]
    assert word_occurrences(tok, prompts, "a", "test") == [(0, [1, 4]), (1, [1, 6])]
    with pytest.raises(ValueError, match=r"test word 'dog' is in none of the prompts 'a cat on a chair'; "
                                         r"'a tyrannosaurus on a chair' \(the words of the first: a, cat, on, a, chair\)"):
        word_occurrences(tok, prompts, "dog", "test")


# ----------------------------------------------------------------------------- properties

prompts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=10)


def test_extra_words_share_no_token_with_words(tok):
    ids = lambda words: {i for w in words for i in tok.encode(w)[0, 1:1 + len(tok.tokens(w))].tolist()}
    assert not ids(WORDS) & ids(EXTRA)
    assert max(len(tok.tokens(w)) for w in WORDS) > 2


@SETTINGS
@given(source=prompts, data=st.data())
def test_replace_properties(tok, source, data):
    swap = data.draw(st.lists(st.booleans(), min_size=len(source), max_size=len(source)))
    target = [data.draw(st.sampled_from(WORDS)) if s else w for w, s in zip(source, swap)]
    src, tgt = " ".join(source), " ".join(target)
    A = replace_mapper(tok, src, tgt)
    src_eos, tgt_eos = len(tok.tokens(src)) + 1, len(tok.tokens(tgt)) + 1
    assert (A >= 0).all() and torch.allclose(A.sum(1)[:src_eos + 1], torch.ones(src_eos + 1))  # mass kept
    assert torch.equal(replace_mapper(tok, src, src), torch.eye(MAX_LENGTH))
    for (sw, sp), (tw, tp) in zip(tok.word_spans(src), tok.word_spans(tgt)):
        if sw == tw or len(sp) == len(tp):  # unchanged word, or a swap keeping the token count: one-to-one
            for i, j in zip(sp, tp, strict=True):
                assert columns(A, [j])[j] == {i: 1}
        else:  # swapped word of another token count: 1/len(new tokens) of each old token
            for j in tp:
                assert columns(A, [j])[j] == {i: round(1 / len(tp), 6) for i in sp}
    for k in range(MAX_LENGTH - tgt_eos):
        assert A[min(src_eos + k, MAX_LENGTH - 1), tgt_eos + k] == 1
    if src_eos == tgt_eos and all(len(tok.tokens(a)) == len(tok.tokens(b)) for a, b in zip(source, target)):
        assert torch.equal(A, authors_replacement_mapper(tok, src, tgt))  # their bug needs a count change


@SETTINGS
@given(source=prompts, data=st.data())
def test_refine_insertions(tok, source, data):
    inserts = data.draw(st.lists(st.tuples(st.integers(0, len(source)), st.sampled_from(EXTRA)), max_size=4))
    target = [(w, False) for w in source]
    for at, word in inserts:
        target.insert(min(at, len(target)), (word, True))
    src, tgt = " ".join(source), " ".join(w for w, _ in target)
    mapper, alphas = refine_mapper(tok, src, tgt)

    new = {p for (_, pos), (_, is_new) in zip(tok.word_spans(tgt), target) if is_new for p in pos}
    old = [p for (_, pos), (_, is_new) in zip(tok.word_spans(tgt), target) if not is_new for p in pos]
    src_len, tgt_len = len(tok.tokens(src)) + 2, len(tok.tokens(tgt)) + 2
    assert alphas[:tgt_len].tolist() == [0.0 if j in new else 1.0 for j in range(tgt_len)]
    # BOS, the old words' tokens and EOS map onto the source's positions, in order
    assert mapper[[0, *old, tgt_len - 1]].tolist() == list(range(src_len))
    assert (alphas[tgt_len:] == 1).all()

    same, same_alphas = refine_mapper(tok, src, src)
    assert torch.equal(same, torch.arange(MAX_LENGTH)) and (same_alphas == 1).all()


@SETTINGS
@given(source=prompts, target=st.lists(st.sampled_from(WORDS + EXTRA), min_size=1, max_size=10))
def test_refine_any_pair(tok, source, target):
    src, tgt = " ".join(source), " ".join(target)
    mapper, alphas = refine_mapper(tok, src, tgt)
    theirs, their_alphas, src_len, tgt_len = authors_refinement_mapper(tok, src, tgt)
    assert torch.equal(alphas, their_alphas)  # same alignment as the authors' code, ties included
    aligned = alphas[:tgt_len] == 1
    assert torch.equal(mapper[:tgt_len][aligned], theirs[:tgt_len][aligned])
    assert (mapper[:tgt_len][aligned].diff() > 0).all()  # monotone over the aligned tokens
    src_ids, tgt_ids = tok.encode(src)[0], tok.encode(tgt)[0]
    assert torch.equal(src_ids[mapper[:tgt_len][aligned]], tgt_ids[:tgt_len][aligned])  # matches only
    assert aligned[0] and aligned[-1] and mapper[tgt_len - 1] == src_len - 1  # BOS, EOS
    assert ((0 <= mapper) & (mapper < MAX_LENGTH)).all()
