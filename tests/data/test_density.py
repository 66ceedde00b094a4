"""Caption density (engine.data.density): PixArt-α's noun statistics against counts made by hand."""

from __future__ import annotations

import pytest

from engine.data import density

# Nouns by hand (Penn tags NN/NNS): dog, field | cats, sofa, window | photo, tree, house, car, sky |
# dog, cat (x 11). Lower-cased, not lemmatised: "cats" and "cat" are two nouns.
SAMPLE = ["A brown dog runs across a green field.",
          "Two cats sleep on a red sofa near a window.",
          "The photo shows a tall tree, a house and a car under a cloudy sky.",
          *["A dog and a cat."] * 11]


def test_pattern_tagger_matches_hand_counts():
    stats = density.noun_statistics(SAMPLE, density.make_tagger("pattern"))
    assert stats.captions == 14
    assert stats.total_nouns == 2 + 3 + 5 + 2 * 11 == 32
    # dog (12), cat (11), cats, field, sofa, window, photo, tree, house, car, sky
    assert stats.distinct_nouns == 11
    assert stats.valid_nouns == 2  # dog and cat occur more than 10 times
    assert stats.nouns_per_caption == pytest.approx(32 / 14)
    assert stats.valid_share == pytest.approx(2 / 11)
    assert "textblob" in stats.tagger and "PatternTagger" in stats.tagger


class _WordListTagger:
    """Tags the words of a fixed list as nouns, everything else as DT: counting without a model."""

    name = "word list"

    def __init__(self, nouns: set[str]):
        self._nouns = nouns

    def tag(self, text: str) -> list[tuple[str, str]]:
        return [(w, "NNS" if w.lower() in self._nouns else "DT") for w in text.replace(".", " .").split()]


def test_valid_means_more_than_ten_occurrences():
    tagger = _WordListTagger({"apple", "pear", "plum", "7"})
    captions = ["apple"] * 10 + ["Pear pear."] * 6 + ["plum 7"]  # "7" has no letter: not a noun
    stats = density.noun_statistics(captions, tagger)
    assert (stats.captions, stats.total_nouns, stats.distinct_nouns) == (17, 10 + 12 + 1, 3)
    assert stats.valid_nouns == 1  # pear: 12 (Pear and pear are one noun); apple: exactly 10, not valid
    assert density.noun_statistics(captions, tagger, valid_above=9).valid_nouns == 2
    assert density.noun_statistics([], tagger).nouns_per_caption == 0.0


def test_table_names_the_tagger_and_the_rule():
    tagger = _WordListTagger({"dog"})
    table = density.format_table({"original": density.noun_statistics(["a dog"], tagger),
                                  "captioned": density.noun_statistics(["dog dog"] * 6, tagger)})
    assert "1/1 = 100.0%" in table and "0/1 = 0.0%" in table
    assert "more than 10 times" in table and "word list" in table


def test_nltk_tagger_needs_its_data_installed_and_never_downloads():
    nltk = pytest.importorskip("nltk")
    try:
        nltk.data.find(density.NltkTagger.RESOURCE)
        pytest.skip("NLTK's tagger data is installed on this machine")
    except LookupError:
        pass
    with pytest.raises(ValueError, match="averaged_perceptron_tagger_eng"):
        density.make_tagger("nltk")
    with pytest.raises(ValueError, match="unknown tagger"):
        density.make_tagger("spacy")
