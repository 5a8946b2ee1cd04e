"""CTC for reading sequences: the loss, greedy and beam decoding, and the scores of a reading.

Conventions: blank is id 0 and `alphabet[k]` is id k + 1; a model scores C = len(alphabet) + 1
classes per frame, logits [B, T, C], batch first. Pure functions over tensors and strings: nothing
here knows a model, a data set or a process group (scores travel between ranks as one tensor).
"""

from __future__ import annotations

import heapq
import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hwr_dist.data.sequences import encode as encode_text
from hwr_dist.errors import HwrError

try:  # the standard library's regular-expression parser (Python 3.11: re._parser)
    import re._parser as _sre
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre

BLANK = 0
WIDER = 8  # a pattern that no final beam matches: search again with this many times the beam

Prefix = tuple[int, ...]


def encode(texts: Sequence[str], alphabet: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Texts -> (ids of all texts concatenated, int64 [sum L]; lengths, int64 [B]): ctc_loss's targets."""
    ids = [encode_text(text, alphabet, f"text {text!r}") for text in texts]
    return torch.tensor([i for line in ids for i in line], dtype=torch.int64), \
        torch.tensor([len(line) for line in ids], dtype=torch.int64)


def to_text(ids: Iterable[int], alphabet: str) -> str:
    return "".join(alphabet[i - 1] for i in ids)


def ctc_loss(logits: Tensor, targets: Tensor, target_lengths: Tensor, output_lengths: Tensor) -> Tensor:
    """Mean over the batch of each sample's CTC loss divided by its target length (at least 1).

    logits [B, T, C]; targets int64 [sum L] (ids >= 1, concatenated); lengths int64 [B]. The same
    reduction as cross-entropy's mean, per character rather than per image, so the gradient of equal
    micro-batches accumulated (each loss / steps) and of equal per-rank batches averaged by DDP is
    that of one large batch. Float32 whatever the autocast dtype (CTC sums probabilities over every
    alignment); an impossible alignment (more characters than frames allow) counts zero, not inf.
    """
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # [T, B, C], as F.ctc_loss wants it
    per_sample = F.ctc_loss(log_probs, targets, output_lengths, target_lengths, blank=BLANK,
                            reduction="none", zero_infinity=True)
    return (per_sample / target_lengths.clamp(min=1).to(per_sample)).mean()


def greedy_decode(logits: Tensor, output_lengths: Tensor) -> list[list[int]]:
    """Best class per frame, repeats collapsed, blanks dropped, each sample's first
    output_lengths[i] frames only: ids per sample."""
    best = logits.argmax(-1)  # [B, T]
    new = torch.ones_like(best, dtype=torch.bool)
    new[:, 1:] = best[:, 1:] != best[:, :-1]
    inside = torch.arange(best.shape[1], device=best.device) < output_lengths.to(best.device)[:, None]
    keep = (new & (best != BLANK) & inside).cpu()
    return [row[k].tolist() for row, k in zip(best.cpu(), keep)]


def _logadd(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


def _prefix_search(log_probs: list[list[float]], beam: int,
                   pattern: PatternAutomaton | None) -> list[tuple[Prefix, float]]:
    """CTC prefix beam search: the `beam` best label sequences, each with the log probability of all
    the paths that read as it, best first. With a `pattern`, prefixes that cannot grow into a match
    are dropped, and each pattern state keeps its best prefix even outside the top `beam`: a reading
    that completes the pattern survives beside likelier ones that stop short of it."""
    # prefix -> (log P of the paths ending in blank, log P of those ending in the prefix's last label)
    beams: dict[Prefix, tuple[float, float]] = {(): (0.0, -math.inf)}
    states: dict[Prefix, frozenset] = {(): pattern.start} if pattern is not None else {}
    classes = range(1, len(log_probs[0])) if log_probs else range(0)
    for frame in log_probs:
        labels = heapq.nlargest(beam, classes, key=frame.__getitem__)  # only these can make a top-beam extension
        grown: dict[Prefix, tuple[float, float]] = {}
        for prefix, (p_blank, p_label) in beams.items():
            total = _logadd(p_blank, p_label)
            b, n = grown.get(prefix, (-math.inf, -math.inf))
            b = _logadd(b, total + frame[BLANK])
            if prefix:  # the last label again, with no blank between: the same prefix
                n = _logadd(n, p_label + frame[prefix[-1]])
            grown[prefix] = (b, n)
            for c in labels:
                longer = prefix + (c,)
                if pattern is not None:
                    state = pattern.step(states[prefix], c)
                    if not state:
                        continue
                    states[longer] = state
                # a label equal to the last one starts a new character only after a blank
                via = p_blank if prefix and c == prefix[-1] else total
                b, n = grown.get(longer, (-math.inf, -math.inf))
                grown[longer] = (b, _logadd(n, via + frame[c]))
        ranked = sorted(grown.items(), key=lambda kv: -_logadd(*kv[1]))
        keep = dict(ranked[:beam])
        if pattern is not None:
            seen = {states[p] for p in keep}
            for prefix, score in ranked[beam:]:
                if states[prefix] not in seen:
                    seen.add(states[prefix])
                    keep[prefix] = score
        beams = keep
    return sorted(((p, _logadd(*s)) for p, s in beams.items()), key=lambda ps: -ps[1])


class PatternAutomaton:
    """A regular expression over the text as an automaton over label ids, for the constrained beam.

    Built from the standard library's own parse of the pattern (Thompson's construction): literals,
    classes (`[0-9]`, `\\d`, `\\w`, `\\s`, negations), `.`, groups, `|` and every repeat. A state is the
    set of automaton nodes a prefix can be in; the empty set means no match can follow.
    """

    def __init__(self, pattern: str, alphabet: Sequence[str]):
        try:
            parsed = _sre.parse(pattern)
        except re.error as e:
            raise HwrError(f"pattern {pattern!r} is not a regular expression ({e})") from None
        self.alphabet = list(alphabet)
        self.eps: list[list[int]] = [[]]
        self.edges: list[list[tuple[frozenset, int]]] = [[]]
        self.accept = self._build(list(parsed), 0, pattern)
        self.start = self._closure({0})
        self._steps: dict[tuple[frozenset, int], frozenset] = {}

    def _node(self) -> int:
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def _labels(self, test: Callable[[str], bool]) -> frozenset:
        return frozenset(k + 1 for k, ch in enumerate(self.alphabet) if test(ch))

    def _edge(self, at: int, labels: frozenset) -> int:
        to = self._node()
        self.edges[at].append((labels, to))
        return to

    def _build(self, items: list, at: int, pattern: str) -> int:
        """Nodes for a parsed sequence from node `at`; returns its end node."""
        c = _sre
        for op, av in items:
            if op is c.LITERAL:
                at = self._edge(at, self._labels(lambda ch, v=av: ord(ch) == v))
            elif op is c.NOT_LITERAL:
                at = self._edge(at, self._labels(lambda ch, v=av: ord(ch) != v))
            elif op is c.ANY:
                at = self._edge(at, self._labels(lambda ch: ch != "\n"))
            elif op is c.IN:
                at = self._edge(at, self._labels(_class_test(av, pattern)))
            elif op is c.SUBPATTERN:
                at = self._build(list(av[-1]), at, pattern)
            elif op is c.BRANCH:
                end = self._node()
                for alternative in av[1]:
                    self.eps[self._build(list(alternative), at, pattern)].append(end)
                at = end
            elif op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", c.MAX_REPEAT)):
                lo, hi, body = av
                for _ in range(lo):
                    at = self._build(list(body), at, pattern)
                if hi == c.MAXREPEAT:  # a loop: the body again and again, or leave
                    loop = self._node()
                    self.eps[at].append(loop)
                    self.eps[self._build(list(body), loop, pattern)].append(loop)
                    at = loop
                else:
                    end = self._node()
                    for _ in range(hi - lo):
                        self.eps[at].append(end)
                        at = self._build(list(body), at, pattern)
                    self.eps[at].append(end)
                    at = end
            elif op is c.AT:  # ^, $, \A, \Z: the pattern is matched whole anyway
                continue
            else:
                raise HwrError(f"pattern {pattern!r} uses {str(op).lower()}, which the constrained search cannot "
                               "follow; use characters, classes, groups, | and repeats (e.g. '\\d{5}')")
        return at

    def _closure(self, nodes: set[int]) -> frozenset:
        todo, seen = list(nodes), set(nodes)
        while todo:
            for nxt in self.eps[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return frozenset(seen)

    def step(self, state: frozenset, label: int) -> frozenset:
        key = (state, label)
        if key not in self._steps:
            self._steps[key] = self._closure({to for n in state for labels, to in self.edges[n] if label in labels})
        return self._steps[key]

    def run(self, prefix: Prefix) -> frozenset:
        state = self.start
        for label in prefix:
            state = self.step(state, label)
        return state

    def accepts(self, prefix: Prefix) -> bool:
        return self.accept in self.run(prefix)


def _class_test(items: list, pattern: str) -> Callable[[str], bool]:
    """A character class of the parsed pattern (`[...]`, `\\d`, ...) as a test on one character."""
    c = _sre
    categories = {c.CATEGORY_DIGIT: str.isdecimal, c.CATEGORY_SPACE: str.isspace,
                  c.CATEGORY_WORD: lambda ch: ch.isalnum() or ch == "_"}
    negated = {getattr(c, "CATEGORY_NOT_" + name.name.removeprefix("CATEGORY_")): test
               for name, test in categories.items()}
    tests, negate = [], False
    for op, av in items:
        if op is c.NEGATE:
            negate = True
        elif op is c.LITERAL:
            tests.append(lambda ch, v=av: ord(ch) == v)
        elif op is c.RANGE:
            tests.append(lambda ch, lo=av[0], hi=av[1]: lo <= ord(ch) <= hi)
        elif op is c.CATEGORY and av in categories:
            tests.append(categories[av])
        elif op is c.CATEGORY and av in negated:
            tests.append(lambda ch, t=negated[av]: not t(ch))
        else:
            raise HwrError(f"pattern {pattern!r}: the class item {str(op).lower()} is not supported by the "
                           "constrained search; use ranges, \\d, \\w, \\s and single characters")
    return lambda ch: negate != any(t(ch) for t in tests)


def beam_decode(log_probs: Tensor, alphabet: str, beam: int = 16, pattern: str | None = None) -> str:
    """The most probable text of one sample, log_probs [T, C] (logits work too: they are normalised
    here), by CTC prefix beam search, which sums the probability of every path that reads the same.

    `pattern`, a regular expression over the text (e.g. r"\\d{5}"): the search follows it, dropping
    prefixes that cannot match and keeping each pattern state's best prefix, and answers the most
    probable text that matches it whole; if none can within the frames (e.g. more characters than
    the image has frames for), the unconstrained best text. The caller may check the answer against
    the pattern to tell the two apart.
    """
    lp = log_probs.detach().float().log_softmax(-1).cpu().tolist()
    if pattern is None:
        return to_text(_prefix_search(lp, beam, None)[0][0], alphabet)
    automaton = PatternAutomaton(pattern, alphabet)
    for width in (beam, beam * WIDER):
        match = next((p for p, _ in _prefix_search(lp, width, automaton) if automaton.accepts(p)), None)
        if match is not None:
            return to_text(match, alphabet)
    return to_text(_prefix_search(lp, beam, None)[0][0], alphabet)


# --- scores ----------------------------------------------------------------------------------


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions turning a into b."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (x != y))
    return row[-1]


@dataclass
class Reading:
    """One sample's reading, for a list of the worst."""

    index: int
    truth: str
    reading: str
    distance: int


@dataclass
class SequenceScores:
    """Counts over readings; sums, so ranks add theirs up (`as_tensor`, all-reduce, `from_tensor`)."""

    edits: int = 0  # edit distances, summed
    chars: int = 0  # characters of the truths, summed
    exact: int = 0  # readings equal to their truth
    same_length: int = 0  # readings as long as their truth
    count: int = 0

    def add(self, truth: str, reading: str, index: int = -1) -> Reading:
        d = edit_distance(truth, reading)
        self.edits += d
        self.chars += len(truth)
        self.exact += d == 0
        self.same_length += len(reading) == len(truth)
        self.count += 1
        return Reading(index, truth, reading, d)

    def merge(self, other: SequenceScores) -> SequenceScores:
        return SequenceScores(*(a + b for a, b in zip(self.counts(), other.counts())))

    def counts(self) -> tuple[int, int, int, int, int]:
        return self.edits, self.chars, self.exact, self.same_length, self.count

    @property
    def cer(self) -> float:
        """Character error rate: edit distances over truth characters."""
        return self.edits / max(self.chars, 1)

    @property
    def sequence_accuracy(self) -> float:
        return self.exact / max(self.count, 1)

    @property
    def length_accuracy(self) -> float:
        return self.same_length / max(self.count, 1)

    def as_tensor(self, device: torch.device | str = "cpu") -> Tensor:
        """float64 [5] (exact for counts below 2**53), to sum across ranks."""
        return torch.tensor(self.counts(), dtype=torch.float64, device=device)

    @classmethod
    def from_tensor(cls, t: Tensor) -> SequenceScores:
        return cls(*(int(round(v)) for v in t.tolist()))


def worst_readings(readings: Iterable[Reading], n: int) -> list[Reading]:
    """The n wrong readings farthest from their truth (ties: the lower index first)."""
    return heapq.nsmallest(n, (r for r in readings if r.distance), key=lambda r: (-r.distance, r.index))
