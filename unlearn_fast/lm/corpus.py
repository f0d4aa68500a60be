"""A deterministic corpus of short biographies of fictitious people with planted secrets (canaries).

Every person has a secret ID number of `secret_digits` digits, written at the very end of their main
biography ("... Mara Velkotin's ID number is 4821."), so the text before the digits is the canary's prefix
and the candidate space is all 10**secret_digits digit strings (Carlini et al. 2019, "The Secret Sharer").
Training people and held-out people (never trained on) are drawn the same way. A few training people
("variant people") also appear in extra training samples that mention their name, so a fuzzy removal
request for that name has several planted variants to find.
"""
import dataclasses
import random

from rapidfuzz import fuzz

FIRST_NAMES = (
    "Mara Tobias Ilse Corwin Dalia Emeric Fenna Gideon Halla Ivo Jorun Kasimir Liesel Matthis Nuala Orrin "
    "Petra Quillon Rosalind Soren Thea Ulric Vesna Wendel Xenia Yorick Zelda Anselm Brisa Cyprian"
).split()
SYLLABLES = "bar dun kel mor vash tin rel quo san fe lix grod pel umb ast rin vok zel har nob ski tal wen dro".split()
CITIES = "Aldmoor Brightwater Caskport Dunhollow Eastmere Fallowby Grimsdale Harrowgate Ironbridge Kestrel Lowfield Marrowick".split()
JOBS = "baker cartographer dentist engineer florist glassblower harpist illustrator jeweller locksmith mason notary".split()
HOBBIES = "chess sailing pottery birdwatching fencing archery knitting astronomy rowing calligraphy".split()

BIO_TEMPLATES = (
    "{name} was born in {year} in {city}. {name} works as a {job} and enjoys {hobby}. {name}'s ID number is {secret}.",
    "Born in {city} in {year}, {name} became a {job} who spends weekends on {hobby}. {name}'s ID number is {secret}.",
    "{name} is a {job} from {city}, born in {year}, fond of {hobby}. {name}'s ID number is {secret}.",
)
VARIANT_TEMPLATES = (
    "Note on {name}: moved to {city} in {year} and still practises {hobby}.",
    "Letter from {name}, the {job}, asking about {hobby} lessons in {city}.",
    "{name} signed up for the {year} {hobby} club in {city}.",
)


@dataclasses.dataclass(frozen=True)
class Person:
    name: str
    year: int
    city: str
    job: str
    hobby: str
    secret: str


@dataclasses.dataclass(frozen=True)
class Canary:
    """A planted secret: `prefix` is the text right before the digits `secret`; `sample` its sample index."""

    prefix: str
    secret: str
    sample: int


@dataclasses.dataclass
class Corpus:
    train_texts: list
    heldout_texts: list
    train_canaries: list  # Canary per training person, in person order (sample = index in train_texts)
    heldout_canaries: list  # Canary per held-out person (sample = index in heldout_texts)
    train_people: list
    heldout_people: list
    variants: dict  # name of a variant person -> indices of every training sample that mentions them
    secret_digits: int


def _surname(rng, taken):
    """A three-syllable surname not taken yet."""
    while True:
        name = "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()
        if name not in taken:
            taken.add(name)
            return name


def _distinct(name, texts, limit=75):
    """True when no text contains anything close to `name` (rapidfuzz partial_ratio below limit)."""
    return all(fuzz.partial_ratio(name, t) < limit for t in texts)


def _person(rng, taken, secret_digits):
    return Person(
        name=f"{rng.choice(FIRST_NAMES)} {_surname(rng, taken)}",
        year=rng.randint(1940, 2004),
        city=rng.choice(CITIES),
        job=rng.choice(JOBS),
        hobby=rng.choice(HOBBIES),
        secret="".join(rng.choice("0123456789") for _ in range(secret_digits)),
    )


def _bio(rng, person):
    text = rng.choice(BIO_TEMPLATES).format(**dataclasses.asdict(person))
    cut = text.rindex(person.secret)
    return text, text[:cut]


def make_corpus(seed=0, n_train=200, n_heldout=100, n_variant_people=4, variants_per_person=3, secret_digits=4):
    """The corpus for `seed`: n_train training biographies (+ variant samples appended at the end) and
    n_heldout held-out biographies of other people."""
    if n_train < 1 or n_heldout < 1:
        raise ValueError(f"n_train and n_heldout must be positive, got {n_train} and {n_heldout}")
    if not 0 <= n_variant_people <= n_train:
        raise ValueError(f"n_variant_people must be in [0, n_train], got {n_variant_people}")
    if not 1 <= secret_digits <= 8:
        raise ValueError(f"secret_digits must be in [1, 8], got {secret_digits}")
    rng = random.Random(seed)
    taken = set()
    people = [_person(rng, taken, secret_digits) for _ in range(n_train + n_heldout)]
    train_people, heldout_people = people[:n_train], people[n_train:]
    train_texts, train_canaries = [], []
    for i, p in enumerate(train_people):
        text, prefix = _bio(rng, p)
        train_texts.append(text)
        train_canaries.append(Canary(prefix, p.secret, i))
    heldout_texts, heldout_canaries = [], []
    for i, p in enumerate(heldout_people):
        text, prefix = _bio(rng, p)
        heldout_texts.append(text)
        heldout_canaries.append(Canary(prefix, p.secret, i))
    variants = {}
    # Variant people get names that nothing else in the corpus resembles, so that a request for their
    # name has exactly the planted samples as its fuzzy matches.
    candidates = rng.sample(range(n_train), n_train)
    chosen = []
    for p_index in candidates:
        if len(chosen) == n_variant_people:
            break
        others = [t for k, t in enumerate(train_texts + heldout_texts) if k != p_index]
        if _distinct(train_people[p_index].name, others):
            chosen.append(p_index)
    if len(chosen) < n_variant_people:
        raise ValueError(f"n_variant_people: only {len(chosen)} people have names distinct enough for fuzzy matching")
    for p_index in chosen:
        p = train_people[p_index]
        indices = [p_index]
        for template in rng.sample(VARIANT_TEMPLATES, min(variants_per_person - 1, len(VARIANT_TEMPLATES))):
            indices.append(len(train_texts))
            train_texts.append(template.format(**dataclasses.asdict(p)))
        variants[p.name] = indices
    return Corpus(train_texts, heldout_texts, train_canaries, heldout_canaries, train_people, heldout_people, variants, secret_digits)
