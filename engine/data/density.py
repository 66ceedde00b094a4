"""Caption density: how many nouns a set of captions names, PixArt-α's measure of a caption set.

PixArt-α (Chen et al., 2023, arXiv 2310.00426, Table 1) compares caption sets by their nouns:

- DN, distinct nouns: how many different nouns the captions use;
- VN, valid distinct nouns: distinct nouns that occur more than 10 times in the whole set
  (the paper's wording; a noun seen once or twice is a long-tail concept the model can hardly learn);
- VN/DN: the share of the vocabulary that is valid;
- total nouns, and the average: noun occurrences per caption (one caption per image).

Its figures: LAION 210K/2461K = 8.5%, 6.4 nouns per image; SAM captioned by LLaVA
23K/124K = 18.6%, 29.3 per image. The paper counted with NLTK; which tagger and how words were
normalised it does not say. Here a noun is a token tagged NN, NNS, NNP or NNPS (Penn Treebank)
that contains a letter, counted lower-cased and not lemmatised ("dog" and "dogs" are two nouns).

The tagger is pluggable (``TAGGERS``): anything with a ``name`` and ``tag(text) -> [(word, tag)]``
in Penn Treebank tags. Both built-in taggers run offline and never download:

- ``pattern`` (default): the Brill-style tagger of the Pattern library as the ``textblob``
  package ships it, lexicon and rules inside its wheel (pip install "engine[caption]");
- ``nltk``: NLTK's averaged perceptron tagger, the paper's toolkit. Its model is NLTK data,
  not part of the nltk package: it is used only when already installed on the machine
  (``averaged_perceptron_tagger_eng`` in an nltk_data folder), else a clear error says so.

VN depends on the size of the set (more captions, more nouns pass 10): compare sets of about
equal size, and state the sizes, as ``format_table`` does.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass

NOUN_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS"})
VALID_ABOVE = 10  # a valid noun occurs more than this many times (PixArt-α, Table 1)
_HAS_LETTER = re.compile(r"[^\W\d_]")


@dataclass
class NounStatistics:
    captions: int          # captions counted
    total_nouns: int       # noun occurrences
    distinct_nouns: int    # DN
    valid_nouns: int       # VN: distinct nouns occurring more than ``valid_above`` times
    valid_above: int
    tagger: str

    @property
    def valid_share(self) -> float:
        """VN / DN (0 when there is no noun)."""
        return self.valid_nouns / self.distinct_nouns if self.distinct_nouns else 0.0

    @property
    def nouns_per_caption(self) -> float:
        return self.total_nouns / self.captions if self.captions else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "valid_share": self.valid_share, "nouns_per_caption": self.nouns_per_caption}


class PatternTagger:
    """The Pattern library's English tagger (lexicon, then contextual rules), as textblob ships it."""

    def __init__(self):
        try:
            from textblob.en import tag
        except ImportError as error:
            raise ImportError("the caption density report's default tagger needs the textblob package "
                              "(its tagger model is inside the wheel): pip install 'engine[caption]' "
                              "or pip install textblob") from error
        import importlib.metadata

        self._tag = tag
        self.name = (f"textblob {importlib.metadata.version('textblob')} PatternTagger "
                     f"(Brill-style lexicon and rules of the Pattern library, bundled in the wheel)")

    def tag(self, text: str) -> list[tuple[str, str]]:
        return [(word, tag) for word, tag in self._tag(text, tokenize=True)]


class NltkTagger:
    """NLTK's averaged perceptron tagger, from NLTK data already on this machine (never downloaded)."""

    RESOURCE = "taggers/averaged_perceptron_tagger_eng/"

    def __init__(self):
        try:
            import nltk
            from nltk.tokenize import NLTKWordTokenizer
        except ImportError as error:
            raise ImportError("--tagger nltk needs the nltk package (pip install nltk)") from error
        try:
            nltk.data.find(self.RESOURCE)
        except LookupError:
            raise ValueError(f"--tagger nltk needs NLTK's averaged_perceptron_tagger_eng data, which is not "
                             f"installed here (searched {', '.join(map(str, nltk.data.path))}); install it into "
                             f"one of those folders, or use the default --tagger pattern") from None
        self._nltk = nltk
        self._words = NLTKWordTokenizer()
        self.name = f"nltk {nltk.__version__} averaged perceptron tagger (averaged_perceptron_tagger_eng)"

    def tag(self, text: str) -> list[tuple[str, str]]:
        words = [w for sentence in re.split(r"(?<=[.!?])\s+", text) for w in self._words.tokenize(sentence)]
        return self._nltk.pos_tag(words, lang="eng")


TAGGERS = {"pattern": PatternTagger, "nltk": NltkTagger}


def make_tagger(name: str):
    if name not in TAGGERS:
        raise ValueError(f"unknown tagger {name!r}; choose one of {sorted(TAGGERS)}")
    return TAGGERS[name]()


def nouns(text: str, tagger) -> list[str]:
    """The nouns of ``text`` in order, lower-cased."""
    return [word.lower() for word, tag in tagger.tag(text) if tag in NOUN_TAGS and _HAS_LETTER.search(word)]


def noun_statistics(captions: Iterable[str], tagger, valid_above: int = VALID_ABOVE) -> NounStatistics:
    """Count the nouns of ``captions`` (one per image) as PixArt-α's Table 1 does."""
    counts: Counter[str] = Counter()
    number = 0
    for caption in captions:
        counts.update(nouns(caption, tagger))
        number += 1
    return NounStatistics(captions=number, total_nouns=sum(counts.values()), distinct_nouns=len(counts),
                          valid_nouns=sum(1 for c in counts.values() if c > valid_above),
                          valid_above=valid_above, tagger=tagger.name)


def format_table(rows: dict[str, NounStatistics]) -> str:
    """A plain-text table in the paper's columns, one row per caption set."""
    lines = [f"{'captions':<12} {'count':>9} {'VN/DN':>22} {'total nouns':>12} {'nouns/caption':>14}"]
    for label, s in rows.items():
        share = f"{s.valid_nouns}/{s.distinct_nouns} = {100 * s.valid_share:.1f}%"
        lines.append(f"{label:<12} {s.captions:>9} {share:>22} {s.total_nouns:>12} {s.nouns_per_caption:>14.1f}")
    if rows:
        first = next(iter(rows.values()))
        lines.append(f"VN: distinct nouns occurring more than {first.valid_above} times; tagger: {first.tagger}")
    return "\n".join(lines)
