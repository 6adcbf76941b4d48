"""The instruction prompts of the ``chat`` task, generated deterministically.

No dataset hub is reachable, so the chat task ships its own prompts as
``messages``-format JSONL (``asyncopd/tasks/data/chat_{train,eval}.jsonl``, one
``{"messages": [{"role": "user", "content": ...}]}`` per line). They are made here
from instruction templates (explain, write, list, compare, advise, describe,
summarise, ...) crossed with subjects, sampled with a fixed seed; the held-out
prompts use subjects that never occur in training, so evaluation measures
generalisation, not recall of training prompts.

``python -m asyncopd.tasks.chat_prompts`` rewrites the two files (a unit test checks
that they match what this module generates).

This module does not tokenize or render chat templates (see :mod:`asyncopd.tasks.jsonl`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = ["DATA_DIR", "NUM_EVAL", "NUM_TRAIN", "generate", "main"]

DATA_DIR = Path(__file__).parent / "data"
NUM_TRAIN = 600
NUM_EVAL = 64
_SEED = 20261203

_TEMPLATES: dict[str, list[str]] = {
    "concept": [
        "Explain {s} in simple terms.",
        "What is {s}, and why does it matter?",
        "Explain {s} to a ten-year-old.",
        "Give a short definition of {s} and one example.",
        "What are common misconceptions about {s}?",
    ],
    "thing": [
        "Write a short poem about {s}.",
        "Describe {s} in three sentences.",
        "Write a haiku about {s}.",
        "List three interesting facts about {s}.",
        "Write a short advertisement for {s}.",
    ],
    "activity": [
        "Give me three tips for {s}.",
        "How do I get started with {s}?",
        "What are the benefits of {s}?",
        "What mistakes do beginners make when {s}?",
        "Write a short plan for a week of {s}.",
    ],
    "place": [
        "Describe {s} to someone who has never been there.",
        "What should a visitor to {s} know?",
        "Write a postcard message from {s}.",
        "What is a typical day like in {s}?",
    ],
    "pair": [
        "What is the difference between {s}?",
        "Compare {s} in a few sentences.",
        "Which would you choose, {s}? Explain briefly.",
    ],
    "character": [
        "Write a short story about {s}.",
        "Write the opening paragraph of a story about {s}.",
        "Write a dialogue between a child and {s}.",
    ],
    "message": [
        "Write a short email {s}.",
        "Write a polite text message {s}.",
        "Draft a short note {s}.",
    ],
}

_SUBJECTS: dict[str, list[str]] = {
    "concept": [
        "gravity", "photosynthesis", "inflation", "the water cycle", "machine learning", "democracy",
        "compound interest", "evolution", "electricity", "the immune system", "supply and demand",
        "climate change", "recycling", "the internet", "vaccines", "black holes", "memory", "sleep",
        "friction", "volcanoes", "tides", "rainbows", "encryption", "a budget", "the stock market",
        "nutrition", "exercise", "magnetism", "plate tectonics", "the moon's phases", "sound waves",
        "renewable energy", "a recipe", "a habit", "empathy", "time zones", "seasons", "erosion",
        "the heart", "bacteria", "a computer program", "a library", "taxes", "insurance", "a vote",
        "a map", "a calendar", "a battery", "a bridge", "an engine", "light", "clouds", "fossils",
        "probability", "fractions", "gravity on Mars", "a rocket", "an ecosystem", "music notes",
        "a telescope", "a microscope", "genes", "weather forecasts", "a password",
    ],
    "thing": [
        "the ocean", "autumn leaves", "a cup of coffee", "a rainy day", "the city at night", "a lighthouse",
        "an old bicycle", "a garden", "the first snow", "a cat", "a dog", "mountains", "a quiet morning",
        "the stars", "a train journey", "a forest", "the desert", "a river", "a candle", "a storm",
        "a birthday", "a friendship", "a sunset", "a market", "an umbrella", "bread", "a violin",
        "the wind", "a book", "a bird", "the moon", "a clock", "honey bees", "a kite", "a snowman",
        "an island", "a bakery", "a painting", "summer", "winter", "spring", "a lake", "a paper boat",
    ],
    "activity": [
        "learning a new language", "running", "cooking at home", "saving money", "studying for exams",
        "public speaking", "gardening", "writing every day", "learning to swim", "working from home",
        "reading more books", "drawing", "playing the guitar", "meditation", "hiking", "traveling on a budget",
        "learning to code", "baking bread", "keeping a journal", "taking photos", "cycling to work",
        "making friends in a new city", "staying focused", "cleaning the house", "planning a party",
        "camping", "learning chess", "doing yoga", "growing tomatoes", "volunteering", "job interviews",
        "writing a resume", "managing stress", "eating healthy", "sleeping better", "teaching a class",
        "knitting", "fishing", "painting walls", "moving house", "learning math", "playing football",
    ],
    "place": [
        "a small fishing village", "a busy train station", "a mountain cabin", "a tropical beach",
        "a night market", "a public library", "a desert town", "an old castle", "a farm", "a big city park",
        "a school playground", "a hospital waiting room", "a museum", "a space station", "a coral reef",
        "a rainforest", "an airport", "a zoo", "a bakery at dawn", "a snowy village", "a harbor",
        "a football stadium", "a quiet island", "a science lab", "a bookshop", "a river delta",
    ],
    "pair": [
        "a virus and a bacterium", "weather and climate", "tea and coffee", "a lake and a sea",
        "cats and dogs as pets", "renting and buying a home", "a train and a plane for travel",
        "email and letters", "a laptop and a tablet", "running and swimming", "books and films",
        "a city and a village", "saving and investing", "speed and velocity", "a star and a planet",
        "fruits and vegetables", "summer and winter holidays", "walking and cycling", "paper and plastic bags",
        "a poem and a song", "hardware and software", "a river and a canal", "a map and a globe",
        "baking and frying", "a doctor and a nurse", "a violin and a cello", "a plan and a goal",
    ],
    "character": [
        "a robot who learns to paint", "a lost kitten", "a lighthouse keeper", "a girl who can talk to birds",
        "an old sailor", "a dragon afraid of fire", "a baker in a small town", "a boy who finds a map",
        "a tree that remembers everything", "a detective on holiday", "a shy giant", "a clock maker",
        "a mouse in a library", "a time traveler", "a grandmother who climbs mountains", "a talking bicycle",
        "a young astronaut", "a fox and a crow", "a musician who lost her voice", "a penguin in the desert",
        "a gardener and a storm", "a teacher on the last day of school", "two friends and a secret",
    ],
    "message": [
        "to a colleague asking to move a meeting", "to a neighbor about a lost package",
        "to a friend inviting them to dinner", "to a teacher asking for more time",
        "thanking a friend for a gift", "to a landlord about a broken heater", "apologizing for being late",
        "to a team announcing a new project", "asking a shop about a refund", "congratulating a friend",
        "to a coach about missing practice", "to a client confirming an order",
        "to a family member about a holiday plan", "asking a librarian for a book",
        "welcoming a new team member", "to a doctor's office to book an appointment",
    ],
}


def _prompts(subjects: dict[str, list[str]], n: int, rng: random.Random) -> list[str]:
    pool = sorted({template.format(s=s) for kind, templates in _TEMPLATES.items()
                   for template in templates for s in subjects[kind]})
    if len(pool) < n:
        raise ValueError(f"only {len(pool)} distinct prompts for {n} requested")
    return rng.sample(pool, n)


def generate() -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): every 5th subject of each kind is held out."""
    rng = random.Random(_SEED)
    train_subjects = {k: [s for i, s in enumerate(v) if i % 5 != 4] for k, v in _SUBJECTS.items()}
    eval_subjects = {k: [s for i, s in enumerate(v) if i % 5 == 4] for k, v in _SUBJECTS.items()}
    return _prompts(train_subjects, NUM_TRAIN, rng), _prompts(eval_subjects, NUM_EVAL, rng)


def _lines(prompts: list[str]) -> str:
    return "".join(json.dumps({"messages": [{"role": "user", "content": p}]}) + "\n" for p in prompts)


def main() -> int:
    """Write asyncopd/tasks/data/chat_train.jsonl and chat_eval.jsonl."""
    train, eval_ = generate()
    DATA_DIR.mkdir(exist_ok=True)
    (DATA_DIR / "chat_train.jsonl").write_text(_lines(train))
    (DATA_DIR / "chat_eval.jsonl").write_text(_lines(eval_))
    print(f"wrote {len(train)} training and {len(eval_)} held-out prompts under {DATA_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
