"""Text metrics that work in every language: exact match and token F1 (SQuAD's), ROUGE-L, BLEU and chrF.

Words are not always separated by spaces: in Chinese and Japanese every character counts as a token
(as the multilingual QA benchmarks, MLQA and CMRC, score them), elsewhere a token is a word between
spaces. Before tokenising, text is NFKC-normalised (full-width letters, digits and punctuation fold to
their half-width forms), lower-cased, and stripped of every Unicode punctuation mark (，。！ as well
as ,.!, removed as SQuAD removes them); SQuAD's English articles are dropped for EM/F1. BLEU takes sacrebleu's tokenizer for the
references' language: `zh` for Chinese, `ja-mecab` for Japanese when it is installed, else `13a`.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter

# Scripts written without spaces between words: CJK ideographs (with extensions and compatibility
# forms), hiragana and katakana. Hangul is written with spaces and keeps word tokens.
_CJK = ("\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u309f\u30a0-\u30ff\U00020000-\U0002ebef")
_TOKEN = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
_KANA = re.compile("[\u3040-\u309f\u30a0-\u30ff]")
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _fold(s: str) -> str:
    """NFKC, lower case, every punctuation character (Unicode category P*, and ASCII's symbols) gone."""
    s = unicodedata.normalize("NFKC", s).lower()
    return "".join(ch for ch in s if not (unicodedata.category(ch).startswith("P") or ch in string.punctuation))


def tokens(s: str, drop_articles: bool = False) -> list[str]:
    """The tokens the metrics count: each CJK character, and each space-separated word elsewhere."""
    s = _fold(s)
    if drop_articles:
        s = _ARTICLES.sub(" ", s)
    return _TOKEN.findall(s)


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation made multilingual: the tokens EM and F1 compare, joined by spaces."""
    return " ".join(tokens(s, drop_articles=True))


def exact_match(pred: str, ref: str) -> float:
    return float(tokens(pred, drop_articles=True) == tokens(ref, drop_articles=True))


def token_f1(pred: str, ref: str) -> float:
    p, r = tokens(pred, drop_articles=True), tokens(ref, drop_articles=True)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (one row of the DP table at a time)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 (Lin 2004, beta = 1) over the same tokens (CJK characters, other words)."""
    p, r = tokens(pred), tokens(ref)
    lcs = _lcs(p, r) if p and r else 0
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def bleu_tokenizer(refs: list[str]) -> str:
    """sacrebleu's tokenizer for the references' language."""
    text = "".join(refs)
    if _KANA.search(text):
        try:
            from sacrebleu.tokenizers.tokenizer_ja_mecab import TokenizerJaMecab

            TokenizerJaMecab()  # needs mecab-python3 and ipadic
            return "ja-mecab"
        except Exception:  # not installed: the default, as sacrebleu's own
            return "13a"
    return "zh" if _HAN.search(text) else "13a"


def bleu_chrf(preds: list[str], refs: list[str]) -> dict[str, float]:
    """Corpus BLEU (tokenised for the references' language, see bleu_tokenizer) and chrF."""
    import sacrebleu

    return {"bleu": sacrebleu.corpus_bleu(preds, [refs], tokenize=bleu_tokenizer(refs)).score,
            "chrf": sacrebleu.corpus_chrf(preds, [refs]).score}
