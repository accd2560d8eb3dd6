"""Seeded synthetic phonebook facts (names to random digit strings), as in the paper's PhoneBook.

Random digits carry log2(10) bits each and no base model knows them, so they measure memory, not
prior knowledge.
"""

import itertools
import math
import random

from memupdate.memory.facts import Fact

FIRST = (
    "Ada Alan Alice Amara Anton Aria Boris Bruno Carla Chen Clara Dario Dmitri Elena Emil Esme "
    "Farah Felix Gita Hana Hugo Ines Ivan Jonas Juno Kai Kira Lars Lena Leo Liam Lina Luca Maya "
    "Mei Milo Nadia Nico Nina Noor Olga Omar Otto Pia Priya Quinn Rafael Rosa Sami Sara Sven Tara "
    "Theo Uma Vera Viktor Wanda Xena Yara Yusuf Zoe Zeno"
).split()
LAST = (
    "Abbott Bauer Castillo Dubois Eriksen Falk Garcia Horvat Ibarra Jensen Kowalski Larsen Moreau "
    "Novak Okafor Petrov Quist Rossi Schmidt Tanaka Ueda Varga Weber Xu Yilmaz Zimmer Alvarez "
    "Brandt Costa Demir Engel Fischer Gomez Haas Iversen Jovanovic Keller Lindqvist Meyer Nagy "
    "Olsen Pereira Quintero Ruiz Santos Toth Urban Vogel Wolf Young Zhou"
).split()
DIGIT_BITS = math.log2(10)


def phonebook_facts(count: int, seed: int = 0, digits: int = 10) -> list[Fact]:
    """`count` facts "The phone number of NAME is" -> " DDDDDDDDDD", unique names, seeded."""
    rng = random.Random(seed)
    names = [f"{f} {last}" for f, last in itertools.product(FIRST, LAST)]
    rng.shuffle(names)
    initials = "ABCDEFGHJKLMNPRSTVW"
    while len(names) < count:  # beyond the plain pairs, add middle initials
        extra = [f"{n.split()[0]} {rng.choice(initials)}. {n.split()[1]}" for n in names]
        names = list(dict.fromkeys(names + extra))
    facts = []
    for i, name in enumerate(names[:count]):
        number = "".join(rng.choice("0123456789") for _ in range(digits))
        facts.append(
            Fact(prompt=f"The phone number of {name} is", target=f" {number}", source=f"pb:{i}")
        )
    return facts
