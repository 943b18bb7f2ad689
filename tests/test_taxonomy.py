"""Label spaces and relatedness tables."""

import numpy as np
import pytest

from fbnet_jax.core import taxonomy


def test_label_spaces():
    assert taxonomy.EXPRESSIONS[0] == "Neutral" and taxonomy.EXPRESSIONS[6] == "Surprise"
    assert len(taxonomy.AUS) == 17 and list(taxonomy.AUS) == sorted(taxonomy.AUS)
    assert 11 not in taxonomy.AUS
    # The 17 AUs are exactly the union of the four datasets' AU sets.
    union = set().union(*taxonomy.DATASET_AUS.values())
    assert union == set(taxonomy.AUS)


def test_basic_relatedness_matrix():
    r = taxonomy.basic_relatedness()
    col = {au: i for i, au in enumerate(taxonomy.AUS)}
    row = {name: i for i, name in enumerate(taxonomy.EXPRESSIONS)}
    assert r.shape == (7, 17) and r.dtype == np.float32
    assert not r[row["Neutral"]].any()
    happiness = r[row["Happiness"]]
    assert happiness[col[12]] == 1 and happiness[col[25]] == 1
    assert happiness[col[6]] == pytest.approx(0.51)
    assert np.count_nonzero(happiness) == 3
    # Sadness lists AU11 (observational), which is outside the AU list: dropped.
    sadness = r[row["Sadness"]]
    assert np.count_nonzero(sadness) == 5
    assert sadness[col[17]] == pytest.approx(0.67)
    assert r[row["Anger"], col[23]] == pytest.approx(0.29)


def test_projection_onto_another_au_list():
    aus = (25, 12, 11)
    r = taxonomy.relatedness_matrix(taxonomy.EXPRESSIONS, aus)
    happiness = taxonomy.EXPRESSIONS.index("Happiness")
    sadness = taxonomy.EXPRESSIONS.index("Sadness")
    np.testing.assert_allclose(r[happiness], [1, 1, 0])
    np.testing.assert_allclose(r[sadness], [0, 0, 0.26])
    proto = taxonomy.prototypical_mask(taxonomy.EXPRESSIONS, aus)
    np.testing.assert_array_equal(proto[happiness], [True, True, False])
    np.testing.assert_array_equal(taxonomy.au_indices((12, 26), aus), [1])


def test_compound_tables():
    r = taxonomy.compound_relatedness()
    assert r.shape == (11, 17)
    assert len(taxonomy.COMPOUND_RELATEDNESS) == 15
    parts = taxonomy.compound_components()
    names = taxonomy.EXPRESSIONS
    first = taxonomy.RAF_COMPOUND_CLASSES[0]
    assert first == "Happily Surprised"
    assert {names[i] for i in parts[0]} == {"Happiness", "Surprise"}
    # Every compound's prototypical AUs inside the list have weight 1.
    col = {au: i for i, au in enumerate(taxonomy.AUS)}
    assert all(r[0, col[au]] == 1 for au in (1, 2, 12, 25))
    with pytest.raises(ValueError, match="Awed"):
        taxonomy.compound_components(("Awed",))


def test_check_au_list():
    assert taxonomy.check_au_list([1, 2]) == (1, 2)
    with pytest.raises(ValueError, match="unknown AU"):
        taxonomy.check_au_list([1, 99])
    with pytest.raises(ValueError, match="repeats"):
        taxonomy.check_au_list([1, 1])
