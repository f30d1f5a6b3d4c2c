"""Synthetic multi-step arithmetic in TinyCoT's shape, for the quality benchmark (bench/quality.py).

Each row is ``{prompt, rationale, target, source}`` like TinyCoT. The prompt lists a start value and
a chain of operations; the rationale writes every intermediate result; the target is the last one::

    prompt:    Start with 7. Add 5, then multiply by 3, then subtract 4. What is the result?
    rationale: 7 + 5 = 12. 12 * 3 = 36. 36 - 4 = 32.
    target:    32

The answer cannot be read off the prompt: a model has to carry the intermediate values, which it
does in the rationale it writes itself. That is where exposure bias bites: at test time the model
conditions on its own (possibly wrong) intermediate results, never on the gold ones it saw in training.

Difficulty: the number of operations (``--steps 3-5``), the largest value any intermediate result may
take (``--max-value``), the largest operand of + and - (``--max-operand``) and of * (``--max-factor``).
Every intermediate value stays in ``[0, max_value]``, so no negative numbers appear.

Splits are disjoint by prompt (the prompt determines the answer) and deterministic in ``--seed``::

    python -m bench.quality_task.generate OUT_DIR [--train 20000] [--test 500] [--val 0] [--seed 0] [--steps 3-5]

writes ``OUT_DIR/train.jsonl``, ``OUT_DIR/test.jsonl`` (``val.jsonl`` with ``--val``) and
``OUT_DIR/meta.json`` (the settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Difficulty", "SOURCE", "STYLES", "generate_splits", "make_problem", "parse_steps", "solve_prompt",
           "write_splits"]

SOURCE = "synth-arith"

# operation name -> (prompt verb phrase, rationale symbol)
_PHRASES = {"add": "add {k}", "subtract": "subtract {k}", "multiply": "multiply by {k}"}
_SYMBOLS = {"add": "+", "subtract": "-", "multiply": "*"}
STYLES = ("words", "symbols")
_APPLY = {"add": lambda v, k: v + k, "subtract": lambda v, k: v - k, "multiply": lambda v, k: v * k}


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """How hard the problems are. The defaults are the benchmark's (see bench/quality.py)."""

    min_steps: int = 3
    max_steps: int = 5
    max_value: int = 30       # every intermediate result lies in [0, max_value]
    max_start: int = 10       # the start value lies in [1, max_start]
    max_operand: int = 5      # + and - use 1..max_operand
    max_factor: int = 3       # * uses 2..max_factor
    style: str = "words"      # prompt wording, see STYLES

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"steps must satisfy 1 <= min <= max, got {self.min_steps}-{self.max_steps}")
        if not 1 <= self.max_start <= self.max_value:
            raise ValueError(f"need 1 <= max_start <= max_value, got {self.max_start} and {self.max_value}")
        if self.max_operand < 1 or self.max_factor < 2:
            raise ValueError(f"need max_operand >= 1 and max_factor >= 2, got {self.max_operand}, {self.max_factor}")


