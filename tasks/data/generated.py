"""The built-in structured-extraction task: short texts about orders, people and companies -> JSON.

It ships as code so the embedded pipeline trains on something real with no download. It is built
to be learnable by a 135M model yet not trivial: every value in the JSON is copied from the text or
normalised by a fixed rule (number words -> digits, "1,200" -> 1200, "$59.97" -> 59.97, any date
style -> YYYY-MM-DD, plural item -> singular), texts come in several styles (sentences, noun
phrases, forms) with synonyms and a varying field order, and optional fields are sometimes absent
(null in the JSON). Keys keep a fixed order per record type, so a correct answer is one exact string.

Everything is drawn from `random.Random(seed)`: the same seed and size give the same examples.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from typing import Any

from .examples import Example

GENERATOR_VERSION = 1  # bump when the output for a given seed changes (invalidates cache keys)
SOURCE_NAME = "generated:extraction"

RECORD_KEYS: dict[str, tuple[str, ...]] = {
    "order": ("type", "customer", "item", "quantity", "total", "date"),
    "person": ("type", "name", "age", "city", "occupation", "email"),
    "company": ("type", "name", "industry", "city", "employees", "founded"),
}

FIRST = ("Ana", "Liam", "Sofia", "Noah", "Mei", "Omar", "Chloe", "Ravi", "Elena", "Kwame", "Hana", "Lucas",
         "Priya", "Mateo", "Yuki", "Fatima", "Jonas", "Aisha", "Diego", "Ingrid", "Tariq", "Nora", "Ivan",
         "Leila", "Marco", "Zara", "Felix", "Amara", "Hugo", "Sana", "Oscar", "Lina", "Pablo", "Greta",
         "Kofi", "Maya", "Erik", "Nadia", "Tom", "Alice", "José", "Chen", "Ruth", "Samir", "Olga", "Ben",
         "Clara", "Emeka", "Iris", "Jakub")
LAST = ("Silva", "Chen", "Okafor", "Müller", "Rossi", "Tanaka", "Haddad", "Novak", "Kim", "Patel", "García",
        "Dubois", "Larsen", "Mensah", "Ivanova", "Costa", "Nguyen", "Schmidt", "Kowalski", "Ahmed", "Berg",
        "Moreau", "Sato", "Fischer", "Romero", "Walsh", "Quinn", "Park", "Adeyemi", "Lindqvist", "Hoffman",
        "Reyes", "Bakker", "Farouk", "Petrov", "Brennan", "Oliveira", "Yilmaz", "Keller", "Santos")
CITIES = ("Lisbon", "Osaka", "Lagos", "Toronto", "Berlin", "Lima", "Nairobi", "Oslo", "Austin", "Porto",
          "Seoul", "Dublin", "Cairo", "Denver", "Milan", "Hanoi", "Perth", "Quito", "Leeds", "Boston",
          "Krakow", "Accra", "Lyon", "Dhaka", "Bogota", "Zurich", "Manila", "Tunis", "Vienna", "Chicago",
          "Madrid", "Mumbai", "Helsinki", "Santiago", "Seattle", "Prague", "Athens", "Montreal")
OCCUPATIONS = ("nurse", "teacher", "software engineer", "architect", "chef", "pilot", "accountant",
               "electrician", "journalist", "pharmacist", "data analyst", "photographer", "lawyer", "plumber",
               "librarian", "dentist", "graphic designer", "mechanic", "translator", "veterinarian", "baker",
               "civil engineer", "florist", "economist")
INDUSTRIES = ("logistics", "software", "renewable energy", "healthcare", "fintech", "furniture",
              "video games", "cybersecurity", "biotech", "food delivery", "textiles", "robotics",
              "real estate", "education", "tourism", "agriculture", "insurance", "advertising",
              "construction", "e-commerce")
COMPANY_HEADS = ("Northwind", "Bluepeak", "Redfern", "Silverline", "Brightwave", "Ironbridge", "Greenfield",
                 "Oakridge", "Clearwater", "Suncrest", "Stonegate", "Highmark", "Riverton", "Nimbus",
                 "Quanta", "Vertex", "Lumen", "Solara", "Pinecone", "Harbor", "Atlas", "Copperleaf",
                 "Maplestone", "Zephyr", "Orbital", "Kestrel", "Tidewater", "Granite", "Everlight",
                 "Blackstone")
COMPANY_TAILS = ("Labs", "Systems", "Group", "Works", "Partners", "Solutions", "Industries", "Holdings",
                 "Ventures", "Collective", "Co.", "Dynamics", "Technologies")
EMAIL_DOMAINS = ("example.com", "mail.com", "inbox.org", "post.net", "webmail.io")
# (singular, plural); irregular plurals are kept out so the rule stays "drop the s".
_ITEM_NAMES = ("desk lamp", "mouse pad", "coffee grinder", "office chair", "yoga mat", "water bottle",
               "phone case", "backpack", "laptop stand", "notebook", "umbrella", "kettle", "blender",
               "toaster", "headphone", "keyboard", "monitor", "printer", "bookshelf", "rug", "mirror",
               "pillow", "blanket", "frying pan", "cutting board", "tea set", "wall clock", "bike helmet",
               "tent", "sleeping bag", "flashlight", "power bank", "USB cable", "webcam", "speaker",
               "camera lens", "tripod", "paint brush", "sketchbook", "candle", "plant pot", "garden hose",
               "drill", "screwdriver set", "toolbox", "lunch box", "rain jacket", "running shoe",
               "sunglass case", "watch strap", "picture frame", "desk fan", "space heater")
ITEMS = [(item, item + ("es" if item.endswith(("s", "sh", "ch", "x")) else "s")) for item in _ITEM_NAMES]
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve")


def generate_examples(size: int, seed: int = 0) -> list[Example]:
    """`size` examples with pairwise distinct texts and pairwise distinct targets.

    Distinct targets matter as much as distinct texts: any split of the list is then disjoint in
    both, so no test answer was seen in training.
    """
    rng = random.Random(seed)
    makers: tuple[Callable[[random.Random], tuple[str, dict[str, Any]]], ...] = (_order, _person, _company)
    texts: set[str] = set()
    targets: set[str] = set()
    examples: list[Example] = []
    attempts = 0
    while len(examples) < size:
        attempts += 1
        if attempts > 50 * size:
            raise RuntimeError(f"could not draw {size} distinct examples; the value pools are too small")
        text, record = rng.choice(makers)(rng)
        target = render_target(record)
        if text in texts or target in targets:
            continue
        texts.add(text)
        targets.add(target)
        examples.append(Example(id=f"gen-{len(examples):05d}", prompt=text, completion=target))
    return examples


def render_target(record: dict[str, Any]) -> str:
    """Compact one-line JSON (no spaces: ~20% fewer tokens to generate) in the fixed key order of the
    record's type; absent fields are null."""
    keys = RECORD_KEYS[record["type"]]
    return json.dumps({key: record.get(key) for key in keys}, ensure_ascii=False, separators=(",", ":"))


