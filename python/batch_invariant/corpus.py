"""A self-made, license-clean training corpus for the local tokenizer.

The text is generated at call time from a fixed seed with our own PRNG (splitmix64 — never
Python's ``random``, whose algorithms may change between versions) and a small built-in grammar:
English-like sentences, Python/C-like code lines, numbers, dates and arithmetic. The same seed and
size give the same string on every machine and Python version.
"""
from __future__ import annotations

_MASK = (1 << 64) - 1


class SplitMix64:
    """splitmix64 (Steele, Lea, Flood 2014): tiny, fast, full-period 64-bit generator."""

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next() % n  # bias < n / 2**64: irrelevant here

    def pick(self, seq):
        return seq[self.below(len(seq))]


_DET = "the a this that every some each one no another".split()
_ADJ = ("quick small large bright quiet heavy ancient green warm cold simple careful narrow wide "
         "hidden open empty full gentle sharp sudden early late strange common rare soft loud "
         "final first second random stable deterministic parallel fast slow").split()
_NOUN = ("river model kernel garden window teacher engine signal number market city forest "
         "language memory tensor matrix token server batch thread cache student friend mountain "
         "question answer letter table system library function value program result village "
         "morning evening storm planet ocean machine record sequence stream circuit").split()
_VERB = ("sees builds finds moves opens computes returns reads writes follows carries holds "
         "changes keeps measures sends takes makes checks loads stores sorts counts explains "
         "remembers describes crosses watches reaches").split()
_ADV = "slowly quickly carefully often rarely again always never quietly exactly twice".split()
_PREP = "in on under over near behind with without through across before after into".split()
_CONJ = ["and", "but", "because", "while", "so", "although", "when"]
_NAMES = "Ada Alan Grace Linus Edsger Barbara Donald Ken Dennis Margaret Claude John Emmy".split()
_MONTHS = ("January February March April May June July August September October November "
           "December").split()
_SYL = ("ka lo mi nu ra te shi po da ve zu xi gor bel tan fin mor sel ark ion ter pre con "
        "lin set get val idx buf ptr len num str obj qua bri sto vel dra mun tor pel gen wil "
        "hap cur lex rin sam tob ul yen zor ap ed im ost und").split()
_ONSET = "b c d f g h j k l m n p r s t v w z br cl dr fl gr pl pr sh st th tr ch".split()
_VOWEL = "a e i o u ai ea ou io y".split()
_CODA = ["", "", "n", "r", "s", "l", "t", "m", "nd", "st", "rk", "x", "ng"]
_TYPES = "int float double char long bool size_t uint8_t".split()
_OPS = ["+", "-", "*", "/", "%", "==", "!=", "<", ">", "<=", ">=", "and", "or", "<<", ">>", "&", "|"]


def _word(r: SplitMix64) -> str:
    """A made-up pronounceable word (names, places, jargon)."""
    return "".join(r.pick(_ONSET) + r.pick(_VOWEL) + r.pick(_CODA) for _ in range(1 + r.below(3)))


def _ident(r: SplitMix64) -> str:
    parts = [r.pick(_SYL) if r.below(3) else _word(r) for _ in range(1 + r.below(3))]
    return "_".join(parts) if r.below(3) == 0 else "".join(parts)


def _number(r: SplitMix64) -> str:
    k = r.below(6)
    if k == 0:
        return str(r.below(10))
    if k == 1:
        return str(r.below(1000))
    if k == 2:
        return str(r.below(10 ** (2 + r.below(8))))
    if k == 3:
        return f"{r.below(1000)}.{r.below(100):02d}"
    if k == 4:
        return f"0x{r.below(1 << 16):04x}"
    return f"{r.below(10)}.{r.below(10 ** 6):06d}e-{1 + r.below(12)}"


def _noun_phrase(r: SplitMix64) -> str:
    words = [r.pick(_DET)]
    for _ in range(r.below(3)):
        words.append(r.pick(_ADJ))
    words.append(r.pick(_NOUN) if r.below(5) else _word(r))
    if r.below(4) == 0:
        words += [r.pick(_PREP), r.pick(_DET), r.pick(_NOUN)]
    return " ".join(words)


