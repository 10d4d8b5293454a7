"""The prompt language of AUTOMATIC1111's web UI, read exactly as A1111 1.10 reads it
(`modules/prompt_parser.py`), without torch and without lark.

A1111 reads a prompt in three layers, and so do we:
1. `split_and`: ` AND ` splits a positive prompt into composable parts, each with an optional
   `:weight` (we refuse AND for now: `prompt_problem`);
2. `prompt_schedule`: each part is a schedule of plain prompts over the sampling steps, from
   prompt editing `[from:to:when]` and alternation `[a|b]`;
3. `parse_attention`: each plain prompt is runs of text with emphasis weights (`(x)`, `[x]`,
   `(x:1.3)`, `BREAK`), which the text encoder applies per token.

A1111 reads layer 2 with a lark Earley grammar; we read the same language with a small hand-written
parser. That grammar is ambiguous where a run of brackets and colons outside any edit can either
close an edit or be plain text (`[a:1]:2]`): there lark's choice follows Python's string hash seed,
so A1111 itself reads such a prompt differently from one launch to the next. We always take the
reading that keeps the edit (one of A1111's readings); everywhere else we match A1111 exactly.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------
# 3. emphasis: parse_prompt_attention

ROUND = 1.1  # `(x)` multiplies x's weight by this
SQUARE = 1 / 1.1  # `[x]` multiplies by this: A1111 multiplies by 1/1.1, it never divides by 1.1
BREAK = ("BREAK", -1.0)  # the pair that ends a 75-token chunk (weight -1 marks it, as in A1111)

# A1111's `re_attention`, alternatives in its order: an escaped `( ) [ ] \` is that character; a
# lone backslash is dropped; `:1.3)` (with optional spaces) closes a round bracket with a weight;
# anything else without brackets, backslashes or colons is text; a colon alone is text.
_ATTENTION = re.compile(r"\\[()\[\]\\]|\\|[(\[]|:\s*([+-]?[.\d]+)\s*\)|[)\]]|[^\\()\[\]:]+|:")
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Runs of text and their emphasis weights, as A1111's `parse_prompt_attention`.

    `(x)` x1.1, `[x]` x(1/1.1), `(x:w)` xw, nesting multiplies; brackets left open close at the end
    (round ones first, then square ones, each in the order they were opened); closers with nothing
    to close are text; `BREAK` as a word (upper case) becomes the pair ("BREAK", -1.0), the spaces
    around it dropped; neighbouring runs of equal weight merge; "" gives [("", 1.0)].

    Kept from A1111 on purpose, since the pictures depend on it: the floating-point order of the
    multiplications (`house` in `(((house:1.3))` is 1.5730000000000004); a lone backslash vanishes
    (`C:\\path` -> `C:path`); `(x:abc)` is x:abc at 1.1 (the weight must look like a number);
    a BREAK inside brackets is scaled like its neighbours (-1.1 in `(a BREAK b)`) and so is no
    longer a BREAK to the encoder, which tests `weight == -1`.
    Where A1111 fails (`(x:1.2.3)`: float() of the weight raises), we read `:1.2.3` as text and
    `)` as a plain close; `prompt_problem` reports it."""
    runs: list[list] = []  # [text, weight], mutable as in A1111: closers scale whole tails
    round_open: list[int] = []  # index into runs where each open bracket began
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in _ATTENTION.finditer(text):
        piece, weight = m[0], m[1]
        if piece[0] == "\\":
            runs.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(runs))
        elif piece == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            value = _weight(weight)
            if value is None:  # A1111 raises here; read the weight as text and close the bracket
                runs.append([piece[:-1], 1.0])
                value = ROUND
            scale(round_open.pop(), value)
        elif piece == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif piece == "]" and square_open:
            scale(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK_WORD.split(piece)):
                if i:
                    runs.append(list(BREAK))
                runs.append([part, 1.0])
    for start in round_open:
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)
    if not runs:
        return [("", 1.0)]
    merged = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, float(w)) for t, w in merged]


def _weight(text: str) -> float | None:
    """An explicit emphasis weight as A1111 reads it (float()), or None where A1111 fails."""
    try:
        return float(text)
    except ValueError:
        return None


