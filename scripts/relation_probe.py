"""Does a training format teach the stage-0 LM to answer relation questions from text? (issue 13)

Continues an LM (default: the shipped foundation's) or trains a fresh one on the LM stage's dialogues
with extra relation turns, and prints text-only relation accuracy (`relation_breakdown`, val scenes)
and the accuracy of the which-way questions below every `--eval-every` steps; at the end also text-only QA
of every type. A probe, not a recipe stage:
whatever format works here moves into `pretrain/shapes.py`.

    python scripts/relation_probe.py --steps 1000 --choice 2 --out runs/relprobe-choice

`--choice N`: N "which way" turns per dialogue ("Is the red circle to the left or to the right of the
blue square?" -> "left"): the two-name lookup a yes/no relation answer needs, trained at the answer
position of a question shaped like the canonical one, so the yes/no answer only has to compare the
looked-up word with the asked one.
`--only-relations`: dialogues hold only relation turns (no restatements, no other questions).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from mmbridge.data.shapes.world import relation
from mmbridge.pretrain import shapes
from mmbridge.pretrain.text import Branches, LMConfig, build_causal_lm, pretrain_causal_lm

FOUNDATION = Path(shapes.__file__).parents[1] / "assets" / "foundation" / "shapes" / "lm"

CHOICES = {"x": ("Is the {a} to the left or to the right of the {b}?", {1: "left", -1: "right"}),
           "y": ("Is the {a} above or below the {b}?", {1: "above", -1: "below"})}


def choice_turns(scene, rng: random.Random, num: int, token_names: bool = False) -> list[tuple[str, str]]:
    """Up to `num` "which way" questions about pairs of uniquely named objects apart on the asked axis;
    `token_names`: each object named by its one token of the LM's description ("largeredcircle")."""
    unique = [o for o in scene.objects if len(scene.find(o.color, o.shape)) == 1]
    pool = []
    for a, b in itertools.permutations(unique, 2):
        for axis, (template, words) in CHOICES.items():
            sign = relation(a, b, axis)
            if sign:
                if token_names:
                    question = template.format(a=shapes.object_words(a.name), b=shapes.object_words(b.name))
                else:
                    question = template.format(a=f"{a.color} {a.shape}", b=f"{b.color} {b.shape}")
                pool.append((question, words[sign]))
    return rng.sample(pool, min(num, len(pool)))


def choice_accuracy(lm, tokenizer, num_scenes: int, split: str = "val", token_names: bool = False) -> float:
    """Greedy accuracy of the "which way" answers on `num_scenes` held-out scenes (each scene's pairs)."""
    from mmbridge.pretrain.text import greedy_answers

    prompts, answers = [], []
    for i in range(num_scenes):
        scene = shapes.make_scene(split, i, 0)
        for question, answer in choice_turns(scene, random.Random(i), 4, token_names):
            prompts.append(shapes.first_turn(shapes.lm_description(scene, random.Random(i)), question))
            answers.append(answer)
    predictions = greedy_answers(lm, tokenizer, prompts, shapes.END)
    return round(sum(p.strip().lower() == a for p, a in zip(predictions, answers)) / max(len(answers), 1), 4)


def evaluate(lm, tokenizer, num_scenes: int, token_names: bool = False) -> dict:
    return {"relations": shapes.relation_breakdown(lm, tokenizer, num_scenes=num_scenes),
            "choice": choice_accuracy(lm, tokenizer, num_scenes, token_names=token_names)}


def dialogue(rng: random.Random, choice: int, relations: int, only_relations: bool, max_objects: int = 4,
             token_names: bool = False) -> Branches:
    scene = shapes.make_scene("train", rng.randrange(shapes.TRAIN_SCENES), 0)
    while len(scene.objects) > max_objects:  # a curriculum: small scenes first
        scene = shapes.make_scene("train", rng.randrange(shapes.TRAIN_SCENES), 0)
    context = shapes.lm_description(scene, rng)
    turns = []
    if not only_relations:
        turns += [(q, text) for q, restate in shapes.RESTATEMENTS if (text := restate(scene, rng))]
        turns += shapes.qa_turns(scene, rng, 6)
    turns += shapes.relation_turns(scene, rng, relations) + choice_turns(scene, rng, choice, token_names)
    if not turns:  # a 1-object scene in a relations-only run: one count question keeps the row non-empty
        turns = [("How many shapes are there?", str(len(scene.objects)))]
    turns = [shapes.chat_text(context, [turn])[2:] for turn in turns]
    return Branches(shapes.first_turn(context, "")[:2], turns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--init", default=str(FOUNDATION), help="an LM dir to continue, or 'scratch'")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--choice", type=int, default=2)
    parser.add_argument("--relations", type=int, default=2, help="canonical-type relation turns per dialogue")
    parser.add_argument("--only-relations", action="store_true")
    parser.add_argument("--token-names", action="store_true",
                        help="which-way questions name objects by their description token ('largeredcircle')")
    parser.add_argument("--max-objects", type=int, default=4, help="train on scenes of at most this many objects")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-scenes", type=int, default=60)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(FOUNDATION)
    cfg = LMConfig(hidden_size=128, num_heads=4, intermediate_size=512, max_length=512, steps=args.steps,
                   batch_size=args.batch_size, lr=args.lr, min_lr=args.lr / 10, warmup_steps=50,
                   eval_every=args.eval_every, save_every=250)
    lm = build_causal_lm(tokenizer, cfg) if args.init == "scratch" else AutoModelForCausalLM.from_pretrained(args.init)
    log = open(out / "log.jsonl", "a")

    def write(record: dict) -> None:
        print(json.dumps(record), flush=True)
        log.write(json.dumps(record) + "\n")
        log.flush()

    write({"args": vars(args), "cfg": dataclasses.asdict(cfg)})
    write({"step": 0, "eval": evaluate(lm.eval(), tokenizer, args.eval_scenes, args.token_names)})
    start = time.perf_counter()
    def samples(rng: random.Random, n: int) -> list[Branches]:
        return [dialogue(rng, args.choice, args.relations, args.only_relations, args.max_objects, args.token_names)
                for _ in range(n)]

    pretrain_causal_lm(lm, tokenizer, samples, cfg, log=write, checkpoint_dir=out / "checkpoint",
                       evaluate=lambda m: evaluate(m, tokenizer, args.eval_scenes, args.token_names))
    write({"final": evaluate(lm, tokenizer, 100, args.token_names),
           "final_text_qa": shapes.text_qa_accuracy(lm, tokenizer, num_scenes=100),
           "elapsed_s": round(time.perf_counter() - start, 1)})
    lm.save_pretrained(out / "lm")
    tokenizer.save_pretrained(out / "lm")


if __name__ == "__main__":
    main()