# --- value phrasing -------------------------------------------------------------------------------

def _name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def _article(phrase: str) -> str:
    """`a`/`an` by sound, including numbers (`an 18-year-old`, `an 80-year-old`, `a 28-year-old`)."""
    number = re.match(r"\d+", phrase)
    if number:
        digits = number.group()
        return "an" if digits.startswith("8") or digits in ("11", "18") else "a"
    return "an" if phrase[0].lower() in "aeiou" else "a"


def _count(rng: random.Random, n: int) -> str:
    if n == 1:
        return rng.choice(("one", "1", "a single"))
    if n == 12 and rng.random() < 0.3:
        return "a dozen"
    return rng.choice((NUMBER_WORDS[n - 1], str(n)))


def _int_text(rng: random.Random, n: int) -> str:
    return f"{n:,}" if n >= 1000 and rng.random() < 0.6 else str(n)


def _money(rng: random.Random, amount: float) -> str:
    whole = f"{amount:,.2f}" if rng.random() < 0.5 else f"{amount:.2f}"
    return rng.choice((f"${whole}", f"${whole}", f"{whole} USD", f"USD {whole}", f"{whole} dollars"))


def _date(rng: random.Random) -> tuple[str, str]:
    year, month, day = rng.randint(2022, 2025), rng.randint(1, 12), rng.randint(1, 28)
    name = MONTHS[month - 1]
    suffix = "th" if 11 <= day <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    text = rng.choice((f"{name} {day}, {year}", f"{day} {name} {year}", f"{name[:3]} {day}, {year}",
                       f"{year}-{month:02d}-{day:02d}", f"the {day}{suffix} of {name} {year}"))
    return text, f"{year}-{month:02d}-{day:02d}"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _form(rng: random.Random, title: str, fields: list[tuple[str, str]]) -> str:
    """A record written as a form line, fields in random order: `Order - item: tent; qty: 2.`"""
    rng.shuffle(fields)
    separator = rng.choice(("; ", ", ", " | "))
    body = separator.join(f"{label}: {value}" for label, value in fields)
    return f"{title}{rng.choice((' - ', ': ', ' — '))}{body}."


