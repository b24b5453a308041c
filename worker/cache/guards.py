"""Guards: what two questions must share before one's answer may serve the other.

An embedding says two questions are about the same thing; it does not see that "cancel order
732201349959" and "cancel order 113542617735902" want different answers (they score above 0.99
on most models). So a semantic hit is served only when the facts a question names match:
numbers, codes and IDs, amounts, dates and times, quoted strings and named entities, whether it
is negated, and the direction of a relation ("from X to Y" is not "from Y to X").

:func:`features` extracts those facts as short hashes (never raw text: a :class:`Features` is
stored in Redis next to the entry), and :func:`mismatch` names the first guard that fails.
Every guard errs towards a miss: a miss costs one upstream call, a wrong hit costs a wrong
answer.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields

# Bump when the extraction changes: features of another version never match (a miss, not a
# wrong hit, while old entries age out).
VERSION = 1

HASH_BYTES = 6


def _split(words: str) -> list[str]:
    """A word list written as one string (kept readable; not a literal list of 200 items)."""
    return words.split()


STOP = frozenset(
    _split(
        """
        a an the and or but if then else of to in on at by for with from into onto over under
        about above below after before between through during without within along across than
        as is are was were be been being am do does did doing done have has had having can could
        will would shall should may might must ought i me my mine myself we us our ours you your
        yours he him his she her hers it its they them their theirs this that these those there
        here what which who whom whose when where why how all any both each few more most other
        some such only own same so too very just also even ever again once still yet really
        quite please much many get got getting make made way ways thing things someone something
        anyone anything everyone everything people person good best better bad worse worst new
        old like want need know think tell help use used using one ones s t d ll m re ve hi
        hello hey thanks thank ok okay yes let lets i'm i've i'd i'll it's that's what's
        """
    )
)

NEGATION = frozenset(
    _split(
        """
        not no never none nobody nothing nowhere neither nor without cannot cant dont doesnt
        didnt isnt arent wasnt werent wont wouldnt shouldnt couldnt hasnt havent hadnt mustnt
        neednt aint
        """
    )
)

MONTHS = {
    name: index + 1
    for index, names in enumerate(
        [
            ("january", "jan"),
            ("february", "feb"),
            ("march", "mar"),
            ("april", "apr"),
            ("may",),
            ("june", "jun"),
            ("july", "jul"),
            ("august", "aug"),
            ("september", "sep", "sept"),
            ("october", "oct"),
            ("november", "nov"),
            ("december", "dec"),
        ]
    )
    for name in names
}
# Month names that are also common words count only when a number stands next to them.
AMBIGUOUS_MONTHS = frozenset({"may", "march", "mar", "jan", "sep", "oct", "dec", "jun", "aug"})
WEEKDAYS = {
    name: index
    for index, names in enumerate(
        [
            ("monday", "mon"),
            ("tuesday", "tue", "tues"),
            ("wednesday", "wed"),
            ("thursday", "thu", "thur", "thurs"),
            ("friday", "fri"),
            ("saturday", "sat"),
            ("sunday", "sun"),
        ]
    )
    for name in names
}
AMBIGUOUS_WEEKDAYS = frozenset({"mon", "wed", "sat", "sun", "fri", "thu", "tue"})
RELATIVE_DAYS = frozenset(
    _split(
        """
        today tonight tomorrow yesterday tmrw tmr weekend weekday morning afternoon evening noon
        midnight
        """
    )
)
RELATIVE_PREFIX = frozenset({"this", "next", "last", "past", "previous", "coming", "following"})
PERIODS = frozenset({"week", "month", "year", "quarter", "decade", "century", "semester"})
PERIODS |= {p + "s" for p in PERIODS}

NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        _split(
            """
            zero _ two three four five six seven eight nine ten eleven twelve thirteen fourteen
            fifteen sixteen seventeen eighteen nineteen
            """
        )
    )
    if word != "_"
}
NUMBER_WORDS.update(
    {
        word: str(value * 10)
        for value, word in enumerate(
            ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
        )
        if word != "_"
    }
)
NUMBER_WORDS.update(
    {"hundred": "e2", "thousand": "e3", "million": "e6", "billion": "e9", "trillion": "e12"}
)
NUMBER_WORDS.update({"dozen": "12", "half": "0.5", "twice": "x2", "double": "x2", "triple": "x3"})
ORDINALS = {
    word: f"#{index + 1}"
    for index, word in enumerate(
        _split(
            """
            first second third fourth fifth sixth seventh eighth ninth tenth
            """
        )
    )
    if word != "first"  # mostly "first of all", "learn X first"
}

CURRENCY_SYMBOLS = {"$": "usd", "€": "eur", "£": "gbp", "¥": "jpy", "₹": "inr", "₽": "rub"}
CURRENCY_WORDS = {
    "usd": "usd",
    "dollar": "usd",
    "dollars": "usd",
    "bucks": "usd",
    "eur": "eur",
    "euro": "eur",
    "euros": "eur",
    "gbp": "gbp",
    "pound": "gbp",
    "pounds": "gbp",
    "quid": "gbp",
    "jpy": "jpy",
    "yen": "jpy",
    "inr": "inr",
    "rupee": "inr",
    "rupees": "inr",
    "rs": "inr",
    "cent": "cent",
    "cents": "cent",
    "rmb": "cny",
    "yuan": "cny",
    "cad": "cad",
    "aud": "aud",
    "chf": "chf",
    "btc": "btc",
    "bitcoin": "btc",
    "bitcoins": "btc",
}

# Words around which the order of two terms is the meaning: "convert A to B", "A vs B".
DIRECTION_MARKERS = frozenset(
    _split(
        """
        to into onto towards toward from vs versus v than over against before after under -> =>
        instead
        """
    )
)
WINDOW = 3

QUOTES = re.compile(
    r"\"{1,2}([^\"]{1,200}?)\"{1,2}|“([^”]{1,200})”|\u2018([^\u2019]{1,200})\u2019|`([^`]{1,200})`"
    r"|(?:(?<=\s)|^)'([^'\n]{1,200}?)'(?=[\s.,;:!?)]|$)"
)
NUMERIC_DATE = re.compile(
    r"\b(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})\b|\b(\d{1,2})[-/.](\d{1,2})[-/.](\d{2,4})\b"
)
TIME = re.compile(r"\b(\d{1,2})(?::(\d{2}))?\s*([ap]\.?m\.?)(?![a-z])|\b(\d{1,2}):(\d{2})\b", re.I)
AMOUNT = re.compile(
    r"([$€£¥₹₽])\s?(\d[\d,]*(?:\.\d+)?)\s*([kmb]\b)?"
    r"|(\d[\d,]*(?:\.\d+)?)\s*([kmb]\b)?\s*([$€£¥₹₽]|[A-Za-z]{2,8}\b)",
    re.I,
)
TOKEN = re.compile(r"->|=>|[#@]?[\w][\w'\u2019.\-/@&+]*[\w+#]|[#@]?\w", re.UNICODE)
THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
NUMBER = re.compile(r"^\d[\d,]*(?:\.\d+)?$")
ORDINAL_NUMBER = re.compile(r"^(\d+)(?:st|nd|rd|th)$")
DOMAIN = re.compile(
    r"^[a-z0-9-]+(?:\.[a-z0-9-]+)*\.(?:com|org|net|io|in|co|uk|de|edu|gov|ai|dev|app|info)$|^[\w-]+(?:/[\w.-]+){2,}$"
)
CODE_SEPARATORS = re.compile(r"[-/_.]")
POSSESSIVE = re.compile(r"['\u2019]s$")
ABBREVIATIONS = frozenset(
    ["mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "mt", "ft", "vs", "etc", "e.g", "i.e", "no"]
)
SENTENCE_END = re.compile(r"[.!?:;\n]\s*$")


@dataclass(frozen=True)
class Features:
    """The facts of a question that a cached answer must share, each as fragment hashes."""

    numbers: frozenset[str] = frozenset()
    codes: frozenset[str] = frozenset()
    amounts: frozenset[str] = frozenset()
    dates: frozenset[str] = frozenset()
    quoted: frozenset[str] = frozenset()
    entities: frozenset[str] = frozenset()
    words: frozenset[str] = frozenset()
    negation: int = 0
    direction: frozenset[str] = frozenset()
    reversed: frozenset[str] = frozenset()
    version: int = VERSION

    def dump(self) -> str:
        """Compact JSON (sets as sorted lists) for the Redis log."""
        data: dict[str, object] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, frozenset):
                if value:
                    data[field.name[0] + field.name[-1]] = sorted(value)
            else:
                data[field.name] = value
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def load(cls, text: str) -> Features:
        """The inverse of :meth:`dump`; raises ValueError on a malformed record."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("features record is not an object")
        kwargs: dict[str, object] = {}
        for field in fields(cls):
            short = field.name[0] + field.name[-1]
            if field.name in ("negation", "version"):
                kwargs[field.name] = int(data.get(field.name, 0))
            else:
                kwargs[field.name] = frozenset(str(v) for v in data.get(short, ()))
        return cls(**kwargs)  # type: ignore[arg-type]