def _clause(r: SplitMix64) -> str:
    k = r.below(8)
    subj = r.pick(_NAMES) if k == 0 else _word(r).capitalize() if k == 1 else _noun_phrase(r)
    words = [subj, r.pick(_VERB), _noun_phrase(r)]
    if r.below(3) == 0:
        words.append(r.pick(_ADV))
    if r.below(4) == 0:
        words += [r.pick(_PREP), _noun_phrase(r)]
    return " ".join(words)


def _sentence(r: SplitMix64) -> str:
    s = _clause(r)
    if r.below(3) == 0:
        s += (", " if r.below(2) else " ") + r.pick(_CONJ) + " " + _clause(r)
    if r.below(5) == 0:
        s += f" {r.pick(_PREP)} {r.pick(_MONTHS)} {1 + r.below(28)}, {1900 + r.below(130)}"
    end = r.pick([".", ".", ".", "!", "?", ";"])
    return s[0].upper() + s[1:] + end


def _paragraph(r: SplitMix64) -> str:
    return " ".join(_sentence(r) for _ in range(2 + r.below(5)))


def _code_block(r: SplitMix64) -> str:
    fn, a, b = _ident(r), _ident(r), _ident(r)
    if r.below(2):
        lines = [f"def {fn}({a}, {b}={_number(r)}):"]
        for _ in range(1 + r.below(5)):
            k = r.below(5)
            v = _ident(r)
            if k == 0:
                lines.append(f"    {v} = {a} {r.pick(_OPS)} {_number(r)}")
            elif k == 1:
                lines.append(f"    for {v} in range({_number(r)}):")
                lines.append(f"        {b} += {v} * {_number(r)}")
            elif k == 2:
                lines.append(f"    if {a} {r.pick(_OPS)} {b}:")
                lines.append(f"        return {a}[{r.below(16)}]")
            elif k == 3:
                lines.append(f"    # {_clause(r)}")
            else:
                lines.append(f'    print("{_noun_phrase(r)}", {v}, sep=", ")')
        lines.append(f"    return {a} {r.pick(_OPS)} {b}")
    else:
        t = r.pick(_TYPES)
        lines = [f"static {t} {fn}(const {r.pick(_TYPES)} *{a}, int {b}) {{"]
        for _ in range(1 + r.below(5)):
            k = r.below(4)
            v = _ident(r)
            if k == 0:
                lines.append(f"    {r.pick(_TYPES)} {v} = {a}[{b} {r.pick(_OPS)} {r.below(64)}];")
            elif k == 1:
                lines.append(f"    for (int i = 0; i < {b}; ++i) {{ {v} += {a}[i]; }}")
            elif k == 2:
                lines.append(f"    /* {_clause(r)} */")
            else:
                lines.append(f'    printf("%d {_noun_phrase(r)}\\n", {v});')
        lines.append(f"    return ({t}){a}[0];")
        lines.append("}")
    return "\n".join(lines)


def _numbers_line(r: SplitMix64) -> str:
    k = r.below(4)
    if k == 0:
        x, y = r.below(10 ** (1 + r.below(4))), r.below(10 ** (1 + r.below(4)))
        return f"{x} + {y} = {x + y}; {x} * {y} = {x * y}"
    if k == 1:
        return f"{1900 + r.below(130)}-{1 + r.below(12):02d}-{1 + r.below(28):02d} {r.below(24):02d}:{r.below(60):02d}"
    if k == 2:
        return ", ".join(_number(r) for _ in range(3 + r.below(8)))
    return f"{_ident(r)}: {_number(r)} | {_ident(r)}: {_number(r)} | total {_number(r)}"


def make_corpus(n_chars: int = 300_000, seed: int = 20240607) -> str:
    """Deterministic mixed text of about ``n_chars`` characters (ASCII)."""
    r = SplitMix64(seed)
    chunks, total = [], 0
    while total < n_chars:
        k = r.below(10)
        if k < 5:
            c = _paragraph(r)
        elif k < 8:
            c = _code_block(r)
        else:
            c = "\n".join(_numbers_line(r) for _ in range(1 + r.below(4)))
        chunks.append(c)
        total += len(c) + 2
    return "\n\n".join(chunks) + "\n"
