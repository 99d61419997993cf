"""The embedded demo: a generated English-like corpus and a tiny Llama trained on it, shipped with the project.

Why: the pipeline must run end to end with no network and no GPU, on exactly the code path a real model
(OpenLLaMA-3B) takes. So this module trains a 4.2M-parameter `LlamaForCausalLM` plus a byte-level BPE
tokenizer (250 steps, about 3 min of one CPU core; loss 7.6 -> 1.45 nats/token, unigram entropy 5.6) and
saves them as a normal Hugging Face folder, loadable with `AutoModelForCausalLM.from_pretrained(dir)` /
`AutoTokenizer.from_pretrained(dir)`. The build always trains exactly `steps` steps, on `threads` (1) torch
threads: nothing in it depends on how fast or busy the machine is, nor on its core count or OMP_NUM_THREADS
(wall time is recorded in demo_build.json as information only), so the same config on the same machine
gives byte-identical files.

The default build is shipped in the repository, in common/demo_lm/ (config.json, model.safetensors,
generation_config.json, the tokenizer files, demo_build.json), so every machine starts from the same
weights: another CPU's float kernels (AVX2 vs AVX-512, ...) could otherwise give other weights, and every
downstream figure with them. `ensure_demo_model` (and so `--model demo`, `--dataset demo`, `make demo`)
copies the shipped files into checkpoints/demo and writes the pipeline corpus next to them, in about a
second, instead of training; a checkpoints/demo whose files differ from the shipped ones (a local rebuild)
is replaced by them. Other configs (the tiny test preset) are built by training.

    python -m common.demo [--out DIR] [--tiny]     # ensure DIR (default <project>/checkpoints/demo) holds the build
    python -m common.demo --force [--out DIR]      # rebuild by training (~3 min), e.g. to check it reproduces
    python -m common.demo --ship                   # rebuild the default config and refresh common/demo_lm/

The folder holds config.json, model.safetensors, the tokenizer files, demo_build.json (build config,
losses, steps done, wall time) and the pipeline corpus corpus.txt / corpus.jsonl.

The corpus
----------
Each document is one speaker with a fixed (formality, emotion, topic), 3-8 sentences, so the factors can be
inferred from context:
  formality  formal | casual       register: "I would like to mention that ...", "Furthermore," vs "tbh",
                                   "gonna", "lol", contractions
  emotion    emotional | neutral   EMOTIONAL_ADJECTIVES vs NEUTRAL_ADJECTIVES, "!" / "!!" vs ".",
                                   emotion-specific sentence shapes
  topic      TOPICS (8)            TOPIC_WORDS: nouns, verb phrases, adjectives per topic
About 60 sentence shapes, slot-filled from names, places, days, times, numbers and topic words, with
optional opening/closing clauses, so the model has to learn structure rather than memorise templates
(and BPE with vocab 2048 fills its vocabulary).

Integration constructions (wording set by the *pair* of factors, not by either alone):
  (a) INTENSIFIERS[(formality, emotion)] and CLOSINGS[(formality, emotion)]: disjoint word sets per cell,
      e.g. formal+emotional "profoundly" / "I am deeply moved.", casual+emotional "totally" / "omg!!",
      formal+neutral "reasonably" / "Kind regards.", casual+neutral "kinda" / "ok cya.".
  (b) XOR marker: one sentence (sometimes two, never the first) per document opens with a discourse
      marker. It is XOR_MARKER ("Meanwhile,") when formality XOR emotion, i.e. formal+neutral or
      casual+emotional, and NON_XOR_MARKER ("Besides,") otherwise. Each factor alone carries no
      information about which marker appears; the pair determines it. Neither word occurs elsewhere.

The LM trains on documents generated with `lm_seed` (0); the pipeline corpus written next to it uses
`corpus_seed` (1), so the SAE stages read text the LM never saw.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import math
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEMO_DIR = PROJECT_ROOT / "checkpoints" / "demo"
SHIPPED_DIR = PROJECT_ROOT / "common" / "demo_lm"   # the tracked default build (no corpus: it is regenerated)
CORPUS_FILES = ("corpus.txt", "corpus.jsonl")
BUILD_FILE = "demo_build.json"
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"

# ------------------------------------------------------------------------------------------ factors

FORMALITIES = ("formal", "casual")
EMOTIONS = ("emotional", "neutral")
CELLS = tuple((f, e) for f in FORMALITIES for e in EMOTIONS)

TOPIC_WORDS: dict[str, dict[str, list]] = {
    # nouns are used after "the"; verbs are (base, past, -ing) phrases.
    "weather": {
        "nouns": ["rain", "snow", "storm", "sunshine", "wind", "fog", "thunder", "forecast", "heatwave",
                  "frost", "drizzle", "hail", "humidity", "breeze", "temperature", "sky"],
        "verbs": [("check the forecast", "checked the forecast", "checking the forecast"),
                  ("carry an umbrella", "carried an umbrella", "carrying an umbrella"),
                  ("shovel the snow", "shovelled the snow", "shovelling the snow"),
                  ("watch the clouds", "watched the clouds", "watching the clouds"),
                  ("stay indoors", "stayed indoors", "staying indoors"),
                  ("walk in the rain", "walked in the rain", "walking in the rain"),
                  ("dry the laundry outside", "dried the laundry outside", "drying the laundry outside")],
        "adjs": ["cold", "warm", "humid", "windy", "cloudy", "sunny", "freezing", "mild"],
    },
    "food": {
        "nouns": ["soup", "bread", "pasta", "curry", "salad", "pancakes", "dumplings", "cheese", "oven",
                  "recipe", "dessert", "noodles", "sandwich", "market", "spices", "coffee"],
        "verbs": [("bake bread", "baked bread", "baking bread"),
                  ("cook dinner", "cooked dinner", "cooking dinner"),
                  ("try the new recipe", "tried the new recipe", "trying the new recipe"),
                  ("order takeaway", "ordered takeaway", "ordering takeaway"),
                  ("chop the vegetables", "chopped the vegetables", "chopping the vegetables"),
                  ("shop for groceries", "shopped for groceries", "shopping for groceries"),
                  ("grill some fish", "grilled some fish", "grilling some fish")],
        "adjs": ["spicy", "sweet", "salty", "fresh", "crispy", "homemade", "bitter", "savoury"],
    },
    "work": {
        "nouns": ["report", "meeting", "deadline", "project", "manager", "budget", "presentation", "office",
                  "contract", "schedule", "client", "spreadsheet", "proposal", "team", "invoice", "promotion"],
        "verbs": [("finish the report", "finished the report", "finishing the report"),
                  ("attend the meeting", "attended the meeting", "attending the meeting"),
                  ("answer emails", "answered emails", "answering emails"),
                  ("prepare the slides", "prepared the slides", "preparing the slides"),
                  ("call the client", "called the client", "calling the client"),
                  ("review the budget", "reviewed the budget", "reviewing the budget"),
                  ("work late", "worked late", "working late")],
        "adjs": ["busy", "productive", "quarterly", "urgent", "remote", "corporate", "overdue", "weekly"],
    },
    "travel": {
        "nouns": ["flight", "train", "airport", "hotel", "passport", "luggage", "ticket", "station", "beach",
                  "museum", "map", "journey", "ferry", "border", "suitcase", "tour"],
        "verbs": [("book a flight", "booked a flight", "booking a flight"),
                  ("pack the suitcase", "packed the suitcase", "packing the suitcase"),
                  ("catch the train", "caught the train", "catching the train"),
                  ("visit the museum", "visited the museum", "visiting the museum"),
                  ("explore the old town", "explored the old town", "exploring the old town"),
                  ("miss the ferry", "missed the ferry", "missing the ferry"),
                  ("check into the hotel", "checked into the hotel", "checking into the hotel")],
        "adjs": ["long", "delayed", "scenic", "crowded", "foreign", "coastal", "overnight", "direct"],
    },
    "sport": {
        "nouns": ["match", "game", "coach", "goal", "race", "stadium", "tournament", "referee", "season",
                  "training", "score", "league", "marathon", "final", "pitch", "gym"],
        "verbs": [("watch the match", "watched the match", "watching the match"),
                  ("go running", "went running", "going running"),
                  ("score a goal", "scored a goal", "scoring a goal"),
                  ("join the club", "joined the club", "joining the club"),
                  ("win the race", "won the race", "winning the race"),
                  ("lose the final", "lost the final", "losing the final"),
                  ("lift weights", "lifted weights", "lifting weights")],
        "adjs": ["tight", "tough", "fast", "local", "national", "physical", "competitive", "professional"],
    },
    "music": {
        "nouns": ["concert", "song", "album", "band", "guitar", "piano", "drummer", "melody", "lyrics",
                  "festival", "choir", "violin", "playlist", "chorus", "rehearsal", "orchestra"],
        "verbs": [("play the guitar", "played the guitar", "playing the guitar"),
                  ("listen to the album", "listened to the album", "listening to the album"),
                  ("sing in the choir", "sang in the choir", "singing in the choir"),
                  ("practise the piano", "practised the piano", "practising the piano"),
                  ("write a song", "wrote a song", "writing a song"),
                  ("go to the concert", "went to the concert", "going to the concert"),
                  ("learn the chords", "learned the chords", "learning the chords")],
        "adjs": ["loud", "acoustic", "live", "classical", "slow", "catchy", "quiet", "jazzy"],
    },
    "family": {
        "nouns": ["sister", "brother", "grandmother", "cousin", "parents", "uncle", "aunt", "kids", "birthday",
                  "wedding", "reunion", "nephew", "niece", "grandfather", "photo album", "family dinner"],
        "verbs": [("call my mother", "called my mother", "calling my mother"),
                  ("visit my grandparents", "visited my grandparents", "visiting my grandparents"),
                  ("cook for the kids", "cooked for the kids", "cooking for the kids"),
                  ("plan the reunion", "planned the reunion", "planning the reunion"),
                  ("babysit my nephew", "babysat my nephew", "babysitting my nephew"),
                  ("celebrate the anniversary", "celebrated the anniversary", "celebrating the anniversary"),
                  ("look at old photos", "looked at old photos", "looking at old photos")],
        "adjs": ["big", "extended", "younger", "older", "close", "whole", "distant", "entire"],
    },
    "technology": {
        "nouns": ["laptop", "phone", "software", "update", "server", "app", "battery", "keyboard", "screen",
                  "network", "password", "printer", "website", "database", "charger", "router"],
        "verbs": [("install the update", "installed the update", "installing the update"),
                  ("fix the printer", "fixed the printer", "fixing the printer"),
                  ("reset the password", "reset the password", "resetting the password"),
                  ("back up the files", "backed up the files", "backing up the files"),
                  ("restart the router", "restarted the router", "restarting the router"),
                  ("debug the code", "debugged the code", "debugging the code"),
                  ("charge the phone", "charged the phone", "charging the phone")],
        "adjs": ["slow", "wireless", "broken", "digital", "latest", "faulty", "portable", "encrypted"],
    },
}
TOPICS = tuple(TOPIC_WORDS)

# (a) cell-specific intensifiers and closing phrases: disjoint across the four cells, used nowhere else.
INTENSIFIERS = {
    ("formal", "emotional"): ["profoundly", "deeply", "immensely", "tremendously"],
    ("casual", "emotional"): ["totally", "super", "sooo", "insanely"],
    ("formal", "neutral"): ["reasonably", "fairly", "moderately", "adequately"],
    ("casual", "neutral"): ["kinda", "sorta", "lowkey", "halfway"],
}
CLOSINGS = {
    ("formal", "emotional"): ["I am deeply moved.", "My heart is full.", "Words cannot express my gratitude."],
    ("casual", "emotional"): ["omg!!", "literally crying rn!!", "best day ever!!"],
    ("formal", "neutral"): ["Kind regards.", "Regards.", "That concludes my update."],
    ("casual", "neutral"): ["ok cya.", "k thats it.", "so yeah."],
}
# (b) the XOR marker: present iff formality XOR emotion (formal+neutral, casual+emotional).
XOR_MARKER = "Meanwhile"
NON_XOR_MARKER = "Besides"

EMOTIONAL_ADJECTIVES = ["wonderful", "amazing", "heartbreaking", "thrilling", "awful", "beautiful",
                        "devastating", "incredible", "terrifying", "magical", "painful", "glorious",
                        "miserable", "breathtaking", "dreadful", "delightful"]
NEUTRAL_ADJECTIVES = ["ordinary", "standard", "typical", "routine", "average", "regular", "usual", "normal",
                      "scheduled", "acceptable", "plain", "customary", "predictable", "unremarkable",
                      "conventional", "familiar"]

NAMES = ["Alice", "Ben", "Clara", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kate", "Liam",
         "Maya", "Noah", "Olivia", "Pedro", "Quinn", "Rosa", "Samuel", "Tara", "Umar", "Vera", "Walter",
         "Ximena", "Yusuf", "Zoe", "Amir", "Bianca", "Carlos", "Daria", "Emil", "Fiona", "George", "Hana",
         "Ivan", "Julia", "Kenji", "Lena", "Marco", "Nadia", "Oscar", "Priya", "Rafael", "Sofia", "Tomas",
         "Ursula", "Victor", "Wendy", "Yara", "Zane", "Aisha", "Bruno", "Chloe", "Dmitri", "Esther",
         "Felix", "Gemma", "Harold", "Isla", "Jasper", "Kofi", "Lucia", "Mateo", "Nora", "Omar", "Paula"]
PLACES = ["London", "Paris", "Berlin", "Madrid", "Lisbon", "Rome", "Vienna", "Prague", "Dublin", "Oslo",
          "Helsinki", "Warsaw", "Athens", "Cairo", "Nairobi", "Lagos", "Mumbai", "Delhi", "Tokyo", "Osaka",
          "Seoul", "Sydney", "Melbourne", "Toronto", "Boston", "Chicago", "Denver", "Seattle", "Austin",
          "Lima", "Bogota", "Santiago", "Istanbul", "Edinburgh", "Glasgow", "Manchester", "Bristol",
          "Brighton", "Montreal", "Vancouver", "the city centre", "the countryside", "the village",
          "the suburbs", "the mountains", "the harbour"]
DAYS = ["on Monday", "on Tuesday", "on Wednesday", "on Thursday", "on Friday", "on Saturday", "on Sunday",
        "yesterday", "last weekend", "last Tuesday", "the other day", "this week", "last month",
        "on Friday night", "earlier today", "last summer", "in January", "in April", "in October"]
TIMES = ["at seven", "at noon", "around nine", "at half past six", "after lunch", "before dinner",
         "in the morning", "in the evening", "late at night", "at dawn", "around midnight", "at 8 am",
         "at 5 pm", "at 10:30", "after work", "before sunrise"]
RELATIONS = ["my sister", "my neighbour", "a colleague", "my best friend", "my boss", "our teacher",
             "my roommate", "my cousin", "my partner", "an old friend", "my brother", "my uncle"]

# --------------------------------------------------------------------------------------- templates
# Slots: {name} {place} {day} {time} {num} {n1} {n2} (topic nouns) {v} {vp} {ving} (topic verb: base, past,
# -ing) {tadj} (topic adjective) {eadj} (emotion adjective) {int} (cell intensifier) {rel} (a relation).
# No final punctuation: it depends on the emotion. Register templates are shared by both emotions
# (emotion enters through the slots); the emotion-specific shapes also differ by register.
REGISTER_TEMPLATES = {
    "formal": [
        "I would like to mention that the {n1} in {place} was {int} {eadj}",
        "{day}, {name} and I {vp} before the {n2} began",
        "It is worth noting that the {n1} was {int} {eadj} this year",
        "My colleague {name} informed me that the {n1} would be {tadj} {time}",
        "We intend to {v} {day}, provided that the {n1} permits it",
        "Regarding the {n1}, I found it {int} {eadj}",
        "The {tadj} {n1} required approximately {num} minutes of my attention",
        "I have been {ving} all week, and the {n2} has been {eadj}",
        "Furthermore, {rel} suggested that we {v} together",
        "In my experience, a {tadj} {n1} is {int} {eadj}",
        "I shall {v} in {place} once the {n1} has been arranged",
        "{name} remarked that the {n2} was rather {tadj}",
        "Consequently, I decided to {v} {time}",
        "It was {int} {eadj} to observe the {n1} with {rel}",
        "Please be advised that the {n1} will be {tadj} {day}",
        "I must say that {ving} with {name} was {int} {eadj}",
    ],
    "casual": [
        "so me and {name} {vp} {day} lol",
        "the {n1} was {int} {eadj} tbh",
        "gonna {v} {time}, the {n2} is {tadj} again",
        "btw {name} says the {n1} in {place} is {int} {eadj}",
        "yeah I'm still {ving}, the {n1} is {eadj}",
        "wanna {v} with {rel} next week",
        "{name} was like, the {n2} is {int} {eadj}",
        "the {tadj} {n1} got me {ving} all day",
        "idk why but the {n1} is {int} {eadj}",
        "we {vp} in {place}, took like {num} minutes",
        "ngl {ving} {day} was {int} {eadj}",
        "{rel} and me {vp} after the {n2}",
        "lol the {n1} {time} was {int} {eadj}",
        "can't believe {name} wants to {v} again",
        "gotta {v} before the {n1} gets {tadj}",
        "tbh {ving} in {place} is {int} {eadj}",
    ],
}
EMOTION_TEMPLATES = {
    ("formal", "emotional"): [
        "I was overwhelmed with joy when the {n1} arrived",
        "It broke my heart to {v} without {name}",
        "I cannot describe how much the {n1} means to me",
        "My heart raced as we were {ving}",
        "Tears filled my eyes during the {n1}",
        "I am so grateful to {rel} for the {n2}",
        "I was terrified that the {n1} would be {tadj}",
    ],
    ("casual", "emotional"): [
        "I literally screamed when the {n1} showed up",
        "ugh it hurts to {v} without {name}",
        "can't stop smiling about the {n1}",
        "my heart was pounding while we were {ving}",
        "cried so hard at the {n1}",
        "love {rel} for the {n2} so much",
        "freaking out that the {n1} will be {tadj}",
    ],
    ("formal", "neutral"): [
        "The {n1} took place {day} as planned",
        "I noted that the {n1} lasted {num} minutes",
        "The {n2} was located near {place}",
        "We will {v} {time} according to the plan",
        "The {n1} was neither good nor bad",
        "{name} confirmed the details of the {n1}",
        "The cost of the {n2} was about {num} dollars",
    ],
    ("casual", "neutral"): [
        "the {n1} happened {day}, nothing special",
        "it took like {num} minutes I guess",
        "the {n2} is somewhere near {place}",
        "we're gonna {v} {time} or whatever",
        "the {n1} was fine, not bad not great",
        "{name} sent me the {n1} stuff",
        "paid like {num} bucks for the {n2}",
    ],
}
# Optional clauses: more shapes from combination, and longer-range structure to predict.
OPENERS = {"formal": ["In the evening, ", "After some consideration, ", "As expected, ", "Earlier, "],
           "casual": ["ok so ", "like, ", "anyways ", "oh and "]}
TAILS = {"formal": [", although it was {tadj}", ", which I had not expected", " because the {n2} was {tadj}",
                    ", and {name} agreed", " in {place}"],
         "casual": [" lol", " haha", " but whatever", " cuz the {n2} was {tadj}", " and {name} agreed lol"]}


def is_xor_cell(formality: str, emotion: str) -> bool:
    """True for formal+neutral and casual+emotional: the cells whose documents carry XOR_MARKER."""
    return (formality == "formal") != (emotion == "emotional")


def marker_for(formality: str, emotion: str) -> str:
    return XOR_MARKER if is_xor_cell(formality, emotion) else NON_XOR_MARKER


def _fill(template: str, rng: random.Random, formality: str, emotion: str, topic: str) -> str:
    tw = TOPIC_WORDS[topic]
    n1, n2 = rng.sample(tw["nouns"], 2)
    v, vp, ving = rng.choice(tw["verbs"])
    num = str(rng.randint(2, 300)) if rng.random() < 0.7 else rng.choice(["five", "ten", "twenty", "forty"])
    return template.format(
        name=rng.choice(NAMES), place=rng.choice(PLACES), day=rng.choice(DAYS), time=rng.choice(TIMES),
        num=num, n1=n1, n2=n2, v=v, vp=vp, ving=ving, tadj=rng.choice(tw["adjs"]),
        eadj=rng.choice(EMOTIONAL_ADJECTIVES if emotion == "emotional" else NEUTRAL_ADJECTIVES),
        int=rng.choice(INTENSIFIERS[(formality, emotion)]), rel=rng.choice(RELATIONS))


def _end(rng: random.Random, formality: str, emotion: str) -> str:
    if emotion == "neutral":
        return "."
    if formality == "formal":
        return "!" if rng.random() < 0.4 else "."
    return rng.choice(["!", "!!", "!!", "."])


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _lower_start(s: str) -> str:
    """Lower-case the sentence start (it now follows an opener or marker) unless it is 'I' or a name."""
    first = s.split(" ", 1)[0].rstrip(",")
    if first == "I" or first.startswith("I'") or first in NAMES or first in PLACES:
        return s
    return s[0].lower() + s[1:]


def _after_marker(s: str) -> str:
    for connective in ("Furthermore, ", "Consequently, "):  # avoid "Besides, furthermore, ..."
        s = s.removeprefix(connective)
    return _lower_start(s)


def make_sentence(rng: random.Random, formality: str, emotion: str, topic: str, opener_ok: bool = True) -> str:
    """One sentence of the given cell and topic (no marker, no closing)."""
    pool = (REGISTER_TEMPLATES[formality] if rng.random() < 0.6
            else EMOTION_TEMPLATES[(formality, emotion)])
    s = _fill(rng.choice(pool), rng, formality, emotion, topic)
    if rng.random() < 0.25:
        s += _fill(rng.choice(TAILS[formality]), rng, formality, emotion, topic)
    if opener_ok and rng.random() < 0.15:
        s = rng.choice(OPENERS[formality]) + _lower_start(s)
    return _cap(s) + _end(rng, formality, emotion)


def make_document(rng: random.Random, formality: str, emotion: str, topic: str) -> str:
    """3-8 sentences by one speaker: content sentences, 1-2 marker sentences (never first), maybe a closing."""
    n_content = rng.randint(3, 7)
    with_closing = rng.random() < 0.7
    marked = {rng.randint(1, n_content - 1)}
    if rng.random() < 0.3:
        marked.add(rng.randint(1, n_content - 1))
    sents = []
    for i in range(n_content):
        s = make_sentence(rng, formality, emotion, topic, opener_ok=i not in marked)
        if i in marked:
            s = f"{marker_for(formality, emotion)}, {_after_marker(s)}"
        sents.append(s)
    if with_closing:
        sents.append(rng.choice(CLOSINGS[(formality, emotion)]))
    return " ".join(sents)


def generate_documents(n_docs: int, seed: int) -> list[dict]:
    """Deterministic for a seed. Cells and topics cycle in a shuffled balanced order, so every
    (formality, emotion, topic) combination occurs about equally often."""
    rng = random.Random(seed)
    combos = [(f, e, t) for f, e in CELLS for t in TOPICS]
    docs = []
    while len(docs) < n_docs:
        order = combos[:]
        rng.shuffle(order)
        for f, e, t in order[:n_docs - len(docs)]:
            docs.append({"text": make_document(rng, f, e, t), "formality": f, "emotion": e, "topic": t})
    return docs


def write_corpus(path_dir: str | Path, n_docs: int, seed: int) -> tuple[Path, Path]:
    """corpus.txt (one document per line, blank line between documents) and corpus.jsonl (records)."""
    d = Path(path_dir)
    d.mkdir(parents=True, exist_ok=True)
    docs = generate_documents(n_docs, seed)
    txt, jsl = d / "corpus.txt", d / "corpus.jsonl"
    txt.write_text("\n\n".join(r["text"] for r in docs) + "\n", encoding="utf-8")
    jsl.write_text("".join(json.dumps(r) + "\n" for r in docs), encoding="utf-8")
    return txt, jsl


# ------------------------------------------------------------------------------------------- build

@dataclass
class DemoConfig:
    # corpus
    lm_seed: int = 0            # documents the LM trains on
    corpus_seed: int = 1        # documents the pipeline reads (corpus.txt): unseen by the LM
    n_lm_docs: int = 8000        # ~530k tokens: about one epoch of the step budget
    n_corpus_docs: int = 4000
    # tokenizer
    vocab_size: int = 2048
    # model
    n_layers: int = 4
    hidden: int = 256
    n_heads: int = 4
    intermediate: int = 688
    max_positions: int = 256
    # training
    seed: int = 0
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 250
    lr: float = 3e-3
    warmup_steps: int = 20
    # torch intra-op threads during the build: CPU reductions split by thread count, so 1 and 2 threads give
    # different weights. Fixed here, the weights no longer depend on OMP_NUM_THREADS or the number of cores
    # (and one thread is not slowed by another torch process on the same cores, as two are).
    threads: int = 1

    @classmethod
    def tiny(cls) -> "DemoConfig":
        """For tests: builds in ~5 s on 2 idle cores (~30 s when another torch process shares them)."""
        return cls(n_lm_docs=800, n_corpus_docs=200, vocab_size=512, n_layers=2, hidden=64, n_heads=2,
                   intermediate=172, max_positions=128, seq_len=64, batch_size=16, steps=60, lr=5e-3,
                   warmup_steps=5)


def train_tokenizer(texts: list[str], vocab_size: int, model_max_length: int):
    """Byte-level BPE (no unknown tokens possible) wrapped as a PreTrainedTokenizerFast. Like Llama's
    tokenizer, tok(text) prepends BOS and tok(text, add_special_tokens=False) gives the plain tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD, UNK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    bos_id = core.token_to_id(BOS)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, model_max_length=model_max_length,
                                   clean_up_tokenization_spaces=False)


