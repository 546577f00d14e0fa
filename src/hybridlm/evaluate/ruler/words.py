"""Word material for the RULER-style tasks, built in (no downloads).

Keys of needles are "adjective-noun" pairs (as RULER's are), variable names five capital letters,
and the words of the aggregation tasks pronounceable pseudo-words (consonant-vowel syllables), of
which there are enough for any context length.
"""

from __future__ import annotations

import random

ADJECTIVES = (
    "able ancient angry bitter black bold brave bright broad calm careful cheap clean clever cold cool "
    "crisp curious damp dark deep dry dull eager early easy empty fair fancy fast fierce flat fresh "
    "friendly gentle giant glad golden grand green happy hard heavy hollow honest huge humble hungry "
    "icy jolly kind large late lazy light little lively loud lucky mild modern narrow neat nervous "
    "noble odd old pale patient plain polite proud purple quick quiet rapid rare red rich rough round "
    "royal rusty sad salty sharp shiny short silent silver simple slow small smooth soft sour steady "
    "steep strange strong sunny sweet swift tall tender thick thin tidy tiny tough warm wet wide wild "
    "wise young"
).split()

NOUNS = (
    "anchor apple arrow badge basket beacon bell berry blanket bottle branch bridge brush bucket "
    "button cabin camera candle canyon carpet castle cedar chair cherry circle cliff clock cloud "
    "comet copper cottage crayon crown crystal desert diamond dolphin dragon drum eagle engine "
    "falcon feather fence ferry field flame flute forest fountain garden glacier guitar hammer "
    "harbor helmet island jacket jungle kettle kitten ladder lantern lemon library lighthouse "
    "magnet maple marble meadow mirror mountain needle ocean orchard otter oyster paddle palace "
    "panda parrot pebble pencil pepper piano pillow planet pocket pond puzzle quilt rabbit raven "
    "ribbon river rocket saddle sailor sandal scarf shadow shell shovel signal spider spoon "
    "squirrel stable statue stone storm sugar tablet teapot temple thunder tiger tower trumpet "
    "tulip tunnel turtle umbrella valley violin volcano wagon walnut whale whistle window wizard"
).split()

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"


def key_words(rng: random.Random, count: int) -> list[str]:
    """`count` distinct "adjective-noun" keys."""
    pairs = rng.sample(range(len(ADJECTIVES) * len(NOUNS)), count)
    return [f"{ADJECTIVES[p // len(NOUNS)]}-{NOUNS[p % len(NOUNS)]}" for p in pairs]


def variable_names(rng: random.Random, count: int) -> list[str]:
    """`count` distinct names of five capital letters."""
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def pseudo_words(rng: random.Random, count: int, *, syllables: tuple[int, ...] = (2, 3)) -> list[str]:
    """`count` distinct pronounceable pseudo-words ("bavoti") of the given syllable counts."""
    words: list[str] = []
    seen: set[str] = set()
    capacity = sum((len(CONSONANTS) * len(VOWELS)) ** n for n in syllables)
    if count > capacity // 2:
        raise ValueError(f"asked for {count} pseudo-words; at most {capacity // 2} can be drawn with {syllables} "
                         "syllables")
    while len(words) < count:
        n = rng.choice(syllables)
        word = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(n))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words
