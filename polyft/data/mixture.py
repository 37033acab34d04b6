"""Mix sources into one training set: caps, language filter, temperature sampling.

Languages are sampled with p_l proportional to n_l^(1/T), where n_l is the weighted
number of rows in language l (T=1: proportional to size; large T: towards uniform).
Within a language, rows are drawn in proportion to their source's weight. The validation
set (data.validation_ratio, sources with validation=true) is held out before any of this.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict

from polyft.data.sources import load_source
from polyft.errors import PolyftError


def language_probs(sizes: dict[str, float], temperature: float) -> dict[str, float]:
    scaled = {lang: n ** (1.0 / temperature) for lang, n in sizes.items() if n > 0}
    total = sum(scaled.values())
    return {lang: v / total for lang, v in scaled.items()}


def _draw(rows: list[dict], weights: list[float], k: int, rng: random.Random) -> list[dict]:
    """k rows, each row at most once per pass, in proportion to weight (Efraimidis-Spirakis)."""
    out = []
    while len(out) < k:
        keyed = sorted(range(len(rows)), key=lambda i: rng.random() ** (1.0 / weights[i]), reverse=True)
        out.extend(rows[i] for i in keyed[: k - len(out)])
    return out


def build_mixture(sources: dict[str, list[dict]], weights: dict[str, float],
                  caps: dict[str, int | None], languages: list[str] | None,
                  temperature: float, num_examples: int | None, seed: int) -> list[dict]:
    rng = random.Random(seed)
    by_lang: dict[str, list[tuple[dict, float]]] = defaultdict(list)
    present = set()
    for name, rows in sources.items():
        cap = caps.get(name)
        if cap is not None and len(rows) > cap:
            rows = random.Random(f"{seed}:{name}").sample(rows, cap)
        for r in rows:
            present.add(r["lang"])
            if languages is None or r["lang"] in languages:
                by_lang[r["lang"]].append((r, weights[name]))
    if not by_lang:
        raise PolyftError(f"data.languages={list(languages or [])} matches no rows; "
                          f"languages in the data: {', '.join(sorted(present))}")
    sizes = {lang: sum(w for _, w in items) for lang, items in by_lang.items()}
    probs = language_probs(sizes, temperature)
    total = num_examples or sum(len(items) for items in by_lang.values())
    mixture = []
    for lang in sorted(by_lang):
        items = by_lang[lang]
        k = round(total * probs[lang])
        mixture.extend(_draw([r for r, _ in items], [w for _, w in items], k, rng))
    rng.shuffle(mixture)
    return mixture


def _content(row: dict) -> str:
    return json.dumps([row.get("prompt"), row.get("response"), row.get("messages"), row.get("system")],
                      ensure_ascii=False)


def hold_out(rows: list[dict], ratio: float, seed: int, name: str) -> tuple[list[dict], list[dict]]:
    """(training rows, validation rows): round(ratio * n) of a source's n distinct rows drawn at
    random (seeded per source), every copy of a drawn row with it, before any sampling: no
    validation row is ever trained on, not even as a duplicate."""
    distinct = list(dict.fromkeys(_content(r) for r in rows))
    k = round(len(distinct) * ratio)
    if k == 0:
        return rows, []
    held = set(random.Random(f"{seed}:validation:{name}").sample(distinct, k))
    return [r for r in rows if _content(r) not in held], [r for r in rows if _content(r) in held]


def load_splits(data_cfg, offline: bool) -> tuple[list[dict], list[dict]]:
    """(the sampled training rows, the validation rows) of a data config: every source read;
    sources with validation=true and data.validation_ratio of each other source held out;
    the rest mixed."""
    train, validation = {}, []
    langs = list(data_cfg.languages) if data_cfg.languages else None
    ratio = float(data_cfg.get("validation_ratio") or 0.0)
    for name, src in data_cfg.sources.items():
        rows = load_source(f"data.sources.{name}", src, data_cfg.seed, offline)
        if src.get("validation"):
            if src.max_rows is not None and len(rows) > src.max_rows:
                rows = random.Random(f"{data_cfg.seed}:{name}").sample(rows, src.max_rows)
            validation += rows
        else:
            train[name], held = hold_out(rows, ratio, data_cfg.seed, name)
            validation += held
    validation = [r for r in validation if langs is None or r["lang"] in langs]
    if (ratio or any(s.get("validation") for s in data_cfg.sources.values())) and not validation:
        raise PolyftError(f"data={data_cfg.name}: the validation set is empty (data.validation_ratio={ratio}); "
                          "raise the ratio or add a source with validation=true in the trained languages")
    mixture = build_mixture(train, {n: s.weight for n, s in data_cfg.sources.items()},
                            {n: s.max_rows for n, s in data_cfg.sources.items()}, langs,
                            data_cfg.temperature, data_cfg.num_examples, data_cfg.seed)
    return mixture, validation


def load_mixture(data_cfg, offline: bool) -> list[dict]:
    """The sampled training rows for a data config (every source read, then mixed)."""
    return load_splits(data_cfg, offline)[0]
