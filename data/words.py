"""Word pools the task prompts draw from.

Every pool is split once, by a fixed seed, into a training part (which the
reference model's synthetic data may use) and a held-out part (which it never
sees in task data), so behaviour can be measured on names, nouns and arguments
the model was not trained on.
"""

from __future__ import annotations

import random
from typing import NamedTuple

NAMES = """
Aaron Adam Alan Albert Alex Alice Amanda Amber Amy Andrea Andrew Angela Anna Anne Anthony Arthur Ashley
Barbara Ben Benjamin Beth Betty Bill Bob Brandon Brenda Brian Bruce Carl Carol Caroline Catherine Charles
Charlie Chris Christian Christina Christine Cindy Claire Colin Craig Daniel Danny David Dean Debbie Dennis
Diana Diane Donald Donna Doris Dorothy Douglas Dylan Edward Elizabeth Ellen Emily Emma Eric Ethan Eva Evan
Frank Fred Gary George Gerald Grace Greg Hannah Harold Harry Heather Helen Henry Holly Ian Jack Jacob James
Jane Janet Jason Jean Jeff Jennifer Jeremy Jerry Jessica Jim Joan Joe John Jonathan Jordan Joseph Joshua
Joyce Judith Julia Julie Justin Karen Kate Katherine Kathy Keith Kelly Kevin Kim Kyle Larry Laura Lauren
Lawrence Leo Lily Linda Lisa Louis Lucy Luke Margaret Maria Marie Mark Martha Martin Mary Matt Matthew Megan
Melissa Michael Michelle Mike Nancy Nathan Neil Nicholas Nicole Noah Oliver Olivia Oscar Pamela Patricia
Patrick Paul Peter Philip Rachel Ralph Randy Raymond Rebecca Richard Robert Roger Ronald Rose Roy Russell
Ruth Ryan Sam Samuel Sandra Sarah Scott Sean Sharon Simon Sophie Stephen Steve Susan Teresa Thomas Tim
Timothy Tom Tony Victoria Vincent Walter Wayne William Zoe
""".split()

IOI_PLACES = """
store garden restaurant school hospital office station market library park house beach river cafe museum
theater kitchen church farm bank airport hotel gym mall stadium bakery harbor lake bridge village
""".split()

IOI_OBJECTS = """
drink ring kiss bone basketball computer necklace snack book letter key ticket gift hat bag flower
cake coin pen map phone shirt watch cup plate knife chair box card lamp
""".split()

GT_NOUNS = """
war reign expedition voyage famine siege project strike campaign festival dynasty occupation journey trial
drought treaty rebellion crisis survey contract
""".split()

# Argument and description words for docstring prompts: common, short, identifier-like English words.
DOC_ARGS = """
load size files last first name path data value index count mode key item line text node user table
color image shape state field group order limit start end target source query result output input
token label level model score style title type unit url view width height depth offset position
parent child port host file code flag step rate time date page price stock
""".split()

DOC_FUNCS = """
run get set update create delete send process check parse build read write open close find load save
render fetch apply merge split handle convert compute resolve
""".split()

DOC_WORDS = """
the a new old big small first last red blue green dark light fast slow high low open close main
crime population oil column piece unit world house water money story fact month lot right study book
eye job word business issue side kind head service friend power hour game line end member law car city
""".split()


class Split(NamedTuple):
    train: list[str]
    heldout: list[str]


def split_pool(pool: list[str], heldout_fraction: float = 0.25, seed: int = 1234) -> Split:
    """Deterministic train/held-out partition of a word pool (independent of the order words are listed)."""
    words = sorted(set(pool))
    random.Random(seed).shuffle(words)
    n_heldout = max(1, round(len(words) * heldout_fraction))
    return Split(train=sorted(words[n_heldout:]), heldout=sorted(words[:n_heldout]))