def _weight_problem(text: str) -> str | None:
    """Why an explicit `(x:w)` weight in this plain prompt cannot be used, or None."""
    depth = 0  # only a weight that closes an open round bracket is read as a number
    for m in _ATTENTION.finditer(text):
        piece, weight = m[0], m[1]
        if piece == "(":
            depth += 1
        elif depth and (weight is not None or piece == ")"):
            depth -= 1
            if weight is None:
                continue
            value = _weight(weight)
            if value is None:
                return f"the emphasis weight in '{piece}' is not a number (A1111 stops with an error on it)"
            if not math.isfinite(value):
                return f"the emphasis weight in '{piece}' is not a finite number"
    return None


# ---------------------------------------------------------------------------------------------
# 2. prompt editing: get_learned_conditioning_prompt_schedules

_SPECIAL = frozenset("[]():|")  # one-character tokens; everything else is text
_JUNK = frozenset("[]():")  # what may stand outside any structure (lark's `/[][():]/+`)
# lark's common.SIGNED_NUMBER, alternatives in its order (matched with re.match, like lark's lexer)
_NUMBER = re.compile(r"[+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.(?:[0-9]+)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+)")
_SPACE = re.compile(r"\s*")


@dataclass(frozen=True)
class _Group:
    """Emphasis brackets `(a)`, `(a:b)`, `[a]`: kept as written, their contents read."""

    open: str
    parts: tuple[tuple, ...]  # one or two sequences, joined by ':'
    close: str


@dataclass(frozen=True)
class _Edit:
    """`[before:after:when]` (`before` is None in `[after:when]`)."""

    before: tuple | None
    after: tuple
    number: str  # lark's NUMBER token as written: its '.' decides fraction or step
    source: str  # the whole bracket as written, for messages

    def switch(self, steps: int, base: int | None = None) -> float:
        """The step after which `after` replaces `before`, before clamping (may be inf). In a hires
        fix's second pass (`base`: the first pass's steps) A1111 counts on from the first pass: a
        fraction `f` is (f - 1) of the second pass's steps, a step number n is n - base."""
        value = float(self.number)
        if base is not None:
            return (value - 1.0) * steps if "." in self.number else value - base
        return value * steps if "." in self.number else value

    def when(self, steps: int, base: int | None = None) -> int:
        """As A1111 (new timelines): min(steps, int(switch)), with +-inf read as +-huge."""
        value = self.switch(steps, base)
        if math.isinf(value):
            return steps if value > 0 else -1
        return min(steps, int(value))


@dataclass(frozen=True)
class _Alternate:
    """`[a|b|c]`: option (step - 1) mod n at each step."""

    options: tuple[tuple, ...]


class _Parser:
    """The schedule grammar over a token list. A structure is read from its opening bracket to its
    closing one and never depends on what stands before it, so each is read once (`items`)."""

    def __init__(self, text: str, tokens: list[str], starts: list[int]):
        self.text, self.tokens, self.starts = text, tokens, starts
        # opening bracket index -> (structure, index after its closing bracket) or None; filled
        # from the right, so every structure nested in another is read before the one around it
        self.items: dict[int, tuple[object, int] | None] = {}
        for i in range(len(tokens) - 1, -1, -1):
            if tokens[i] in ("(", "["):
                self.items[i] = self._read(i)

    def sequence(self, i: int) -> tuple[tuple, int]:
        """The longest run of text and structures from i (a `prompt`), and where it stops."""
        nodes = []
        tokens = self.tokens
        while i < len(tokens):
            token = tokens[i]
            if token not in _SPECIAL:
                nodes.append(token)
                i += 1
            elif (item := self.items.get(i)) is not None:
                nodes.append(item[0])
                i = item[1]
            else:
                break
        return tuple(nodes), i

    def _token(self, i: int) -> str | None:
        return self.tokens[i] if i < len(self.tokens) else None

    def _read(self, i: int) -> tuple[object, int] | None:
        open_ = self.tokens[i]
        first, j = self.sequence(i + 1)
        sep = self._token(j)
        if open_ == "(":
            if sep == ")":
                return _Group("(", (first,), ")"), j + 1
            if sep == ":":
                second, k = self.sequence(j + 1)
                if self._token(k) == ")":
                    return _Group("(", (first, second), ")"), k + 1
            return None
        if sep == "]":
            return _Group("[", (first,), "]"), j + 1
        if sep == "|":
            options = [first]
            while self._token(j) == "|":
                option, j = self.sequence(j + 1)
                options.append(option)
            return (_Alternate(tuple(options)), j + 1) if self._token(j) == "]" else None
        if sep != ":":
            return None
        second, k = self.sequence(j + 1)
        if self._token(k) == "]":  # [after:when]
            before, after, number, end = None, first, _when_number(second), k
        elif self._token(k) == ":":  # [before:after:when]
            third, end = self.sequence(k + 1)
            if self._token(end) != "]":
                return None
            before, after, number = first, second, _when_number(third)
        else:
            return None
        if number is None:
            return None
        source = self.text[self.starts[i] : self.starts[end] + 1]
        return _Edit(before, after, number, source), end + 1


