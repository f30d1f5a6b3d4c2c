"""Fixture files, the sample corpus and the tiny tokenizer: everything offline, all deterministic.

The machines here cannot download TinyCoT, oasst2-curated or reddit-instruct-curated, so this module
writes look-alike rows in each real source's exact shape from templates and a seeded RNG: GSM8K-,
MATH- and StrategyQA-like chain-of-thought rows, multi-turn chats (some with a system turn), and
Reddit posts with answers. With the default 300 rows per source it is the sample corpus the CPU
demo trains on; tests write a few rows.

    python -m composer_remask.tools.fixtures OUT_DIR [--rows 300] [--seed 0]
    python -m composer_remask.tools.fixtures --tokenizer DIR    # the tiny tokenizer (the repo's: assets/tiny-tokenizer)

Files under OUT_DIR: tinycot.jsonl, oasst2.jsonl, oasst2.parquet (same rows), reddit.jsonl and
generic.jsonl (the three generic shapes mixed).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

TINY_TOKENIZER_VOCAB_SIZE = 2048
DEFAULT_ROWS = 300

Row = dict[str, Any]

_NAMES = ["Natalia", "Tom", "Aisha", "Ben", "Mei", "Carlos", "Priya", "Olga", "Sam", "Kofi", "Lena", "Ravi"]
_ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells"]


# ----------------------------------------------------------------------------------- TinyCoT rows


def _gsm8k_row(rng: random.Random) -> Row:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(5)
    if kind == 0:
        a = 2 * rng.randint(6, 60)
        half, total = a // 2, a + a // 2
        prompt = (f"{name} sold {a} {item} in April, and then sold half as many {item} in May. "
                  f"How many {item} did {name} sell altogether in April and May?")
        rationale = f"In May {name} sold {a} / 2 = {half} {item}. Altogether {name} sold {a} + {half} = {total} {item}."
        return {"prompt": prompt, "rationale": rationale, "target": str(total)}
    if kind == 1:
        a, b = rng.randint(10, 90), rng.randint(2, 40)
        c = rng.randint(1, a + b - 1)
        prompt = f"{name} has {a} {item}. {name} buys {b} more and gives away {c}. How many {item} does {name} have now?"
        rationale = f"After buying, {name} has {a} + {b} = {a + b} {item}. After giving some away, {a + b} - {c} = {a + b - c}."
        return {"prompt": prompt, "rationale": rationale, "target": str(a + b - c)}
    if kind == 2:
        a, b = rng.randint(3, 25), rng.randint(2, 12)
        prompt = f"A box holds {a} {item}. How many {item} are in {b} boxes?"
        rationale = f"Each box holds {a} {item}, so {b} boxes hold {a} * {b} = {a * b} {item}."
        return {"prompt": prompt, "rationale": rationale, "target": str(a * b)}
    if kind == 3:
        a, b = rng.randint(8, 30), rng.randint(2, 9)
        prompt = f"{name} earns ${a} per hour and works {b} hours. How many dollars does {name} earn?"
        rationale = f"{name} earns {a} * {b} = {a * b} dollars."
        return {"prompt": prompt, "rationale": rationale, "target": str(a * b)}
    groups, per_group = rng.randint(2, 9), rng.randint(3, 15)
    total = groups * per_group
    prompt = f"There are {total} students split equally into {groups} groups. How many students are in each group?"
    rationale = f"Each group has {total} / {groups} = {per_group} students."
    return {"prompt": prompt, "rationale": rationale, "target": str(per_group)}


def _math_row(rng: random.Random) -> Row:
    a, b, c = rng.randint(2, 30), rng.randint(2, 12), rng.randint(1, 99)
    prompt = f"What is {a} * {b} + {c}?"
    rationale = f"First multiply: {a} * {b} = {a * b}. Then add: {a * b} + {c} = {a * b + c}."
    return {"prompt": prompt, "rationale": rationale, "target": str(a * b + c)}


_FACTS = [  # (question, fact, answer)
    ("Could a cat fit inside a shoebox?", "A small cat is about 45 cm long and a shoebox is about 33 cm long, "
     "but cats curl up easily.", "yes"),
    ("Can a penguin fly to the moon?", "Penguins cannot fly at all, and nothing flies to the moon without a rocket.", "no"),
    ("Is the Pacific the largest ocean?", "The Pacific covers about a third of the Earth's surface, more than any "
     "other ocean.", "yes"),
    ("Would a snowman survive a summer day in the Sahara?", "The Sahara reaches 40 degrees in summer and snow "
     "melts above 0 degrees.", "no"),
    ("Do spiders have more legs than ants?", "Spiders have 8 legs and ants have 6 legs. 8 is more than 6.", "yes"),
    ("Could you read a whole library in one day?", "A library holds thousands of books and reading one book "
     "takes hours.", "no"),
    ("Is water heavier than ice of the same volume?", "Ice floats on water because it is less dense.", "yes"),
    ("Can a bicycle carry ten adults at once?", "A bicycle is built for one or two riders.", "no"),
]


def _strategyqa_row(rng: random.Random) -> Row:
    if rng.random() < 0.5:
        question, fact, answer = rng.choice(_FACTS)
        return {"prompt": question, "rationale": f"{fact} So the answer is {answer}.", "target": answer}
    if rng.random() < 0.5:
        n = rng.randint(2, 500)
        even = n % 2 == 0
        answer = "yes" if even else "no"
        rationale = f"{n} divided by 2 is {n // 2} with remainder {n % 2}. So the answer is {answer}."
        return {"prompt": f"Is {n} an even number?", "rationale": rationale, "target": answer}
    year = rng.randint(1950, 2010)
    age = 2020 - year
    answer = "yes" if age > 30 else "no"
    rationale = (f"In 2020 a person born in {year} was 2020 - {year} = {age} years old. "
                 f"{age} is {'more' if age > 30 else 'not more'} than 30. So the answer is {answer}.")
    return {"prompt": f"Was a person born in {year} older than 30 in 2020?", "rationale": rationale, "target": answer}


def tinycot_rows(n: int, seed: int = 0) -> list[Row]:
    """TinyCoT-shaped rows (``prompt``, ``rationale``, ``target``, ``source``), GSM8K/MATH/StrategyQA mixed."""
    rng = random.Random(f"tinycot-{seed}")
    makers: list[tuple[str, Callable[[random.Random], Row]]] = [
        ("gsm8k", _gsm8k_row), ("gsm8k", _gsm8k_row), ("math", _math_row), ("strategyqa", _strategyqa_row)]
    rows = []
    for _ in range(n):
        origin, make = rng.choice(makers)
        rows.append({**make(rng), "source": origin})
    return rows


# ------------------------------------------------------------------------------------ oasst2 rows

_CONCEPTS = [  # (concept, definition, example)
    ("photosynthesis", "the way plants turn sunlight, water and carbon dioxide into sugar and oxygen",
     "A leaf in the sun makes sugar for the tree and releases oxygen into the air."),
    ("gravity", "the force that pulls masses toward each other",
     "When you drop a ball, gravity pulls it down to the ground."),
    ("a prime number", "a whole number greater than 1 whose only divisors are 1 and itself",
     "7 is prime because only 1 and 7 divide it, while 8 = 2 * 4 is not."),
    ("inflation", "a general rise in prices that lowers what money can buy",
     "If bread costs 2 dollars this year and 3 dollars next year, prices rose by 50 percent."),
    ("a variable in programming", "a name that stores a value a program can read and change",
     "In Python, x = 5 stores 5 in x, and x = x + 1 changes it to 6."),
    ("recursion", "a function that solves a problem by calling itself on a smaller part of it",
     "The factorial of 4 is 4 * factorial(3), and factorial(1) is 1."),
    ("evaporation", "liquid water turning into vapour when it is warmed",
     "A puddle disappears on a sunny afternoon because the water evaporates."),
    ("a fraction", "a number that describes parts of a whole",
     "3/4 of a pizza means 3 of its 4 equal slices."),
]
_SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer clearly and briefly.",
                   "You are a patient tutor who explains step by step."]
_TIPS = {
    "sleeping better": ["Go to bed at the same time every night.", "Keep the bedroom dark and cool.",
                        "Avoid screens for an hour before bed.", "Skip coffee after lunch."],
    "learning a language": ["Practise a little every day.", "Speak with native speakers.",
                            "Learn the most common words first.", "Watch films with subtitles."],
    "saving money": ["Write down what you spend.", "Cook at home more often.",
                     "Set aside savings on payday.", "Wait a day before buying things you want."],
}
_WORDS = [("cat", "chat"), ("house", "maison"), ("water", "eau"), ("book", "livre"), ("friend", "ami"),
          ("apple", "pomme"), ("sun", "soleil")]


def _chat_turns(rng: random.Random) -> list[Row]:
    kind = rng.randrange(4)
    if kind == 0:
        concept, definition, example = rng.choice(_CONCEPTS)
        turns = [("user", f"Can you explain what {concept} is?"),
                 ("assistant", f"Sure. {concept[0].upper() + concept[1:]} is {definition}.")]
        if rng.random() < 0.5:
            turns += [("user", "Can you give me an example?"), ("assistant", example)]
    elif kind == 1:
        a, b = rng.randint(1, 200), rng.randint(1, 200)
        turns = [("user", f"What is {a} plus {b}?"), ("assistant", f"{a} + {b} = {a + b}.")]
        if rng.random() < 0.5:
            c = rng.randint(2, 9)
            turns += [("user", f"And if I multiply that by {c}?"),
                      ("assistant", f"{a + b} * {c} = {(a + b) * c}.")]
    elif kind == 2:
        topic = rng.choice(sorted(_TIPS))
        k = rng.randint(2, 4)
        tips = rng.sample(_TIPS[topic], k)
        answer = "\n".join(f"{i + 1}. {tip}" for i, tip in enumerate(tips))
        turns = [("user", f"Give me {k} tips for {topic}."), ("assistant", f"Here are {k} tips:\n{answer}")]
    else:
        word, french = rng.choice(_WORDS)
        turns = [("user", f"How do you say '{word}' in French?"), ("assistant", f"'{word}' in French is '{french}'.")]
        if rng.random() < 0.4:
            turns += [("user", "Thanks!"), ("assistant", "You're welcome! Happy to help.")]
    if rng.random() < 0.3:
        turns = [("system", rng.choice(_SYSTEM_PROMPTS)), *turns]
    return [{"role": role, "content": content} for role, content in turns]


def oasst2_rows(n: int, seed: int = 0) -> list[Row]:
    """oasst2-curated-shaped rows: ``messages`` of ``{role, content}``, multi-turn, some with a system turn."""
    rng = random.Random(f"oasst2-{seed}")
    return [{"messages": _chat_turns(rng)} for _ in range(n)]


# ------------------------------------------------------------------------------------ reddit rows

_QUESTIONS = [  # (title, optional body, answer)
    ("ELI5: Why is the sky blue?", "I know it has something to do with light.",
     "Sunlight contains every colour. Air molecules scatter short blue waves much more than red ones, "
     "so blue light reaches your eyes from every direction of the sky."),
    ("ELI5: Why do we have leap years?", "",
     "The Earth takes about 365.25 days to go around the Sun. Adding one day every 4 years keeps the "
     "calendar in step with the seasons."),
    ("What's the best way to start running?", "I'm 35 and haven't exercised in years.",
     "Start with walk-run intervals: run 1 minute, walk 2, for 20 minutes, three times a week. Add a "
     "little each week and get decent shoes."),
    ("How do I keep houseplants alive?", "They all die within a month.",
     "Most plants die from too much water. Check the soil with a finger and water only when the top "
     "2 cm are dry, and give them bright indirect light."),
    ("ELI5: How do vaccines work?", "",
     "A vaccine shows your immune system a harmless piece or copy of a germ. Your body learns to "
     "recognise it, so it can fight the real germ quickly later."),
    ("What's a good way to remember names?", "I forget them seconds after hearing them.",
     "Repeat the name right away, use it once in the conversation, and link it to something about the "
     "person. Writing it down afterwards helps too."),
    ("How long should I boil an egg?", "",
     "About 6 minutes for a soft yolk and 10 minutes for a hard one, starting from boiling water, then "
     "cool it in cold water."),
]


def reddit_rows(n: int, seed: int = 0) -> list[Row]:
    """reddit-instruct-curated-shaped rows: post title/text, comment, scores."""
    rng = random.Random(f"reddit-{seed}")
    rows = []
    for _ in range(n):
        title, body, answer = rng.choice(_QUESTIONS)
        if body and rng.random() < 0.3:
            body = ""
        rows.append({"post_title": title, "post_text": body, "comment_text": answer,
                     "post_scores": rng.randint(5, 5000), "comment_score": rng.randint(1, 3000)})
    return rows


def generic_rows(n: int, seed: int = 0) -> list[Row]:
    """Generic JSONL rows cycling through the three shapes: messages, prompt/response, prompt/rationale/answer."""
    chats, cots = oasst2_rows(n, seed + 1), tinycot_rows(n, seed + 1)
    rows: list[Row] = []
    for i in range(n):
        if i % 3 == 0:
            rows.append({"messages": chats[i]["messages"]})
        elif i % 3 == 1:
            turns = chats[i]["messages"]
            user = next(t["content"] for t in turns if t["role"] == "user")
            reply = next(t["content"] for t in turns if t["role"] == "assistant")
            rows.append({"prompt": user, "response": reply})
        else:
            rows.append({"prompt": cots[i]["prompt"], "rationale": cots[i]["rationale"], "answer": cots[i]["target"]})
    return rows


# ----------------------------------------------------------------------------------------- files


def write_jsonl(path: Path, rows: list[Row]) -> Path:
    """One JSON object per line, UTF-8, ``\\n`` line ends (deterministic bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_parquet(path: Path, rows: list[Row]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_source_fixtures(out_dir: str | Path, rows: int = DEFAULT_ROWS, seed: int = 0) -> dict[str, Path]:
    """Write the fixture/sample-corpus files; returns ``{file stem or 'oasst2_parquet': path}``."""
    out = Path(out_dir)
    oasst2 = oasst2_rows(rows, seed)
    return {
        "tinycot": write_jsonl(out / "tinycot.jsonl", tinycot_rows(rows, seed)),
        "oasst2": write_jsonl(out / "oasst2.jsonl", oasst2),
        "oasst2_parquet": write_parquet(out / "oasst2.parquet", oasst2),
        "reddit": write_jsonl(out / "reddit.jsonl", reddit_rows(rows, seed)),
        "generic": write_jsonl(out / "generic.jsonl", generic_rows(rows, seed)),
    }


# ------------------------------------------------------------------------------------- tokenizer


def tokenizer_training_text(rows: int = DEFAULT_ROWS, seed: int = 0) -> list[str]:
    """Sample-corpus text plus arithmetic drills, so numbers and operators get their own tokens."""
    texts: list[str] = []
    for row in tinycot_rows(rows, seed):
        texts += [row["prompt"], row["rationale"], row["target"]]
    for row in oasst2_rows(rows, seed):
        texts += [turn["content"] for turn in row["messages"]]
    for row in reddit_rows(rows, seed):
        texts += [row["post_title"], row["post_text"], row["comment_text"]]
    rng = random.Random(f"drills-{seed}")
    for _ in range(2000):
        a, b = rng.randint(0, 999), rng.randint(0, 99)
        op = rng.choice("+-*/")
        result = {"+": a + b, "-": a - b, "*": a * b, "/": a // max(b, 1)}[op]
        texts.append(f"{a} {op} {b} = {result}.")
    texts.append(" ".join(str(i) for i in range(1000)))
    return texts


def build_tiny_tokenizer(vocab_size: int = TINY_TOKENIZER_VOCAB_SIZE, seed: int = 0) -> PreTrainedTokenizerFast:
    """The demo's tokenizer: byte-level BPE trained on the sample corpus (ReMask tags included)."""
    from composer_remask.data.tokenizer import train_tiny_tokenizer

    return train_tiny_tokenizer(tokenizer_training_text(seed=seed), vocab_size=vocab_size)


def save_tiny_tokenizer(out_dir: str | Path) -> Path:
    """Write the tiny tokenizer to ``out_dir`` with ``save_pretrained`` (the repository keeps one in
    ``assets/tiny-tokenizer``)."""
    out = Path(out_dir)
    build_tiny_tokenizer().save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m composer_remask.tools.fixtures",
                                     description="Write fixture / sample-corpus files, or rebuild the tiny tokenizer.")
    parser.add_argument("out_dir", nargs="?", help="folder for tinycot.jsonl, oasst2.jsonl, ...")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="rows per source")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", metavar="DIR", help="also (re)build the tiny tokenizer into DIR")
    args = parser.parse_args(argv)
    if args.out_dir is None and args.tokenizer is None:
        parser.error("give OUT_DIR, --tokenizer DIR, or both")
    if args.rows < 0:
        parser.error(f"--rows must be >= 0, got {args.rows}")
    try:
        if args.out_dir is not None:
            for path in write_source_fixtures(args.out_dir, rows=args.rows, seed=args.seed).values():
                print(path)
        if args.tokenizer is not None:
            print(save_tiny_tokenizer(args.tokenizer))
    except (OSError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