def _h(kind: str, fragment: str) -> str:
    """A short keyed hash of one fragment: enough to compare, not to print."""
    digest = hashlib.blake2b(fragment.encode(), digest_size=HASH_BYTES, person=kind.encode()[:16])
    return digest.hexdigest()


def _hashes(kind: str, fragments: Iterable[str]) -> frozenset[str]:
    return frozenset(_h(kind, f) for f in fragments)


def _number(text: str) -> str:
    """'1,000.50' -> '1000.5': one spelling per value, leading zeros kept (IDs keep them)."""
    text = text.replace(",", "")
    if "." in text:
        whole, _, frac = text.partition(".")
        frac = frac.rstrip("0")
        return f"{whole}.{frac}" if frac else whole
    return text


def _cut(text: str, pattern: re.Pattern[str], found: list[str], make: object) -> str:
    """Record each match of ``pattern`` via ``make`` and blank it out of ``text``."""

    def replace(match: re.Match[str]) -> str:
        value = make(match)  # type: ignore[operator]
        if value is None:
            return match.group(0)
        found.append(value)
        return " "

    return pattern.sub(replace, text)


def _amount(match: re.Match[str]) -> str | None:
    symbol, value, scale, value2, scale2, unit = match.groups()
    if symbol:
        return f"{CURRENCY_SYMBOLS[symbol]}:{_number(value)}{(scale or '').lower()}"
    unit_key = CURRENCY_SYMBOLS.get(unit) or CURRENCY_WORDS.get(unit.lower())
    if unit_key is None:
        return None
    return f"{unit_key}:{_number(value2)}{(scale2 or '').lower()}"