def _when_number(sequence: tuple) -> str | None:
    """The NUMBER of `:[ ]NUMBER[ ]]` when this sequence is exactly that, else None."""
    if len(sequence) != 1 or not isinstance(sequence[0], str):
        return None
    text = sequence[0]
    start = _SPACE.match(text).end()
    m = _NUMBER.match(text, start)
    if m is None or _SPACE.match(text, m.end()).end() != len(text):
        return None
    return m[0]


def _tokenize(text: str) -> tuple[list[str], list[int]] | None:
    """One-character specials and the text between them (escapes `\\x` kept as written), with
    their offsets; None where lark's lexer finds no token: a backslash at the end or before a
    line break (then A1111 takes the whole prompt as written)."""
    tokens: list[str] = []
    starts: list[int] = []
    run = None  # start of the text run being read
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _SPECIAL:
            if run is not None:
                tokens.append(text[run:i])
                starts.append(run)
                run = None
            tokens.append(c)
            starts.append(i)
            i += 1
            continue
        if run is None:
            run = i
        if c == "\\":
            if i + 1 >= n or text[i + 1] == "\n":
                return None
            i += 2
        else:
            i += 1
    if run is not None:
        tokens.append(text[run:])
        starts.append(run)
    return tokens, starts


def _parse(text: str) -> tuple | None:
    """The prompt as a sequence of text, junk brackets and structures, or None where A1111's
    grammar does not parse it (a '|' outside any `[a|b]`, a backslash at the end).

    lark's `start: (prompt | /[][():]/+)*` lets any bracket or colon stand alone, so a prompt
    can be cut into structures and stray brackets in many ways. lark's Earley parser resolves
    that from the end backwards: the whole text as one prompt if it is one, else all stray
    brackets if it is only those, else a prompt ending here if one can, else a stray bracket.
    Only the cut point of that last choice is left to set order (hash seed) in lark; we take the
    shortest run of stray brackets, which leaves every structure that can close, closed."""
    tokenized = _tokenize(text)
    if tokenized is None:
        return None
    tokens, starts = tokenized
    parser = _Parser(text, tokens, starts)
    n = len(tokens)
    ends: dict[int, int] = {}  # index after a structure -> its opening bracket
    reachable = [False] * (n + 1)  # can tokens[:i] be cut into prompts and stray brackets?
    reachable[0] = True
    for i, token in enumerate(tokens):
        if not reachable[i]:
            continue
        if token not in _SPECIAL or token in _JUNK:
            reachable[i + 1] = True
        if (item := parser.items.get(i)) is not None:
            reachable[item[1]] = True
            ends[item[1]] = i
    if not reachable[n]:
        return None
    chain, i = [], 0  # tokens read as one prompt from the start, for as long as that goes
    whole = {0: 0}  # i -> how many of those nodes make tokens[:i], where they make it
    while i < n:
        if tokens[i] not in _SPECIAL:
            chain.append(tokens[i])
            i += 1
        elif (item := parser.items.get(i)) is not None:
            chain.append(item[0])
            i = item[1]
        else:
            break
        whole[i] = len(chain)
    first_text = next((k for k, t in enumerate(tokens) if t not in _JUNK), n)
    pieces: list = []  # from the end backwards
    j = n
    while j > 0:
        if j in whole:
            pieces.extend(reversed(chain[: whole[j]]))
            break
        if j <= first_text:
            pieces.extend(reversed(tokens[:j]))
            break
        token = tokens[j - 1]
        if token not in _SPECIAL:
            pieces.append(token)
            j -= 1
        elif j in ends and reachable[ends[j]]:
            pieces.append(parser.items[ends[j]][0])
            j = ends[j]
        else:
            pieces.append(token)
            j -= 1
    return tuple(reversed(pieces))


