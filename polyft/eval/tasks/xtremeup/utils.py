"""XTREME-UP tasks: the loader lm-eval calls, and the three metrics.

- semantic parsing: exact match, i.e. sequence accuracy after whitespace normalisation
  (runs of whitespace become one space, ends stripped; case and brackets count).
- in-language QA: SQuAD-style token F1 (bag of tokens, precision and recall against the one
  reference). SQuAD's normalisation (lowercase, strip ASCII punctuation and the English
  articles a/an/the) is English-only; here text is NFKC-normalised and lowercased, every
  Unicode punctuation or symbol character separates tokens and is dropped, combining marks
  stay inside their word (Indic vowel signs), and scripts written without spaces (Han,
  kana, Thai, Lao, Khmer, Myanmar) count one token per character. No words are removed in
  any language. Two empty answers score 1, one empty answer 0.
- translation: corpus-level chrF from sacrebleu (character n-grams up to 6, beta 2, no
  word n-grams, whitespace ignored), the way XTREME-UP scores MT: statistics are summed
  over the test set, then one F-score; on the 0-100 scale sacrebleu prints.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from polyft.data import xtremeup
from polyft.eval.tasks.xlsum.utils import UnicodeTokenizer

_TOKENIZER = UnicodeTokenizer()


def load(xtremeup_task: str, xtremeup_lang: str, data_files: dict, **_metadata):
    """A DatasetDict of polyft rows from the release files polyft chose (see
    polyft.eval.data.xtremeup_files); lm-eval passes the task's metadata too."""
    import datasets

    return datasets.DatasetDict({
        split: datasets.Dataset.from_list(
            xtremeup.to_rows(xtremeup.read_file(Path(path), xtremeup_task), xtremeup_task, xtremeup_lang))
        for split, path in data_files.items()})


# ---------------------------------------------------------------- metrics

def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def exact_match(reference: str, prediction: str) -> float:
    return float(normalize_whitespace(reference) == normalize_whitespace(prediction))


def answer_tokens(text: str) -> list[str]:
    return _TOKENIZER.tokenize(text)


def token_f1(reference: str, prediction: str) -> float:
    ref, pred = answer_tokens(reference), answer_tokens(prediction)
    if not ref or not pred:
        return float(ref == pred)
    common = sum((Counter(ref) & Counter(pred)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def corpus_chrf(items) -> float:
    """chrF of (reference, prediction) pairs as one corpus."""
    from sacrebleu.metrics import CHRF

    refs, preds = zip(*items) if items else ((), ())
    return CHRF().corpus_score(list(preds), [list(refs)]).score


# ---------------------------------------------------------------- lm-eval hooks

def process_exact_match(doc: dict, results: list[str]) -> dict:
    return {"exact_match": exact_match(doc["response"], results[0])}


def process_f1(doc: dict, results: list[str]) -> dict:
    return {"f1": token_f1(doc["response"], results[0])}


def process_chrf(doc: dict, results: list[str]) -> dict:
    return {"chrf": (doc["response"], results[0].strip())}
