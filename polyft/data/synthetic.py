"""Deterministic multilingual toy data: MGSM-like arithmetic and generic instructions.

Every number word and template below is written for this project. Problems use digits
and answers are digits, as in MGSM; instructions ask for number words, so a model has to
know the language to answer them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

LANGS = ("en", "de", "es", "fr", "sw", "ja")

NUMBER_WORDS: dict[str, list[str]] = {
    "en": "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split(),
    "de": "null eins zwei drei vier fünf sechs sieben acht neun zehn elf zwölf dreizehn "
    "vierzehn fünfzehn sechzehn siebzehn achtzehn neunzehn zwanzig".split(),
    "es": "cero uno dos tres cuatro cinco seis siete ocho nueve diez once doce trece "
    "catorce quince dieciséis diecisiete dieciocho diecinueve veinte".split(),
    "fr": "zéro un deux trois quatre cinq six sept huit neuf dix onze douze treize "
    "quatorze quinze seize dix-sept dix-huit dix-neuf vingt".split(),
    "sw": ["sifuri", "moja", "mbili", "tatu", "nne", "tano", "sita", "saba", "nane", "tisa",
           "kumi"] + [f"kumi na {w}" for w in
                      "moja mbili tatu nne tano sita saba nane tisa".split()] + ["ishirini"],
    "ja": "零 一 二 三 四 五 六 七 八 九 十 十一 十二 十三 十四 十五 十六 十七 十八 十九 二十".split(),
}

_NAMES = {
    "en": ["Tom", "Anna", "Sam"], "de": ["Lena", "Max", "Jonas"], "es": ["Ana", "Luis", "Sofía"],
    "fr": ["Marie", "Luc", "Paul"], "sw": ["Juma", "Amina", "Baraka"], "ja": ["太郎", "花子", "健"],
}
_ITEMS = {
    "en": ["apples", "books", "pens"], "de": ["Äpfel", "Bücher", "Stifte"],
    "es": ["manzanas", "flores", "galletas"], "fr": ["pommes", "livres", "stylos"],
    "sw": ["machungwa", "vitabu", "kalamu"], "ja": ["りんご", "本", "ペン"],
}
# (addition template, subtraction template) per language.
_MATH = {
    "en": ("{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?",
           "{name} has {a} {item} and gives away {b}. How many {item} are left?"),
    "de": ("{name} hat {a} {item}. {name} bekommt {b} dazu. Wie viele {item} hat {name} jetzt?",
           "{name} hat {a} {item} und gibt {b} weg. Wie viele {item} bleiben übrig?"),
    "es": ("{name} tiene {a} {item}. {name} recibe {b} más. ¿Cuántas {item} tiene {name} ahora?",
           "{name} tiene {a} {item} y regala {b}. ¿Cuántas {item} quedan?"),
    "fr": ("{name} a {a} {item}. {name} en reçoit {b} de plus. Combien de {item} a {name} maintenant ?",
           "{name} a {a} {item} et en donne {b}. Combien de {item} reste-t-il ?"),
    "sw": ("{name} ana {item} {a}. {name} anapata {b} zaidi. {name} ana {item} ngapi sasa?",
           "{name} ana {item} {a} na anatoa {b}. Zimebaki {item} ngapi?"),
    "ja": ("{name}は{item}を{a}個持っています。さらに{b}個もらいました。{item}は全部で何個ですか？",
           "{name}は{item}を{a}個持っています。{b}個あげました。{item}は何個残っていますか？"),
}
# (number -> words, successor) instruction templates per language.
_INSTR = {
    "en": ("Write the number {n} in words.", "Which number comes after {w}?"),
    "de": ("Schreibe die Zahl {n} in Worten.", "Welche Zahl kommt nach {w}?"),
    "es": ("Escribe el número {n} con letras.", "¿Qué número viene después de {w}?"),
    "fr": ("Écris le nombre {n} en lettres.", "Quel nombre vient après {w} ?"),
    "sw": ("Andika namba {n} kwa maneno.", "Namba gani inafuata {w}?"),
    "ja": ("{n}を漢数字で書いてください。", "{w}の次の数は何ですか？"),
}

# The tiny models' tokenizer corpus reads these two only (its output must not change).
_CORPUS_GENERATORS = ("arithmetic", "instructions")
GENERATORS = _CORPUS_GENERATORS + ("arithmetic_words", "numbers", "number_text")


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    lang: str
    task: str

    def as_dict(self) -> dict:
        return {"prompt": self.prompt, "response": self.response, "lang": self.lang, "task": self.task}


def arithmetic(lang: str, rng: random.Random) -> Example:
    name, item = rng.choice(_NAMES[lang]), rng.choice(_ITEMS[lang])
    add, sub = _MATH[lang]
    if rng.random() < 0.5:
        a, b = rng.randint(1, 10), rng.randint(1, 10)
        return Example(add.format(name=name, item=item, a=a, b=b), str(a + b), lang, "math")
    a = rng.randint(2, 20)
    b = rng.randint(1, a - 1)
    return Example(sub.format(name=name, item=item, a=a, b=b), str(a - b), lang, "math")


def instruction(lang: str, rng: random.Random) -> Example:
    words = NUMBER_WORDS[lang]
    to_words, successor = _INSTR[lang]
    if rng.random() < 0.5:
        n = rng.randint(0, 20)
        return Example(to_words.format(n=n), words[n], lang, "instruct")
    n = rng.randint(0, 19)
    return Example(successor.format(w=words[n]), words[n + 1], lang, "instruct")


# Reading number words back as digits, per language (the third kind of `numbers` rows).
_READ = {
    "en": "Write {w} as a number in digits.",
    "de": "Schreibe {w} als Zahl in Ziffern.",
    "es": "Escribe {w} como número en cifras.",
    "fr": "Écris {w} en chiffres.",
    "sw": "Andika {w} kwa tarakimu.",
    "ja": "{w}を算用数字で書いてください。",
}


def arithmetic_words(lang: str, rng: random.Random) -> Example:
    """`arithmetic` with the operands written as number words of `lang` (all within 0-20);
    the answer stays in digits, as in MGSM. Reading the problem needs the language's number
    words, solving it needs the arithmetic."""
    words = NUMBER_WORDS[lang]
    name, item = rng.choice(_NAMES[lang]), rng.choice(_ITEMS[lang])
    add, sub = _MATH[lang]
    if rng.random() < 0.5:
        a, b = rng.randint(1, 10), rng.randint(1, 10)
        return Example(add.format(name=name, item=item, a=words[a], b=words[b]), str(a + b), lang, "math")
    a = rng.randint(2, 20)
    b = rng.randint(1, a - 1)
    return Example(sub.format(name=name, item=item, a=words[a], b=words[b]), str(a - b), lang, "math")


def numbers(lang: str, rng: random.Random) -> Example:
    """Number-word instructions in `lang`, no arithmetic: a number in words, the word that
    follows a word, or a word read back as digits (a third each)."""
    words = NUMBER_WORDS[lang]
    to_words, successor = _INSTR[lang]
    kind = rng.randrange(3)
    if kind == 0:
        n = rng.randint(0, 20)
        return Example(to_words.format(n=n), words[n], lang, "instruct")
    if kind == 1:
        n = rng.randint(0, 19)
        return Example(successor.format(w=words[n]), words[n + 1], lang, "instruct")
    n = rng.randint(0, 20)
    return Example(_READ[lang].format(w=words[n]), str(n), lang, "instruct")


def number_text(lang: str, rng: random.Random) -> Example:
    """A `numbers` row as one line of plain text (instruction, then its answer), for continued
    pretraining: no prompt, so every token carries loss and no answer format is taught."""
    row = numbers(lang, rng)
    return Example("", f"{row.prompt} {row.response}", lang, "lm")


def generate(generator: str, langs: list[str] | tuple[str, ...], n: int, seed: int) -> list[dict]:
    """`n` examples per language, the same for the same (generator, langs, n, seed)."""
    make = {"arithmetic": arithmetic, "instructions": instruction, "arithmetic_words": arithmetic_words,
            "numbers": numbers, "number_text": number_text}[generator]
    rows = []
    for lang in langs:
        rng = random.Random(f"{generator}:{lang}:{seed}")
        rows.extend(make(lang, rng).as_dict() for _ in range(n))
    return rows


def corpus(seed: int = 0, per_lang: int = 200) -> list[str]:
    """Plain text in every language, for training the tiny models' tokenizer."""
    texts = [" ".join(words) for words in NUMBER_WORDS.values()]
    for gen in _CORPUS_GENERATORS:
        texts.extend(f"{r['prompt']} {r['response']}" for r in generate(gen, LANGS, per_lang, seed))
    return texts