def _numeric_date(match: re.Match[str]) -> str:
    y, m, d, d2, m2, y2 = match.groups()
    if y:
        return f"{int(y)}-{int(m)}-{int(d)}"
    # Day and month order is ambiguous (US or not): keep both parts as written.
    year = int(y2) + (2000 if len(y2) == 2 else 0)
    return f"{year}-{int(d2)}|{int(m2)}"


def _time(match: re.Match[str]) -> str:
    hour, minute, ampm, hour24, minute24 = match.groups()
    if hour24 is not None:
        return f"t{int(hour24)}:{minute24}"
    h = int(hour) % 12 + (12 if ampm.lower().startswith("p") else 0)
    return f"t{h}:{minute or '00'}"


def _quoted(match: re.Match[str]) -> str | None:
    inner = next((g for g in match.groups() if g is not None), "")
    inner = " ".join(inner.lower().split())
    return inner or None


def _tokens(text: str) -> list[tuple[str, bool]]:
    """Tokens with whether each starts a sentence (its capital letter then says nothing)."""
    out: list[tuple[str, bool]] = []
    previous_end = 0
    for match in TOKEN.finditer(text):
        token = match.group(0).strip(".-/'\u2019")
        if not token:
            continue
        gap = text[previous_end : match.start()]
        after_abbreviation = bool(out) and out[-1][0].lower() in ABBREVIATIONS
        starts = not out or (
            (bool(SENTENCE_END.search(gap)) and not after_abbreviation) or '"' in gap or "(" in gap
        )
        out.append((token, starts))
        previous_end = match.end()
    return out