def _optional(rng: random.Random, keys: tuple[str, ...], p: float = 0.7) -> set[str]:
    return {key for key in keys if rng.random() < p}


# --- record makers: each returns (text, record) ---------------------------------------------------

def _order(rng: random.Random) -> tuple[str, dict[str, Any]]:
    customer = _name(rng)
    item, plural = rng.choice(ITEMS)
    quantity = rng.choice((1, 1, 2, 2, 3, 4, 5, 6, 8, 10, 12))
    total = round(quantity * rng.randint(300, 40000) / 100, 2)
    date_text, date = _date(rng)
    present = _optional(rng, ("total", "date"))
    record = {"type": "order", "customer": customer, "item": item, "quantity": quantity,
              "total": total if "total" in present else None, "date": date if "date" in present else None}
    money = _money(rng, total)
    style = rng.random()
    if style < 0.25:
        fields = [(rng.choice(("customer", "buyer", "client")), customer), (rng.choice(("item", "product")), item),
                  (rng.choice(("qty", "quantity", "units")), str(quantity))]
        if "total" in present:
            fields.append((rng.choice(("total", "amount", "paid")), money))
        if "date" in present:
            fields.append((rng.choice(("date", "ordered on", "placed")), date_text))
        return _form(rng, rng.choice(("Order", "New order", "Purchase", "Sale")), fields), record
    goods = f"{_count(rng, quantity)} {item if quantity == 1 else plural}"
    verb = rng.choice(("ordered", "bought", "purchased", "placed an order for", "picked up", "paid for"))
    extras = []
    if "total" in present:
        extras.append(rng.choice((f"for {money}", f"for a total of {money}", f"paying {money}",
                                  f"at a total cost of {money}", f"(total {money})")))
    date_first = "date" in present and rng.random() < 0.35
    if "date" in present and not date_first:
        extras.append(rng.choice((f"on {date_text}", f"on {date_text}", f"dated {date_text}")))
    rng.shuffle(extras)
    if style < 0.45:
        clause = f"{goods} {'was' if quantity == 1 else 'were'} {rng.choice(('ordered', 'bought', 'purchased'))} by {customer}"
    else:
        clause = f"{customer} {verb} {goods}"
    sentence = " ".join([clause, *extras])
    if date_first:
        sentence = f"{rng.choice(('On', 'On', 'Back on'))} {date_text}, {sentence}"
    sentence = sentence[0].upper() + sentence[1:] + "."
    if "total" in present and rng.random() < 0.2 and "(total" not in sentence and money not in sentence:
        sentence += rng.choice((f" The bill came to {money}.", f" Total: {money}."))
    return sentence, record


