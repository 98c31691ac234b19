"""The demo's training text, generated in the repository (nothing downloaded, no license question):
short fables built from sentence templates with a fixed seed. ``fastlora/data/fables.txt`` is this
module's output; ``python -m fastlora.demo.make_corpus`` writes it again, byte for byte.

The text is plain ASCII English with a small vocabulary and a regular structure, so a byte-level model
learns it visibly within a few hundred LoRA steps while the fables still differ from each other."""

from __future__ import annotations

import os
import random

SEED = 1693
N_FABLES = 500

_ANIMALS = ["fox", "crow", "hare", "tortoise", "lion", "mouse", "wolf", "lamb", "ant", "grasshopper", "owl",
            "goat", "frog", "stork", "dog", "cat", "horse", "donkey", "bear", "deer", "heron", "sparrow", "otter"]
_ADJECTIVES = ["old", "young", "clever", "proud", "hungry", "patient", "greedy", "kind", "lazy", "brave", "foolish",
               "wise", "quick", "tired", "curious", "gentle", "boastful", "honest", "careful", "little"]
_PLACES = ["the river", "the meadow", "the old oak", "the farmer's barn", "the hill", "the forest", "the well",
           "the village", "the orchard", "the pond", "the mill", "the garden", "the road to town", "the stone bridge"]
_SEASONS = ["one spring morning", "on a hot summer day", "late in the autumn", "in the middle of winter",
            "one rainy evening", "at the break of dawn", "on a windy afternoon", "under a full moon"]
_THINGS = ["a piece of cheese", "a bunch of grapes", "a loaf of bread", "a basket of apples", "a shiny coin",
           "a jar of honey", "a bone", "a handful of grain", "a golden feather", "a warm blanket", "a sweet melon"]
_WANTS = ["wanted it for itself", "was too proud to ask for help", "thought it could trick the others",
          "did not want to share", "was afraid of losing it", "wished to be admired by everyone"]
_ACTIONS = ["ran as fast as it could", "sat down to think", "called out to its friends", "climbed to the top",
            "hid behind a bush", "waited until dark", "made a plan", "told a long story", "began to sing",
            "counted every step", "looked into the water", "walked slowly along the path"]
_ENDINGS = ["In the end it had nothing at all.", "So it learned to be content with what it had.",
            "From that day on the two were friends.", "And everyone laughed at its foolish pride.",
            "It arrived first, though nobody had expected it.", "The others never trusted it again.",
            "It shared the rest, and there was enough for all.", "It went home tired, hungry and a little wiser."]
_MORALS = ["Slow and steady wins the race.", "Pride goes before a fall.", "Do not count your chickens before they "
           "hatch.", "A friend in need is a friend indeed.", "Look before you leap.", "Little by little does the "
           "trick.", "Kindness is never wasted.", "Greed often overreaches itself.", "It is easy to despise what "
           "you cannot get.", "Honesty is the best policy.", "Work today and you will eat tomorrow.",
           "Do not trust flatterers.", "United we stand, divided we fall."]
_SAID = ["said", "asked", "cried", "whispered", "answered", "laughed"]
_SPEECH = ["Why do you hurry so?", "I can do it better than you.", "Share it with me and I will help you.",
           "You will see who is faster.", "What a fine voice you must have!", "Wait for me, friend.",
           "There is enough for both of us.", "I have never seen such a thing.", "Be careful, it is a trap.",
           "Tomorrow I will work, today I will rest."]


def _quote(speech: str) -> str:
    """A quotation before "said the fox": a full stop inside it becomes a comma."""
    return '"' + (speech[:-1] + "," if speech.endswith(".") else speech) + '"'


def _an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _fable(rng: random.Random, number: int) -> str:
    hero, other = rng.sample(_ANIMALS, 2)
    adj, adj2 = rng.sample(_ADJECTIVES, 2)
    place, season, thing = rng.choice(_PLACES), rng.choice(_SEASONS), rng.choice(_THINGS)
    title = f"{number}. The {adj.capitalize()} {hero.capitalize()} and the {other.capitalize()}"
    lines = [
        f"{season.capitalize()}, {_an(adj)} {hero} found {thing} near {place}.",
        f"The {hero} {rng.choice(_WANTS)}, so it {rng.choice(_ACTIONS)}.",
        f"Soon {_an(adj2)} {other} came by. {_quote(rng.choice(_SPEECH))} {rng.choice(_SAID)} the {other}.",
        f"{_quote(rng.choice(_SPEECH))} {rng.choice(_SAID)} the {hero}, and it {rng.choice(_ACTIONS)}.",
    ]
    if rng.random() < 0.5:
        lines.append(f"Then the {other} {rng.choice(_ACTIONS)}, while the {hero} {rng.choice(_ACTIONS)}.")
    lines.append(rng.choice(_ENDINGS))
    return f"{title}\n\n{' '.join(lines)}\nMoral: {rng.choice(_MORALS)}\n"


def generate(n_fables: int = N_FABLES, seed: int = SEED) -> str:
    """The corpus text: ``n_fables`` fables, each a title line, a paragraph and a moral; ASCII."""
    rng = random.Random(seed)
    return "\n".join(_fable(rng, i + 1) for i in range(n_fables))


def shipped_path() -> str:
    """Where the generated corpus ships: ``fastlora/data/fables.txt``."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "fables.txt")


if __name__ == "__main__":
    with open(shipped_path(), "w", encoding="ascii", newline="\n") as f:
        f.write(generate())
    print(f"wrote {shipped_path()}")