def _walk(tree: tuple):
    """Every structure in the tree, in all branches (A1111's CollectSteps visits them all)."""
    stack = [iter(tree)]
    while stack:
        node = next(stack[-1], None)
        if node is None:
            stack.pop()
        elif not isinstance(node, str):
            yield node
            if isinstance(node, _Edit):
                stack.extend(iter(p) for p in (node.after, node.before) if p is not None)
            elif isinstance(node, _Group):
                stack.extend(iter(p) for p in reversed(node.parts))
            else:
                stack.extend(iter(p) for p in reversed(node.options))


def _render(tree: tuple, step: int, steps: int, base: int | None = None) -> str:
    """The plain prompt at `step` (counted from 1). Iterative: nesting depth is the user's."""
    out: list[str] = []
    stack = [iter(tree)]
    while stack:
        node = next(stack[-1], None)
        if node is None:
            stack.pop()
        elif isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Edit):
            branch = (node.before or ()) if step <= node.when(steps, base) else node.after
            stack.append(iter(branch))
        elif isinstance(node, _Alternate):
            stack.append(iter(node.options[(step - 1) % len(node.options)]))
        else:
            flat: list = [node.open]
            for k, part in enumerate(node.parts):
                if k:
                    flat.append(":")
                flat.extend(part)
            flat.append(node.close)
            stack.append(iter(flat))
    return "".join(out)


def prompt_schedule(text: str, steps: int, base: int | None = None) -> list[tuple[int, str]]:
    """(end step, plain prompt) pairs over `steps` sampling steps: A1111's
    `get_learned_conditioning_prompt_schedules([text], steps)[0]`. The prompt of pair k is used for
    steps end(k-1)+1 .. end(k) (steps counted from 1); the last end is `steps`.

    `[from:to:when]`, `[to:when]` (from nothing), `[from::when]` (to nothing), nested freely;
    `[a|b|c]` takes option (step-1) mod 3 at each step. This is A1111 1.10's default ("new")
    timeline for a first pass: a `when` written with a '.' is a fraction of the steps
    (int(when*steps): `0.5`, `1.5`), one without is a step number (`3`, `1e1`); the switch comes
    after step min(steps, int(...)), and one below step 1 never shows `from`. With `base` (the
    first pass's steps) this is a hires fix's second pass, A1111's `hires_steps` timeline: the
    edits continue from the first pass (`[a:b:0.5]` is `b` all through it; see `_Edit.switch`). Not
    modelled: the old timeline option (`use_old_scheduling`). Also note that A1111 calls this
    with the sampler's total steps (twice `steps` for second-order samplers).

    A text that the grammar does not parse (a '|' outside `[a|b]`, a backslash at the end) is used
    as written, and unbalanced brackets are text, as in A1111: nothing here raises."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")
    tree = _parse(text)
    if tree is None:
        return [(steps, text)]
    ends = {steps}
    for node in _walk(tree):
        if isinstance(node, _Edit):
            when = node.when(steps, base)
            if when >= 1:
                ends.add(when)
        elif isinstance(node, _Alternate):
            ends.update(range(1, steps + 1))
    return [(end, _render(tree, end, steps, base)) for end in sorted(ends)]


def old_timeline_differs(text: str, hires: bool) -> bool:
    """Whether A1111's old prompt-editing timeline (before 1.6; `Old prompt editing timelines`,
    which A1111 implies for texts of those versions) gives this text another schedule than the
    new one `prompt_schedule` follows. The old one reads a `when` of 1 or more as a step number
    even when written with a '.', and a hires fix's second pass walks the first pass's timeline by
    its own step numbers: with hires fix, every edit changes."""
    tree = _parse(text)
    edits = [node for node in _walk(tree) if isinstance(node, _Edit)] if tree is not None else []
    return any(hires or ("." in node.number and float(node.number) >= 1) for node in edits)


# ---------------------------------------------------------------------------------------------
# 1. composable prompts: get_multicond_prompt_list

_AND = re.compile(r"\bAND\b")
# A1111's `re_weight`: the part, then an optional `:weight` at its very end
_PART_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)


def split_and(text: str) -> list[tuple[str, float]]:
    """The composable parts of a positive prompt and their weights, as A1111's
    `get_multicond_prompt_list`: split at the word AND (`\\bAND\\b`, so `(AND)` splits too), each
    part's trailing `:1.5` is its weight (default 1.0), trailing spaces dropped, leading ones kept.
    A1111 splits only positive prompts; a negative prompt's AND is text."""
    parts = []
    for part in _AND.split(text):
        body, weight = _PART_WEIGHT.match(part).groups()
        parts.append((body, float(weight) if weight is not None else 1.0))
    return parts