def _person(rng: random.Random) -> tuple[str, dict[str, Any]]:
    name = _name(rng)
    first, last = name.split(" ")
    age, city, job = rng.randint(18, 79), rng.choice(CITIES), rng.choice(OCCUPATIONS)
    email = rng.choice((f"{first}.{last}", f"{first[0]}{last}", f"{first}{rng.randint(1, 99)}")).lower()
    email = email.replace("é", "e").replace("ü", "u") + "@" + rng.choice(EMAIL_DOMAINS)
    present = _optional(rng, ("age", "city", "occupation", "email"), p=0.65)
    if len(present) < 2:
        present |= set(rng.sample(["age", "city", "occupation"], 2))
    record = {"type": "person", "name": name, "age": age if "age" in present else None,
              "city": city if "city" in present else None,
              "occupation": job if "occupation" in present else None,
              "email": email if "email" in present else None}
    style = rng.random()
    if style < 0.25:
        labels = {"age": ("age", "years"), "city": ("city", "lives in", "location"),
                  "occupation": ("job", "occupation", "works as"), "email": ("email", "e-mail", "contact")}
        values = {"age": str(age), "city": city, "occupation": job, "email": email}
        fields = [(rng.choice(("name", "person")), name)]
        fields += [(rng.choice(labels[key]), values[key]) for key in sorted(present)]
        return _form(rng, rng.choice(("Profile", "Contact", "Person", "Member")), fields), record
    if style < 0.5 and "occupation" in present:
        described = f"{age}-year-old {job}" if "age" in present else job
        head = f"{name}, {_article(described)} {described}"
        if "city" in present:
            head += f" {rng.choice(('from', 'based in', 'living in'))} {city}"
        tail = f" {rng.choice(('Email', 'Reach them at', 'Contact'))}: {email}." if "email" in present else ""
        return f"{head}.{tail}", record
    phrases = {
        "age": rng.choice((f"is {age} years old", f"is {age}", f"turned {age} this year", f"is aged {age}")),
        "city": rng.choice((f"lives in {city}", f"is based in {city}", f"resides in {city}", f"comes from {city}")),
        "occupation": rng.choice((f"works as {_article(job)} {job}", f"is {_article(job)} {job}",
                                  f"has a job as {_article(job)} {job}")),
        "email": rng.choice((f"can be reached at {email}", f"uses the email {email}", f"writes from {email}")),
    }
    keys = sorted(present)
    rng.shuffle(keys)
    if len(keys) >= 3 and rng.random() < 0.4:
        cut = rng.randint(1, len(keys) - 1)
        again = rng.choice((first, "This person", name))
        text = f"{name} {_join([phrases[k] for k in keys[:cut]])}. {again} {_join([phrases[k] for k in keys[cut:]])}."
    else:
        text = f"{name} {_join([phrases[k] for k in keys])}."
    return text, record


def _company(rng: random.Random) -> tuple[str, dict[str, Any]]:
    name = f"{rng.choice(COMPANY_HEADS)} {rng.choice(COMPANY_TAILS)}"
    industry, city = rng.choice(INDUSTRIES), rng.choice(CITIES)
    employees = rng.choice((rng.randint(3, 99), rng.randint(100, 999), rng.randint(1000, 20000)))
    founded = rng.randint(1950, 2023)
    present = _optional(rng, ("city", "employees", "founded"), p=0.7)
    record = {"type": "company", "name": name, "industry": industry,
              "city": city if "city" in present else None,
              "employees": employees if "employees" in present else None,
              "founded": founded if "founded" in present else None}
    staff = _int_text(rng, employees)
    style = rng.random()
    if style < 0.25:
        labels = {"city": ("HQ", "city", "location"), "employees": ("staff", "employees", "headcount"),
                  "founded": ("founded", "established", "since")}
        values = {"city": city, "employees": staff, "founded": str(founded)}
        fields = [("name", name), (rng.choice(("industry", "sector", "field")), industry)]
        fields += [(rng.choice(labels[key]), values[key]) for key in sorted(present)]
        return _form(rng, rng.choice(("Company", "Business", "Firm", "Employer")), fields), record
    phrases = [
        rng.choice((f"is based in {city}", f"is headquartered in {city}", f"has its head office in {city}")),
        rng.choice((f"employs {staff} people", f"has {staff} employees", f"has a staff of {staff}",
                    f"has about {staff} workers")),
        rng.choice((f"was founded in {founded}", f"was established in {founded}",
                    f"has been in business since {founded}", f"started in {founded}")),
    ]
    extras = [phrase for key, phrase in zip(("city", "employees", "founded"), phrases) if key in present]
    rng.shuffle(extras)
    kind = rng.choice(("that", "appositive", "list", "list", "split"))
    if kind == "that" and extras:
        return f"{name} is {_article(industry)} {industry} company that {_join(extras)}.", record
    if kind == "appositive" and extras:
        return f"{name}, {_article(industry)} {industry} {rng.choice(('firm', 'business'))}, {_join(extras)}.", record
    lead = rng.choice((f"is {_article(industry)} {industry} company", f"works in {industry}",
                       f"operates in the {industry} sector"))
    if kind == "split" and extras:
        return f"{name} {lead}. It {_join(extras)}.", record
    verbs = [lead, *extras]
    if rng.random() < 0.3:
        rng.shuffle(verbs)
    return f"{name} {_join(verbs)}.", record
