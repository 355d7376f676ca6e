"""How many steps does a small Llama need to answer a two-name relation question from stated facts? (issue 13)

A synthetic stand-in for the stage-0 LM's relation questions, small enough to compare fact formats and
model shapes in minutes: objects are single tokens (as in the LM's description, "largeredcircle"), the
question names them by two attribute tokens ("red circle"), and only the answer is trained.

    python scripts/relation_synthetic.py --format both --steps 3000

Formats of the facts about one axis (`x`; the question asks "left" or "right"):
  both:   every ordered pair that is apart, "A left B ." and "B right A ." (r7's both-ways facts)
  words:  as both, in the LM's sentence form: "the A is left of the B ." (the names further apart)
  once:   each pair once, in a random direction (r6's: the answer is a parity of order and word)
  rank:   every object with its rank from the left, "A r2 ." (a one-name lookup, then a comparison)
  sorted: the objects in left-to-right order, "order C A B ." (compare positions in one list)
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

COLORS, SHAPES = 8, 5
PAD, BOS, DOT, Q, QMARK, ANS, YES, NO, LEFT, RIGHT, ORDER, OR, THE, IS, OF = range(15)
COLOR0 = 15
SHAPE0 = COLOR0 + COLORS
OBJ0 = SHAPE0 + SHAPES  # one token per (colour, shape)
RANK0 = OBJ0 + COLORS * SHAPES
VOCAB = RANK0 + 4


def obj_token(c: int, s: int) -> int:
    return OBJ0 + c * SHAPES + s


def sample(rng: random.Random, fmt: str, max_objects: int, choice: float = 0.0,
           object_names: bool = False) -> tuple[list[int], int]:
    """(tokens, answer): with probability `choice` a "which way" question ("Is A left or right of B?" ->
    LEFT / RIGHT), else a yes/no one."""
    n = rng.randint(2, max_objects)
    names = rng.sample([(c, s) for c in range(COLORS) for s in range(SHAPES)], n)
    order = list(range(n))
    rng.shuffle(order)  # order[k] = the object at rank k from the left
    rank = {o: k for k, o in enumerate(order)}
    facts: list[list[int]] = []
    if fmt in ("both", "once", "words"):
        for i in range(n):
            for j in range(i + 1, n):
                a, b = (i, j) if rank[i] < rank[j] else (j, i)  # a is left of b
                pair = [[obj_token(*names[a]), LEFT, obj_token(*names[b]), DOT],
                        [obj_token(*names[b]), RIGHT, obj_token(*names[a]), DOT]]
                if fmt == "words":
                    pair = [[THE, x, IS, rel, OF, THE, y, DOT] for x, rel, y, _ in pair]
                facts += [rng.choice(pair)] if fmt == "once" else pair
        rng.shuffle(facts)
    elif fmt == "rank":
        facts = [[obj_token(*names[o]), RANK0 + rank[o], DOT] for o in range(n)]
        rng.shuffle(facts)
    elif fmt == "sorted":
        facts = [[ORDER] + [obj_token(*names[o]) for o in order] + [DOT]]
    else:
        raise ValueError(fmt)
    a, b = rng.sample(range(n), 2)

    def name(o: int) -> list[int]:  # as a question names it: two attribute words, or the object's own token
        return [obj_token(*names[o])] if object_names else [COLOR0 + names[o][0], SHAPE0 + names[o][1]]

    if rng.random() < choice:
        question = [Q, *name(a), LEFT, OR, RIGHT, *name(b), QMARK, ANS]
        return [BOS] + [t for f in facts for t in f] + question, LEFT if rank[a] < rank[b] else RIGHT
    asked = rng.choice((LEFT, RIGHT))
    truth = rank[a] < rank[b] if asked == LEFT else rank[a] > rank[b]
    question = [Q, *name(a), asked, *name(b), QMARK, ANS]
    return [BOS] + [t for f in facts for t in f] + question, YES if truth else NO


def batch(rng: random.Random, fmt: str, size: int, max_objects: int, choice: float = 0.0, object_names: bool = False):
    rows = [sample(rng, fmt, max_objects, choice, object_names) for _ in range(size)]
    width = max(len(r) for r, _ in rows)
    ids = torch.full((size, width), PAD)
    for k, (r, _) in enumerate(rows):
        ids[k, width - len(r):] = torch.tensor(r)  # left padding: the answer is read at the last position
    return ids, torch.tensor([a for _, a in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", default="both", choices=("both", "once", "words", "rank", "sorted"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--max-objects", type=int, default=4)
    parser.add_argument("--choice", type=float, default=0.0, help="share of 'which way' questions in training")
    parser.add_argument("--object-names", action="store_true", help="questions name objects by their token")
    parser.add_argument("--choice-first", type=int, default=0,
                        help="curriculum: only 'which way' questions for this many steps, then --choice")
    parser.add_argument("--dense", action="store_true", help="also train next-token prediction on the facts")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and training-data seed")
    parser.add_argument("--eval-every", type=int, default=250)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                         num_attention_heads=args.heads, num_key_value_heads=args.heads,
                                         intermediate_size=4 * args.hidden, max_position_embeddings=256,
                                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=DOT))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    held_out = batch(random.Random(10**9), args.format, 1000, args.max_objects, 0.0, args.object_names)
    held_out_choice = batch(random.Random(10**9 + 1), args.format, 1000, args.max_objects, 1.0, args.object_names)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        choice = 1.0 if step <= args.choice_first else args.choice
        ids, answers = batch(random.Random(args.seed * 1_000_003 + step), args.format, args.batch_size,
                             args.max_objects, choice, args.object_names)
        logits = model(input_ids=ids, attention_mask=(ids != PAD).long()).logits
        loss = torch.nn.functional.cross_entropy(logits[:, -1], answers)
        if args.dense:  # every next token of the row (facts and question), padding excluded
            targets = ids[:, 1:].masked_fill(ids[:, 1:] == PAD, -100)
            loss = loss + torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.eval_every == 0:
            accuracy = {}
            for name, (ids, answers) in (("yes_no", held_out), ("choice", held_out_choice)):
                with torch.no_grad():
                    predicted = model(input_ids=ids, attention_mask=(ids != PAD).long()).logits[:, -1].argmax(-1)
                accuracy[name] = round((predicted == answers).float().mean().item(), 4)
            print(json.dumps({"format": args.format, "step": step, "loss": round(loss.item(), 4), **accuracy,
                              "elapsed_s": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