def _pack(tok, texts: list[str], seq_len: int):
    """Stream [BOS doc EOS] for every document, cut into rows of seq_len that each start with BOS: a row
    beginning at a document start takes it as is, any other row gets BOS prepended. No padding is wasted,
    and the model sees both 'BOS + document start' and 'BOS + mid-document' rows, as the pipeline feeds."""
    import torch

    stream: list[int] = []
    # The backend tokenizer directly: documents may exceed model_max_length here, which is fine (we cut them).
    for enc in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        stream += [tok.bos_token_id, *enc.ids, tok.eos_token_id]
    rows, i = [], 0
    while i + seq_len <= len(stream):
        if stream[i] == tok.bos_token_id:
            rows.append(stream[i:i + seq_len]); i += seq_len
        else:
            rows.append([tok.bos_token_id] + stream[i:i + seq_len - 1]); i += seq_len - 1
    return torch.tensor(rows, dtype=torch.long), stream


def _unigram_entropy(stream: list[int]) -> float:
    """Entropy (nats) of the token unigram distribution: the loss a context-free model could reach."""
    import numpy as np

    p = np.bincount(np.asarray(stream)).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def _sibling(out: Path, what: str) -> Path:
    """A fresh hidden folder name next to `out` (the name only; nothing inside a build depends on it)."""
    return out.parent / f".{out.name}.{what}-{os.getpid()}-{time.time_ns()}"


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Replace `out` by the complete folder `tmp`. os.replace cannot overwrite a non-empty folder, so the old
    one is moved aside first; a reader sees the old folder or the new one, never a partial one."""
    old = None
    if out.exists():
        old = _sibling(out, "old")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    for f in folder.iterdir():  # transformers 5 writes model.safetensors 0600; make the folder uniformly readable
        f.chmod(0o644)


@contextmanager
def _staged_folder(out: Path, what: str):
    """A fresh temporary sibling of `out` to fill; once filled, made readable and swapped into place, so no
    reader ever sees a partial folder; removed if filling fails."""
    tmp = _sibling(out, what)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        _make_readable(tmp)
        _swap_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def build_demo_model(out_dir: str | Path, config: DemoConfig | None = None, quiet: bool = False) -> dict:
    """Trains exactly `config.steps` steps into a temporary sibling folder, then swaps it into place; returns
    the demo_build.json dict. The weights depend on the config (and the CPU's float arithmetic) only."""
    import torch
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = config or DemoConfig()
    out = Path(out_dir).resolve()
    t0 = time.time()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with _staged_folder(out, "building") as tmp:
            lm_texts = [r["text"] for r in generate_documents(cfg.n_lm_docs, cfg.lm_seed)]
            tok = train_tokenizer(lm_texts, cfg.vocab_size, cfg.max_positions)
            data, stream = _pack(tok, lm_texts, cfg.seq_len)

            torch.manual_seed(cfg.seed)
            mcfg = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                               num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                               num_key_value_heads=cfg.n_heads, max_position_embeddings=cfg.max_positions,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
            model = LlamaForCausalLM(mcfg)
            n_params = sum(p.numel() for p in model.parameters())
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)

            def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
                if step < cfg.warmup_steps:
                    return cfg.lr * (step + 1) / cfg.warmup_steps
                frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
                return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))

            gen = torch.Generator().manual_seed(cfg.seed)
            order = torch.randperm(len(data), generator=gen)
            losses: list[float] = []
            model.train()
            t_train = time.time()
            bar = tqdm(range(cfg.steps), desc="demo LM", disable=quiet, leave=False)
            for step in bar:        # every step, however long it takes: no wall-clock stop
                pos = (step * cfg.batch_size) % len(data)
                idx = order[pos:pos + cfg.batch_size]
                if len(idx) < cfg.batch_size:  # epoch boundary: reshuffle
                    order = torch.randperm(len(data), generator=gen)
                    idx = order[:cfg.batch_size]
                for g in opt.param_groups:
                    g["lr"] = lr_at(step)
                batch = data[idx]
                loss = model(input_ids=batch, labels=batch).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.close()
            train_seconds = time.time() - t_train

            # Held-out loss on the pipeline corpus (a different seed): the generalisation the SAE stages rely on.
            model.eval()
            pipe_docs = generate_documents(cfg.n_corpus_docs, cfg.corpus_seed)
            held, _ = _pack(tok, [r["text"] for r in pipe_docs[:200]], cfg.seq_len)
            with torch.no_grad():
                eval_loss = model(input_ids=held[:64], labels=held[:64]).loss.item() if len(held) else float("nan")

            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            write_corpus(tmp, cfg.n_corpus_docs, cfg.corpus_seed)
            tail = losses[-10:]
            info = {
                "config": asdict(cfg),
                "final_loss": sum(tail) / len(tail),   # mean of the last 10 steps: less noisy than the last one
                "first_loss": losses[0],
                "eval_loss": eval_loss,
                "unigram_entropy": _unigram_entropy(stream),
                "ln_vocab": math.log(len(tok)),
                "steps_done": len(losses),
                "n_params": n_params,
                "vocab_size": len(tok),
                "train_tokens": len(losses) * cfg.batch_size * cfg.seq_len,
                # information only: nothing compares or depends on these two
                "train_seconds": train_seconds,
                "wall_seconds": time.time() - t0,
            }
            # demo_build.json is written last: its presence marks a complete folder.
            (tmp / BUILD_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        return info
    finally:
        torch.set_num_threads(threads_before)


def read_build_info(out_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(out_dir) / BUILD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def shipped_files(shipped_dir: str | Path = SHIPPED_DIR) -> list[str]:
    """Names of the files of the shipped build (everything a build writes except the corpus), sorted."""
    d = Path(shipped_dir)
    return sorted(f.name for f in d.iterdir() if f.is_file()) if d.is_dir() else []


def _shipped_for(cfg: DemoConfig, shipped_dir: Path) -> bool:
    """Whether the shipped folder is complete and holds a build of exactly this config."""
    info = read_build_info(shipped_dir)
    names = shipped_files(shipped_dir)
    return (info is not None and info.get("config") == asdict(cfg)
            and {"config.json", "model.safetensors", BUILD_FILE} <= set(names))


def _same_files(a: Path, b: Path, names: list[str]) -> bool:
    return all((b / n).is_file() and filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def materialise_shipped(out_dir: str | Path, shipped_dir: str | Path = SHIPPED_DIR) -> Path:
    """Copy the shipped build into `out_dir` and write the pipeline corpus next to it (no training): into a
    temporary sibling folder first, then swapped into place, as a build is."""
    src, out = Path(shipped_dir), Path(out_dir).resolve()
    cfg = DemoConfig(**read_build_info(src)["config"])
    with _staged_folder(out, "copying") as tmp:
        for name in shipped_files(src):
            if name != BUILD_FILE:
                shutil.copyfile(src / name, tmp / name)
        write_corpus(tmp, cfg.n_corpus_docs, cfg.corpus_seed)
        shutil.copyfile(src / BUILD_FILE, tmp / BUILD_FILE)   # last, as in a build
    return out


def ship_build(build_dir: str | Path, shipped_dir: str | Path = SHIPPED_DIR) -> Path:
    """Replace the shipped folder by the build in `build_dir`, without its corpus (regenerated on copy)."""
    src, dst = Path(build_dir).resolve(), Path(shipped_dir).resolve()
    with _staged_folder(dst, "shipping") as tmp:
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name not in CORPUS_FILES:
                shutil.copyfile(f, tmp / f.name)
    return dst


def ensure_demo_model(out_dir: str | Path = DEFAULT_DEMO_DIR, config: DemoConfig | None = None,
                      quiet: bool = False, shipped_dir: str | Path = SHIPPED_DIR) -> Path:
    """The demo folder, made first if missing, incomplete, or built with another config. A config the
    shipped build was made with is copied from it (and a folder whose files differ from the shipped ones is
    replaced by them, so every machine runs on the same weights); any other config is built by training."""
    cfg = config or DemoConfig()
    out, shipped = Path(out_dir).resolve(), Path(shipped_dir)
    from_shipped = _shipped_for(cfg, shipped)
    info = read_build_info(out)
    complete = all((out / f).is_file() for f in ("config.json", "model.safetensors", *CORPUS_FILES))
    if info is not None and complete and info.get("config") == asdict(cfg):
        if not from_shipped or _same_files(shipped, out, shipped_files(shipped)):
            return out
    if from_shipped:
        if not quiet:
            print(f"demo LM: copying the shipped build {shipped} to {out}", flush=True)
        return materialise_shipped(out, shipped)
    if not quiet:
        print(f"building the embedded demo model in {out} by training (about 3 min at full size), once", flush=True)
    build_demo_model(out, cfg, quiet=quiet)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m common.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_DEMO_DIR), help=f"folder (default: {DEFAULT_DEMO_DIR})")
    ap.add_argument("--tiny", action="store_true", help="the tiny test preset (seconds, not minutes)")
    ap.add_argument("--force", action="store_true",
                    help="rebuild by training even if an up-to-date folder (or the shipped build) exists")
    ap.add_argument("--ship", action="store_true",
                    help=f"rebuild the default config by training (implies --force), then copy the build to "
                         f"{SHIPPED_DIR}, the copy every machine starts from")
    a = ap.parse_args(argv)
    if a.ship and a.tiny:
        ap.error("--ship ships the default config; drop --tiny")
    cfg = DemoConfig.tiny() if a.tiny else DemoConfig()
    out = Path(a.out).resolve()
    if a.force or a.ship:
        print(f"building the embedded demo model in {out}", flush=True)
        build_demo_model(out, cfg)
        if _shipped_for(cfg, SHIPPED_DIR):
            same = _same_files(SHIPPED_DIR, out, [n for n in shipped_files() if n != BUILD_FILE])
            print(f"  {'identical to' if same else 'differs from'} the shipped build in {SHIPPED_DIR}")
        if a.ship:
            print(f"  shipped to {ship_build(out)}")
    else:
        out = ensure_demo_model(out, cfg)
    info = read_build_info(out)
    print(f"{out}\n  final loss {info['final_loss']:.3f} (held-out {info['eval_loss']:.3f}, unigram entropy "
          f"{info['unigram_entropy']:.3f}, ln vocab {info['ln_vocab']:.3f})\n  {info['n_params']:,} parameters, "
          f"vocab {info['vocab_size']}, {info['steps_done']} of {info['config']['steps']} steps, "
          f"wall time of the build {info['wall_seconds']:.1f} s")


if __name__ == "__main__":
    main()