# ---------------------------------------------------------------------------------------------
# what we refuse, and --explain-prompt


def prompt_problem(text: str, steps: int | None = None, *, negative: bool = False) -> str | None:
    """Why sdbatch cannot render this prompt as A1111 would, in one line, or None.

    Refused: composable prompts (`AND`, positive prompts only: `negative=True` skips it, as A1111
    reads AND in a negative prompt as text); a prompt-editing `when` that is negative, infinite, or
    past the last step (`[a:b:15]` at 10 steps, `[a:b:1.5]`: A1111 would quietly clamp it); an
    emphasis weight A1111 fails on (`(x:1.2.3)`) or that is infinite. Unbalanced brackets, stray
    colons and `(x:abc)` are not problems: A1111 reads them as text, and so do we. Without `steps`
    only what is wrong at any step count is checked."""
    if not negative and _AND.search(text):
        return (
            "composable prompts (AND) are not supported yet; write 'and' in lower case for the word, "
            "or render the parts as separate prompts"
        )
    tree = _parse(text)
    for node in _walk(tree or ()):
        if not isinstance(node, _Edit):
            continue
        value = node.switch(steps or 1)
        if math.isnan(value) or math.isinf(value):
            return f"prompt editing {node.source}: the switch point {node.number} is not a finite number"
        if value < 0:
            return f"prompt editing {node.source}: the switch point {node.number} is negative"
        if "." in node.number and float(node.number) > 1:
            return (
                f"prompt editing {node.source}: {node.number} has a '.', so it is a fraction of the steps, "
                "and it is past 1.0; write a fraction up to 1.0 or a whole step number"
            )
        if steps is not None and value > steps:
            return f"prompt editing {node.source}: switches after step {int(value)}, but there are only {steps} steps"
    texts = {text} if steps is None else {part for _, part in prompt_schedule(text, steps)}
    for part in sorted(texts):
        if (problem := _weight_problem(part)) is not None:
            return problem
    return None


def _weight_text(weight: float) -> str:
    return f"x{round(weight, 4)!r}"


def explain(text: str, steps: int, *, negative: bool = False) -> list[str]:
    """Lines for `sdbatch plan --explain-prompt`: what refuses the prompt (if anything), where the
    prompt changes over the steps, then each plain prompt's weighted runs, e.g.
    `steps 1-10: "a cat" x1.0, "red" x1.5`. Plain text: print it unstyled (it holds brackets).
    `negative` as in `prompt_problem`."""
    lines = []
    if (problem := prompt_problem(text, steps, negative=negative)) is not None:
        lines.append(f"problem: {problem}")
    schedule = prompt_schedule(text, steps)
    if _parse(text) is None:
        lines.append(
            "prompt editing: none; a '|' outside [a|b] or a '\\' at the end makes A1111 use the text as written"
        )
    elif len(schedule) == 1:
        lines.append(f"prompt editing: none; one prompt for all {steps} steps")
    else:
        switches = ", ".join(str(end) for end, _ in schedule[:-1])
        after = "step" if len(schedule) == 2 else "steps"
        lines.append(f"prompt editing: {len(schedule)} prompts over {steps} steps, switching after {after} {switches}")
    first = 1
    for end, part in schedule:
        span = f"step {end}" if first == end else f"steps {first}-{end}"
        runs = ", ".join(
            "BREAK" if (t, w) == BREAK else f"{json.dumps(t, ensure_ascii=False)} {_weight_text(w)}"
            for t, w in parse_attention(part)
        )
        lines.append(f"{span}: {runs}")
        first = end + 1
    return lines
