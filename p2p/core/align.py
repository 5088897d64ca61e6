"""
Token alignment between a source prompt P and an edited prompt P* for the cross-attention edits.

Prompt-to-Prompt (Hertz et al., ICLR 2023), Sec. 3.2 "Edit functions": a word swap injects the source
maps M into the edited branch, and adding a phrase needs an alignment function A that sends each
token of P* to its token in P (or to nothing for a new token). Both work on the 77-long token
sequences the text encoder sees: position 0 is BOS, then the content tokens, then EOS, then padding
(EOS again in SD v1).

  replace_mapper  word swap, a (77, 77) matrix A with  M_hat = M_src @ A  (rows sum to 1)
  refine_mapper   adding words, Needleman-Wunsch on the token ids: (mapper, aligned) with
                  M_hat[..., j] = aligned[j] * M_src[..., mapper[j]] + (1 - aligned[j]) * M_tgt[..., j]

Differences from the authors' `seq_aligner.py` (google/prompt-to-prompt):
  * their replacement mapper continues with A[j, j] after the last swapped word, which shifts every
    later token when the swapped words have different token counts ("a cat on a chair" ->
    "a tyrannosaurus on a chair" sends target 'on' to source 'chair'); we align every token after a
    swap to its true counterpart, and the target's EOS/padding to the source's EOS/padding;
  * as theirs, when the swapped words have different token counts each new token takes 1/len(new
    tokens) of every old token, so every row of A sums to 1 and the edited map still sums to 1 over
    the tokens (the new word gets the old word's attention mass); swaps with equal token counts pair
    the tokens one-to-one. Where no swap changes the token count our matrix equals theirs.
  * inserted tokens of a refinement get mapper[j] = j (theirs: -1, i.e. position 76); the weight 0 in `aligned`
    ignores it. Otherwise the refinement (scores, tie-breaking, BOS/EOS included, the identity j -> j
    past the target's end) is theirs.

Prompts longer than 77 tokens: both mappers align what the text encoder sees, i.e. the first 75
content tokens (refine_mapper passes on the tokenizer's PromptTruncatedWarning). In the word swap, a target token whose source
counterpart was cut off (the prompts then differ in length before it) takes the source's EOS map
(position 76), the source's summary of everything that fits.
"""

import unicodedata

import numpy as np
import torch

from models.errors import UserError
from models.tokenizer import MAX_LENGTH, CLIPTokenizer

GAP, MATCH, MISMATCH = 0, 1, -1  # Needleman-Wunsch scores used by the authors
LEFT, UP, DIAG = 1, 2, 3  # traceback moves: target token inserted, source token dropped, aligned


def word_occurrences(tokenizer: CLIPTokenizer, prompts: list[str], word: str, what: str) -> list[tuple[int, list[int]]]:
    """(prompt index b, token positions of `word` in prompt b) for every prompt that contains the word (a word or
    phrase, in the 77-long sequence with BOS at 0). Raises ValueError naming `what` and the prompts if none does."""
    found = []
    for b, prompt in enumerate(prompts):
        try:
            found.append((b, tokenizer.word_token_indices(prompt, word)))
        except ValueError:
            pass
    if not found:
        words = ", ".join(w for w, _ in tokenizer.word_spans(prompts[0])) if prompts else ""
        raise UserError(f"{what} word {word!r} is in none of the prompts " + "; ".join(repr(p) for p in prompts)
                        + f" (the words of the first: {words})")
    return found


def _content_length(tokenizer, prompt):
    """Number of content tokens the text encoder sees (at most 75); EOS sits right after them."""
    return len(tokenizer.tokens(prompt))


def _same_word(a, b):
    # the tokenizer lowercases after NFC, and a word's tokens do not depend on its neighbours
    return unicodedata.normalize("NFC", a).lower() == unicodedata.normalize("NFC", b).lower()


# ----------------------------------------------------------------------------- word swap