def _is_code(token: str) -> bool:
    """An ID-like token: digits mixed with letters, '#A77', a domain, an email, a path."""
    if token.startswith(("#", "@")) and len(token) > 1:
        return True
    has_digit = any(c.isdigit() for c in token)
    has_alpha = any(c.isalpha() for c in token)
    if has_digit and has_alpha:
        return ORDINAL_NUMBER.match(token.lower()) is None
    if has_digit:
        return NUMBER.match(token) is None  # "12-34-56", "1/2"
    return "@" in token or DOMAIN.match(token.lower()) is not None


def _is_entity(token: str, starts: bool, title_case: bool, shouting: bool) -> bool:
    """A name: an acronym, a mid-word capital ('iPhone'), or a capital not at a sentence start."""
    if not token[:1].isalpha() or token.lower() in STOP or len(token) < 2:
        return False
    upper = sum(c.isupper() for c in token)
    if token.isupper() and upper >= 2:
        return not shouting
    if upper and not token[0].isupper():
        return True  # iPhone, eBay, macOS
    if token[0].isupper() and upper >= 2 and not token.isupper():
        return True  # McDonald, YouTube, PayPal
    return token[0].isupper() and not starts and not title_case


def _direction(words: list[str]) -> tuple[set[str], set[str]]:
    """Ordered term pairs around direction markers, and the same pairs reversed.

    "from A ... to B" pairs the first content word after each (so "to B from A" pairs the
    same); "A to B", "A vs B", "A than B" pair content words within a few words either side.
    """
    pairs: set[tuple[str, str]] = set()
    has_from = "from" in words

    def content(seq: Iterable[str]) -> list[str]:
        return [w for w in seq if w not in STOP and w not in DIRECTION_MARKERS][:WINDOW]

    for index, word in enumerate(words):
        if word not in DIRECTION_MARKERS:
            continue
        after = content(words[index + 1 : index + 1 + 2 * WINDOW])
        if has_from and word in ("to", "into", "towards", "toward", "from"):
            continue
        before = content(reversed(words[max(0, index - 2 * WINDOW) : index]))
        pairs.update((a, b) for a in before for b in after if a != b)
    if has_from:
        src = content(words[words.index("from") + 1 :])[:1]
        dst = [
            content(words[i + 1 :])[:1]
            for i, w in enumerate(words)
            if w in ("to", "into", "towards", "toward")
        ]
        pairs.update((a, b[0]) for a in src for b in dst if b and b[0] != a)
    forward = {f"{a}>{b}" for a, b in pairs}
    backward = {f"{b}>{a}" for a, b in pairs}
    return forward, backward