def make_problem(rng: random.Random, difficulty: Difficulty = Difficulty()) -> dict[str, str]:
    """One row ``{prompt, rationale, target, source}`` drawn from ``rng``."""
    d = difficulty
    steps = rng.randint(d.min_steps, d.max_steps)
    value = rng.randint(1, d.max_start)
    start, phrases, symbols, lines = value, [], [], []
    previous = None
    for _ in range(steps):
        feasible = []
        if value + 1 <= d.max_value:
            feasible.append(("add", range(1, min(d.max_operand, d.max_value - value) + 1)))
        if value - 1 >= 0:
            feasible.append(("subtract", range(1, min(d.max_operand, value) + 1)))
        if value > 0 and value * 2 <= d.max_value:
            feasible.append(("multiply", range(2, min(d.max_factor, d.max_value // value) + 1)))
        # Avoid the same operation twice in a row when there is a choice (chains read less repetitive).
        choices = [item for item in feasible if item[0] != previous] or feasible
        op, operands = rng.choice(choices)
        k = rng.choice(list(operands))
        result = _APPLY[op](value, k)
        phrases.append(_PHRASES[op].format(k=k))
        symbols.append(f"{_SYMBOLS[op]} {k}")
        lines.append(f"{value} {_SYMBOLS[op]} {k} = {result}.")
        value, previous = result, op
    if d.style == "symbols":
        prompt = f"From left to right: {start} {' '.join(symbols)} = ?"
    else:
        chain = ", then ".join(phrases)
        prompt = f"Start with {start}. {chain[0].upper()}{chain[1:]}. What is the result?"
    return {"prompt": prompt, "rationale": " ".join(lines), "target": str(value), "source": SOURCE}


_START = re.compile(r"^Start with (\d+)\. (.*)\. What is the result\?$")
_STEP = re.compile(r"^(add|subtract|multiply by) (\d+)$")
_SYMBOLIC = re.compile(r"^From left to right: (\d+)((?: [-+*] \d+)+) = \?$")


def solve_prompt(prompt: str) -> int:
    """Recompute the answer from the prompt text alone (an independent check of the generator)."""
    symbolic = _SYMBOLIC.match(prompt)
    if symbolic is not None:
        value = int(symbolic.group(1))
        tokens = symbolic.group(2).split()
        for op, k in zip(tokens[::2], tokens[1::2]):
            value = value + int(k) if op == "+" else value - int(k) if op == "-" else value * int(k)
        return value
    match = _START.match(prompt)
    if match is None:
        raise ValueError(f"not a generated prompt: {prompt!r}")
    value = int(match.group(1))
    for part in match.group(2).split(", then "):
        step = _STEP.match(part[0].lower() + part[1:])
        if step is None:
            raise ValueError(f"unknown step {part!r} in {prompt!r}")
        op, k = step.group(1), int(step.group(2))
        value = value + k if op == "add" else value - k if op == "subtract" else value * k
    return value


def generate_splits(n_train: int, n_test: int, seed: int = 0, difficulty: Difficulty = Difficulty(),
                    exclude: Iterable[str] = ()) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """``(train, test)``: distinct prompts, none shared between the splits, the same for the same seed.

    Test rows are drawn first, then train rows are drawn until ``n_train`` prompts not in the test
    split (nor repeated) are found. Prompts in ``exclude`` (e.g. a base model's training problems)
    are never drawn. Raises ``ValueError`` if the space of problems is too small.
    """
    rng = random.Random(seed)
    seen: set[str] = set(exclude)

    def draw(count: int) -> list[dict[str, str]]:
        rows: list[dict[str, str]] = []
        misses = 0
        while len(rows) < count:
            row = make_problem(rng, difficulty)
            if row["prompt"] in seen:
                misses += 1
                if misses > 20 * count + 1000:
                    raise ValueError(f"cannot draw {n_train + n_test} distinct problems at {difficulty}: "
                                     "widen the ranges or draw fewer")
                continue
            seen.add(row["prompt"])
            rows.append(row)
        return rows

    test = draw(n_test)
    train = draw(n_train)
    return train, test


def write_splits(out_dir: str | Path, n_train: int, n_test: int, seed: int = 0,
                 difficulty: Difficulty = Difficulty(), n_val: int = 0, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """Write ``train.jsonl``, ``test.jsonl`` (and ``val.jsonl``) and ``meta.json``; return the meta.

    ``n_val`` validation rows (for choosing epochs and settings without touching the test rows) are
    the first draws of the training side: disjoint from both other splits.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    exclude = set(exclude)
    train, test = generate_splits(n_train + n_val, n_test, seed, difficulty, exclude)
    val, train = train[:n_val], train[n_val:]
    splits = [("train", train), ("test", test)] + ([("val", val)] if n_val else [])
    for name, rows in splits:
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    meta = {"seed": seed, "train": len(train), "test": len(test), **({"val": n_val} if n_val else {}), "source": SOURCE,
            "difficulty": dataclasses.asdict(difficulty), **({"excluded_prompts": len(exclude)} if exclude else {})}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def parse_steps(text: str) -> tuple[int, int]:
    """``"3"`` -> (3, 3); ``"3-4"`` -> (3, 4)."""
    low, _, high = text.partition("-")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps {text!r}: expected N or MIN-MAX") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality_task.generate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=20000, help="training rows")
    parser.add_argument("--test", type=int, default=500, help="held-out rows")
    parser.add_argument("--val", type=int, default=0, help="validation rows (val.jsonl), for choosing settings")
    parser.add_argument("--seed", type=int, default=0)
    defaults = Difficulty()
    parser.add_argument("--steps", type=parse_steps, default=(defaults.min_steps, defaults.max_steps),
                        help="operations per problem, N or MIN-MAX (default %(default)s)")
    parser.add_argument("--max-value", type=int, default=defaults.max_value)
    parser.add_argument("--max-start", type=int, default=defaults.max_start)
    parser.add_argument("--max-operand", type=int, default=defaults.max_operand)
    parser.add_argument("--max-factor", type=int, default=defaults.max_factor)
    parser.add_argument("--style", choices=STYLES, default=defaults.style,
                        help="prompt wording: 'Start with 7. Add 5, then ...' or 'From left to right: 7 + 5 ... = ?'")
    parser.add_argument("--exclude", action="append", default=[], metavar="JSONL",
                        help="never draw a prompt of this file (e.g. the base model's training rows); repeatable")
    args = parser.parse_args(argv)
    try:
        difficulty = Difficulty(args.steps[0], args.steps[1], args.max_value, args.max_start, args.max_operand,
                                args.max_factor, args.style)
        excluded = [json.loads(line)["prompt"] for path in args.exclude
                    for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        meta = write_splits(args.out_dir, args.train, args.test, args.seed, difficulty, n_val=args.val,
                            exclude=excluded)
    except ValueError as error:
        print(f"generate: {error}", file=sys.stderr)
        return 2
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