def replace_mapper(tokenizer: CLIPTokenizer, source: str, target: str) -> torch.Tensor:
    """(77, 77) word-swap matrix A (rows: source positions, columns: target positions), M_hat = M_src @ A.

    The prompts must have the same number of whitespace-separated words. Word k of P* takes the maps
    of word k of P: token-for-token when the words are equal or have as many tokens (as the authors
    do), otherwise each of its n tokens takes 1/n of the sum of the source word's tokens (the
    authors' weights: the word's attention mass is kept). BOS maps to BOS, and
    the k-th position after the target's EOS to the k-th position after the source's EOS (clipped
    at 76).
    """
    src_words, tgt_words = tokenizer.word_spans(source), tokenizer.word_spans(target)
    if len(src_words) != len(tgt_words):
        raise UserError(f"a word swap needs prompts with the same number of words: {source!r} has "
                        f"{len(src_words)}, {target!r} has {len(tgt_words)}; use mode='refine' to add words")
    src_eos = 1 + _content_length(tokenizer, source)
    tgt_eos = 1 + _content_length(tokenizer, target)

    sources = [None] * MAX_LENGTH  # sources[j]: (source positions, weight) that target position j takes
    sources[0] = ([0], 1.0)
    for (src_text, src_pos), (tgt_text, tgt_pos) in zip(src_words, tgt_words):
        if _same_word(src_text, tgt_text) or len(src_pos) == len(tgt_pos):  # t-th token -> t-th token
            for t, j in enumerate(tgt_pos):
                sources[j] = ([src_pos[t]] if t < len(src_pos) else [src_eos], 1.0)  # counterpart cut off
        else:  # swap with another token count: each new token takes 1/n of the old word's tokens
            for j in tgt_pos:
                sources[j] = (list(src_pos) or [src_eos], 1.0 / len(tgt_pos))
    for k in range(MAX_LENGTH - tgt_eos):  # EOS and padding continue the identity
        sources[tgt_eos + k] = ([min(src_eos + k, MAX_LENGTH - 1)], 1.0)

    A = torch.zeros(MAX_LENGTH, MAX_LENGTH)
    for j, entry in enumerate(sources):
        # a content token outside every word only happens for prompts made of odd control characters
        rows, weight = entry if entry is not None else ([src_eos], 1.0)
        A[rows, j] = weight
    return A


def replace_mappers(tokenizer: CLIPTokenizer, source: str, targets: list[str]) -> torch.Tensor:
    """(T, 77, 77): one word-swap matrix per edited prompt."""
    if not targets:
        return torch.zeros(0, MAX_LENGTH, MAX_LENGTH)
    return torch.stack([replace_mapper(tokenizer, source, t) for t in targets])


# ----------------------------------------------------------------------------- refinement

def _token_ids(tokenizer, prompt):
    """The ids the text encoder sees, without padding: BOS, content tokens (at most 75), EOS."""
    n = _content_length(tokenizer, prompt)
    return tokenizer.encode(prompt)[0, :n + 2].tolist()


def global_align(x: list[int], y: list[int]) -> list[int]:
    """Needleman-Wunsch alignment of target `y` onto source `x` (gap 0, match 1, mismatch -1).

    Returns, for each target index j, the source index it is aligned to, or -1 if it is inserted.
    Ties are broken as in the authors' code: a cell records LEFT (target token inserted) if that move
    reaches its score, else UP (source token dropped), else DIAG; the traceback starts at the end.
    With gap 0 a mismatch never wins, so aligned tokens always have equal ids.
    """
    n, m = len(x), len(y)
    score = np.zeros((n + 1, m + 1), dtype=np.int64)  # gap 0: first row and column stay 0
    move = np.zeros((n + 1, m + 1), dtype=np.int8)
    move[0, 1:], move[1:, 0] = LEFT, UP
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left = score[i, j - 1] + GAP
            up = score[i - 1, j] + GAP
            diag = score[i - 1, j - 1] + (MATCH if x[i - 1] == y[j - 1] else MISMATCH)
            best = max(left, up, diag)
            score[i, j] = best
            move[i, j] = LEFT if best == left else UP if best == up else DIAG

    mapper = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        if move[i, j] == DIAG:
            i, j = i - 1, j - 1
            mapper[j] = i
        elif move[i, j] == LEFT:
            j -= 1  # mapper[j] stays -1: a new token
        else:
            i -= 1  # a source token with no counterpart in the target
    return mapper


def refine_mapper(tokenizer: CLIPTokenizer, source: str, target: str) -> tuple[torch.LongTensor, torch.Tensor]:
    """(mapper (77,), aligned (77,)) for adding (or removing) words, by aligning the token-id sequences.

    aligned[j] = 1 where target token j is aligned to source token mapper[j], 0 for a new token (whose
    mapper[j] is j, a valid index that the 0 weight ignores). Past the target's EOS, padding maps to
    the same position of the source (the authors' identity), with weight 1.
    """
    x, y = _token_ids(tokenizer, source), _token_ids(tokenizer, target)
    source_of = global_align(x, y)
    mapper = torch.arange(MAX_LENGTH)
    aligned = torch.ones(MAX_LENGTH)
    for j, i in enumerate(source_of):
        if i < 0:
            aligned[j] = 0.0
        else:
            mapper[j] = i
    mapper[len(y):] = torch.arange(len(y), MAX_LENGTH)
    return mapper, aligned


def refine_mappers(tokenizer: CLIPTokenizer, source: str, targets: list[str]) -> tuple[torch.LongTensor, torch.Tensor]:
    """((T, 77), (T, 77)): one refinement (mapper, aligned) per edited prompt."""
    if not targets:
        return torch.zeros(0, MAX_LENGTH, dtype=torch.long), torch.zeros(0, MAX_LENGTH)
    mappers, aligned = zip(*(refine_mapper(tokenizer, source, t) for t in targets))
    return torch.stack(mappers), torch.stack(aligned)