def _scan_words(
    text: str, numbers: list[str], dates: list[str], codes: list[str]
) -> tuple[list[str], list[str], int]:
    """Walk the tokens once: words (lower case), entities, negations; numbers, codes, dates."""
    tokens = _tokens(text)
    alpha = [t for t, _ in tokens if t[:1].isalpha() and t.lower() not in STOP]
    title_case = len(alpha) >= 3 and sum(t[0].isupper() for t in alpha) >= 0.6 * len(alpha)
    shouting = len(alpha) >= 3 and sum(t.isupper() for t in alpha) >= 0.6 * len(alpha)
    words: list[str] = []
    entities: list[str] = []
    negation = 0
    lowered = [POSSESSIVE.sub("", t.lower().replace("\u2019", "'")) for t, _ in tokens]
    for index, (token, starts) in enumerate(tokens):
        low = lowered[index]
        neighbour_number = any(
            0 <= j < len(lowered) and NUMBER.match(lowered[j]) for j in (index - 1, index + 1)
        )
        if low.endswith("n't") or low in NEGATION:
            negation += 1
            low = low.removesuffix("n't") or low
        if NUMBER.match(low.removeprefix("#")):
            numbers.append(_number(low.removeprefix("#")))  # "#85632" is order 85632
        elif ORDINAL_NUMBER.match(low) or low in ORDINALS:
            ordinal = ORDINAL_NUMBER.match(low)
            numbers.append(f"#{ordinal.group(1)}" if ordinal else ORDINALS[low])
        elif low in NUMBER_WORDS:
            numbers.append(NUMBER_WORDS[low])
        elif low in WEEKDAYS and (low not in AMBIGUOUS_WEEKDAYS or token[0].isupper()):
            dates.append(f"wd{WEEKDAYS[low]}")
        elif low in MONTHS and (low not in AMBIGUOUS_MONTHS or neighbour_number):
            dates.append(f"mo{MONTHS[low]}")
        elif low in RELATIVE_DAYS or low.removesuffix("s") in RELATIVE_DAYS:
            dates.append(low.removesuffix("s") if low not in RELATIVE_DAYS else low)
        elif low in PERIODS and index and lowered[index - 1] in RELATIVE_PREFIX:
            dates.append(f"{lowered[index - 1]}:{low.removesuffix('s')}")
        elif _is_code(token):
            code = low.lstrip("#@") if token[:1] in "#@" and len(token) > 2 else low
            codes.append(CODE_SEPARATORS.sub("-", code))
        elif _is_entity(token, starts, title_case, shouting):
            entities.append(low)
        words.append(low)
    return words, entities, negation


def features(text: str) -> Features:
    """The facts of ``text`` that a cached question must share before its answer is served."""
    quoted: list[str] = []
    amounts: list[str] = []
    dates: list[str] = []
    numbers: list[str] = []
    codes: list[str] = []
    text = THOUSANDS.sub("", text)
    rest = _cut(text, QUOTES, quoted, _quoted)
    rest = _cut(rest, NUMERIC_DATE, dates, _numeric_date)
    rest = _cut(rest, TIME, dates, _time)
    rest = _cut(rest, AMOUNT, amounts, _amount)
    words, entities, negation = _scan_words(rest, numbers, dates, codes)
    # Quoted text still counts for the other guards ("cancel 'order 12'" names order 12).
    for fragment in quoted:
        inner_words, inner_entities, _ = _scan_words(fragment, numbers, dates, codes)
        words += inner_words
        # A quoted single word is emphasis or a term: it must be a word of the other question.
        entities += [w for w in inner_words if w not in STOP] if len(inner_words) == 1 else []
        entities += inner_entities
    quoted = [q for q in quoted if len(q.split()) > 1]
    forward, backward = _direction(words)
    return Features(
        numbers=_hashes("n", numbers),
        codes=_hashes("c", codes),
        amounts=_hashes("a", amounts),
        dates=_hashes("d", dates),
        quoted=_hashes("q", quoted),
        entities=_hashes("w", entities),
        words=_hashes("w", (w for w in words if w not in STOP)),
        negation=min(negation, 3),
        direction=_hashes("r", forward),
        reversed=_hashes("r", backward),
    )


def mismatch(query: Features, cached: Features) -> str | None:
    """None when ``cached``'s answer may serve ``query``; else the name of the failed guard."""
    if query.version != cached.version:
        return "version"
    for name in ("numbers", "codes", "amounts", "dates"):
        if getattr(query, name) != getattr(cached, name):
            return name
    # Quoted phrases must match; one side quoting and the other not is left to the word guard.
    if query.quoted and cached.quoted and query.quoted != cached.quoted:
        return "quoted"
    # A name in one must be a word of the other: "python" and "Python" are the same name.
    if not query.entities <= cached.words or not cached.entities <= query.words:
        return "entities"
    if query.negation != cached.negation:
        return "negation"
    if query.direction & cached.reversed:
        return "direction"
    return None
