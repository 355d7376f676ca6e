"""The ShapesWorld see recipe: every stage of BLIP-2 / MiniGPT-4 in miniature, from nothing to a model dir.

    stage 0  tokenizer -> causal LM (text-only chats) -> ViT (CLIP + dense patch targets)   frozen after
    stage 1  Q-Former ITC + ITM + ITG on the frozen ViT, trainer                              (BLIP-2 stage 1)
    stage 2  Q-Former + projection -> frozen LM on image-caption shards   (BLIP-2 stage 2 / MiniGPT-4 stage 1)
    stage 3  template fine-tune on instruction chats (LLaVA JSON)                     (MiniGPT-4 stage 2)

The recipe is a YAML file (`recipes/shapes.yaml`); stages 1-3 are ordinary trainer stage configs
run by `mmbridge.train` (stage 1 with the named losses itc / itm / itg). Each stage writes its result
under the output directory and a line in `report.json` (seconds, final losses, checks); re-running
skips finished stages, so an interrupted recipe resumes at the stage it was in.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from mmbridge.pretrain.diffusion import GeneratorConfig
from mmbridge.pretrain.text import LMConfig
from mmbridge.pretrain.vision import VisionConfig
from mmbridge.train.config import ConfigError, _build, apply_overrides

logger = logging.getLogger("mmbridge.recipe")

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
#: Stage 0: the models the seeds download (EVA ViT, Vicuna, Stable Diffusion), trained once here, then frozen
#: and shipped (`recipes/shapes_foundation.yaml`, `mmbridge train shapes-foundation`).
FOUNDATION_STAGES = ("tokenizer", "lm", "lm_gate", "vision", "vision_gate", "generator")
#: The seeds' method: the bridges, trained on a foundation (`recipes/shapes.yaml`).
BRIDGE_STAGES = ("compose", "data", "stage1", "stage2", "stage3", "export")
STAGES = FOUNDATION_STAGES + BRIDGE_STAGES
#: VisionLLM v2's act head on the see-model (pretrain/act.py, docs/recipe.md "Act"): run only when listed in
#: `stages` (between stage3 and export); with them, `export` exports the act model.
ACT_STAGES = ("act_data", "act_stage1", "act_stage2", "act_pose", "act_decoders", "act_edit")
#: MiniGPT-5's draw head on the see-model (pretrain/draw.py, docs/recipe.md "Draw"), on the foundation's
#: generator: run only when listed (after stage3; the act stages then start from the draw model).
#: `draw_mapper` (the mapper alone on the frozen LLM's cached states) runs last, after the act stages: they
#: move the LoRA, hence the states the mapper reads.
DRAW_STAGES = ("draw_data", "draw_stage1", "draw_stage2", "draw_mapper")
#: Every stage a recipe may list, in the order they run.
RUN_ORDER = (*STAGES[:-1], *DRAW_STAGES[:-1], *ACT_STAGES, DRAW_STAGES[-1], STAGES[-1])
#: Where a trained foundation ships inside the package (`foundation: shipped` in a recipe).
SHIPPED_FOUNDATION = Path(__file__).resolve().parent.parent / "assets" / "foundation" / "shapes"
#: What a foundation directory holds (one subdirectory each; `generator` only with draw's stage 0).
FOUNDATION_PARTS = ("tokenizer", "lm", "vision", "text_encoder")


@dataclass
class TokenizerStage:
    vocab_size: int = 512
    corpus_dialogues: int = 2000


@dataclass
class LMGate:
    """Text-only QA (canonical questions, 100 val scenes) the LM needs before it is frozen
    (docs/world.md; docs/recipe.md, "Design choices, and why")."""
    min_accuracy: float = 0.98
    min_type_accuracy: float = 0.95


@dataclass
class VisionGate:
    """Linear probes on the frozen ViT's per-object features (held-out scenes) the ViT needs before it
    is frozen: colour, shape, size and coarse position (`pretrain.shapes.vision_probes`)."""
    min_accuracy: float = 0.95
    train_scenes: int = 1000  # the probes are fitted on these (train split) ...
    val_scenes: int = 500  # ... and scored on these (val split)


@dataclass
class QFormerShape:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    num_query_tokens: int = 16
    image_text_hidden_size: int = 64  # ITC embedding width (BLIP-2: 256)
    max_text_length: int = 160
    instruction: bool = False  # InstructBLIP: the question also enters the Q-Former (stages 2-3)
    # the projection's output is scaled to the frozen LM's token-embedding RMS (MMBridgeConfig.projection_norm)
    projection_norm: bool = True
    # DETR-style object set loss on the queries (MMBridgeConfig.qformer_object_attributes): one query per object
    objects: bool = True


@dataclass
class DataStage:
    train_scenes: int = 20000  # scenes written for stages 2 and 3 (train split)
    qa_per_scene: int = 8  # turns of the multi-turn chat written per scene
    single_qa_per_scene: int = 0  # extra one-question chats per scene
    eval_scenes: int = 1000  # test split, for `mmbridge eval` after the recipe


@dataclass
class ActStage:
    """The act stages' data (pretrain.act.write_act_data / data.shapes.act_eval.write_act_eval) and head
    (`ActConfig` settings over pretrain.act.SHAPES_ACT_HEAD, e.g. `shared_queries: true`, `queries_per_task: 8`
    for the ablations)."""
    train_scenes: int = 20000
    requests_per_scene: int = 3
    see_turns: int = 4  # see chats about the same scenes, mixed into act stage 2
    eval_scenes: int = 1000  # test split: OUT/act/eval/{coco,ground,region,route}_test.*
    pose_figures: int = 4000  # stick figures for [POSE] (pose.json; none when the head's tasks lack "pose")
    eval_pose_figures: int = 250  # test split: OUT/act/eval/coco_pose_test.json
    head: dict = field(default_factory=dict)
    text_encoder: bool = True  # the foundation's CLIP text tower reads the requests' words (when it has one)
    edit_pairs: int = 8000  # act_edit: train-split edit pairs (act/data/edit.json)


@dataclass
class DrawStage:
    """The draw stages' data (pretrain.draw.write_draw_data) and head (`DrawConfig` settings, e.g.
    `num_slots: 3` — 4 vokens — for the seed's voken-count ablation)."""
    train_scenes: int = 20000  # stage 1: caption -> image
    stories: int = 4000  # stage 2: as many stories and edit dialogues
    see_turns: int = 4  # see chats about stage 1's scenes, mixed into stage 2
    head: dict = field(default_factory=dict)
    # draw_mapper: the mapper alone on cached LLM states (pretrain.draw.fit_draw_mapper), caption MSE
    mapper_steps: int = 1500
    mapper_batch_size: int = 64
    mapper_lr: float = 5.0e-4
    mapper_held_out: int = 500  # drawings of the data kept out of training: the stage's held-out MSE


@dataclass
class TrainerStage:
    config: str  # a trainer stage YAML (relative to the recipe file)
    overrides: list[str] = field(default_factory=list)


@dataclass
class RecipeConfig:
    name: str
    # the foundation's stages (shapes_foundation.yaml) ...
    tokenizer: TokenizerStage = field(default_factory=TokenizerStage)
    lm: LMConfig = field(default_factory=LMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    # ... and the bridges' (shapes.yaml)
    qformer: QFormerShape = field(default_factory=QFormerShape)
    stage1: TrainerStage = field(default_factory=lambda: TrainerStage("shapes_stage1_qformer.yaml"))
    data: DataStage = field(default_factory=DataStage)
    stage2: TrainerStage = field(default_factory=lambda: TrainerStage("shapes_stage2_align.yaml"))
    stage3: TrainerStage = field(default_factory=lambda: TrainerStage("shapes_stage3_instruct.yaml"))
    lm_gate: LMGate = field(default_factory=LMGate)
    vision_gate: VisionGate = field(default_factory=VisionGate)
    # draw's stage 0: a VAE + text-conditioned UNet (hours on 2 cores, resumable); off in the see recipe
    draw_generator: bool = False
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    draw: DrawStage = field(default_factory=DrawStage)
    draw_stage1: TrainerStage = field(default_factory=lambda: TrainerStage("shapes_draw_stage1.yaml"))
    draw_stage2: TrainerStage = field(default_factory=lambda: TrainerStage("shapes_draw_stage2.yaml"))
    act: ActStage = field(default_factory=ActStage)
    act_stage1: TrainerStage = field(default_factory=lambda: TrainerStage("shapes_act_stage1.yaml"))
    act_stage2: TrainerStage = field(default_factory=lambda: TrainerStage("shapes_act_stage2.yaml"))
    act_pose: TrainerStage = field(default_factory=lambda: TrainerStage("shapes_act_pose.yaml"))
    act_decoders: TrainerStage = field(default_factory=lambda: TrainerStage("shapes_act_decoders.yaml"))
    act_edit: TrainerStage = field(default_factory=lambda: TrainerStage("shapes_act_edit.yaml"))
    #: Which stages this recipe runs, in RUN_ORDER (default: STAGES, all of them but the act stages).
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    #: Where the bridge stages find the frozen stage-0 models: a directory written by a foundation run
    #: (its tokenizer/, lm/, vision/, text_encoder/, generator/), `shipped` (the package's), or null
    #: (this run's own output directory, i.e. the recipe also runs the foundation stages).
    foundation: str | None = None
    #: The trained model the head stages (draw, act) build on when this run does not train one: e.g.
    #: `see_model=DIR` (or a shipped model's name) with `stages=[act_data,act_stage1,act_stage2,export]` adds
    #: the act head to it (it must not have one). None: this run's stage-3 (or draw) model.
    see_model: str | None = None
    seed: int = 0
    threads: int = 2
    see_scenes: int = 40  # val scenes of the see table after stages 2 and 3 (pretrain/see.py); 0: none
    probe_items: int = 1500  # train items of the soft-prompt probes after stages 1-3 (a quarter as many val); 0: none
    dense_vision_targets: bool = True  # each ViT patch predicts color/shape/size (docs/recipe.md)
    base_dir: str = "."


def resolve_recipe(name_or_path: str) -> Path:
    """`shapes` / `shapes-smoke` (shipped) or a path to a recipe YAML."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        return path
    shipped = RECIPES_DIR / f"{name_or_path.replace('-', '_')}.yaml"
    if not shipped.is_file():
        names = sorted(p.stem.replace("_", "-") for p in RECIPES_DIR.glob("shapes*.yaml") if "stage" not in p.stem)
        raise ConfigError(f"unknown recipe {name_or_path!r}; shipped recipes: {names}, or give a YAML path")
    return shipped


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> RecipeConfig:
    path = resolve_recipe(name_or_path)
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict) or raw.get("recipe") != "shapes":
        raise ConfigError(f"{path} is not a recipe file (it needs `recipe: shapes` at the top)")
    raw = apply_overrides({k: v for k, v in raw.items() if k != "recipe"}, list(overrides or []))
    raw["base_dir"] = str(path.parent)
    cfg = _build(RecipeConfig, raw, "")
    unknown = [name for name in cfg.stages if name not in RUN_ORDER]
    if unknown:
        raise ConfigError(f"{path}: unknown stages {unknown}; stages are {list(RUN_ORDER)}")
    if cfg.foundation is not None and set(cfg.stages) & set(FOUNDATION_STAGES):
        raise ConfigError(f"{path}: a recipe that reads a foundation ({cfg.foundation}) cannot also train one "
                          f"(drop {sorted(set(cfg.stages) & set(FOUNDATION_STAGES))} from stages, or foundation=null)")
    return cfg


def resolve_foundation(foundation: str) -> Path:
    """`shipped` or a directory written by `mmbridge train shapes-foundation`, checked to hold every part."""
    path = SHIPPED_FOUNDATION if foundation == "shipped" else Path(foundation).resolve()
    missing = [part for part in FOUNDATION_PARTS if not (path / part).is_dir()]
    if missing:
        hint = ("this install ships no trained foundation" if foundation == "shipped"
                else f"{path} is not a foundation directory")
        raise ConfigError(f"{hint} (missing {missing}); train one with `mmbridge train shapes-foundation --out DIR` "
                          f"and pass `foundation=DIR`")
    return path


class Recipe:
    def __init__(self, cfg: RecipeConfig, out: str | os.PathLike, log: Callable[[str], None] = print):
        # absolute: the trainer stages resolve relative data paths against their YAML's folder
        self.cfg, self.out, self.log = cfg, Path(out).resolve(), log
        self.report_path = self.out / "report.json"
        # the frozen stage-0 models: this run's own (foundation stages in this recipe) or a trained foundation's
        self.foundation = resolve_foundation(cfg.foundation) if cfg.foundation is not None else self.out

    # -- bookkeeping ------------------------------------------------------------------------------
    def _report(self) -> dict:
        return json.loads(self.report_path.read_text()) if self.report_path.is_file() else {"stages": {}}

    def _save_report(self, report: dict) -> None:
        tmp = self.report_path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, self.report_path)

    def run(self, until: str | None = None) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(self.cfg.threads)
        report = self._report()
        report["recipe"] = self.cfg.name
        if self.foundation != self.out:
            report["foundation"] = str(self.foundation)
        stages = [name for name in RUN_ORDER if name in self.cfg.stages]
        for name in stages:
            if name in report["stages"]:
                self.log(f"[{name}] done before, skipped ({report['stages'][name].get('seconds', 0):.0f} s)")
            else:
                self.log(f"[{name}] running")
                start = time.perf_counter()
                result = getattr(self, f"_{name}")() or {}
                result = {"seconds": round(time.perf_counter() - start, 1), **result}
                report["stages"][name] = result
                self._save_report(report)
                self.log(f"[{name}] {json.dumps(result)}")
            if name == until:
                break
        report["total_seconds"] = round(sum(s.get("seconds", 0) for s in report["stages"].values()), 1)
        self._see_table(report)
        self._save_report(report)
        return report

    def _see_table(self, report: dict) -> None:
        """The per-stage see rows, blind baselines and retrieval R@1 as one table in the report and the log."""
        from mmbridge.pretrain.see import format_see_table, see_table

        table = see_table(report["stages"])
        if table["rows"] or table["retrieval"]:
            report["see_table"] = table
            self.log("see table (% correct; canonical questions of val scenes):\n" + format_see_table(table))

    def _tokenizer_and_lm(self):
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

        return (PreTrainedTokenizerFast.from_pretrained(self.foundation / "lm"),
                AutoModelForCausalLM.from_pretrained(self.foundation / "lm"))

    # -- stage 0 ---------------------------------------------------------------------------------
    def _tokenizer(self) -> dict:
        from mmbridge.pretrain.shapes import lm_corpus
        from mmbridge.pretrain.text import train_tokenizer

        tokenizer = train_tokenizer(lm_corpus(self.cfg.tokenizer.corpus_dialogues, self.cfg.seed),
                                    vocab_size=self.cfg.tokenizer.vocab_size)
        tokenizer.save_pretrained(self.out / "tokenizer")
        return {"vocab_size": len(tokenizer)}

    def _lm(self) -> dict:
        from transformers import PreTrainedTokenizerFast

        from mmbridge.pretrain.shapes import (
            lm_samples,
            lookup_check,
            relation_breakdown,
            retrieval_check,
            text_qa_accuracy,
        )
        from mmbridge.pretrain.text import build_causal_lm, pretrain_causal_lm

        tokenizer = PreTrainedTokenizerFast.from_pretrained(self.out / "tokenizer")
        lm = build_causal_lm(tokenizer, self.cfg.lm)
        def evaluate(model) -> dict:
            return {"text_qa": text_qa_accuracy(model, tokenizer, num_scenes=30),
                    "relations": relation_breakdown(model, tokenizer, num_scenes=30),
                    "retrieval": retrieval_check(model, tokenizer), "lookups": lookup_check(model, tokenizer)}

        checkpoint = self.out / "lm.checkpoint"  # resumes a killed LM stage where it was
        losses = pretrain_causal_lm(lm, tokenizer, lm_samples, self.cfg.lm, log=lambda d: self.log(f"  lm {d}"),
                                    evaluate=evaluate, checkpoint_dir=checkpoint)
        lm.save_pretrained(self.out / "lm")
        tokenizer.save_pretrained(self.out / "lm")
        shutil.rmtree(checkpoint, ignore_errors=True)
        accuracy = text_qa_accuracy(lm, tokenizer, num_scenes=100)
        return {"final_loss": _tail_mean(losses), "params": sum(p.numel() for p in lm.parameters()),
                "text_qa_accuracy_val": accuracy, "retrieval_val": retrieval_check(lm, tokenizer),
                "relations_val": relation_breakdown(lm, tokenizer), "lookups_val": lookup_check(lm, tokenizer)}

    def _lm_gate(self) -> dict:
        """A stage of its own so that a failed gate keeps the trained LM: rerun with a lower gate to go on."""
        from mmbridge.pretrain.shapes import check_lm_gate

        accuracy = self._report()["stages"]["lm"]["text_qa_accuracy_val"]
        check_lm_gate(accuracy, self.cfg.lm_gate.min_accuracy, self.cfg.lm_gate.min_type_accuracy)
        return {"text_qa_accuracy_val": accuracy["all"], "min_accuracy": self.cfg.lm_gate.min_accuracy,
                "min_type_accuracy": self.cfg.lm_gate.min_type_accuracy}

    def _vision(self) -> dict:
        from transformers import PreTrainedTokenizerFast

        from mmbridge.pretrain.shapes import DENSE_TARGETS, vision_batch
        from mmbridge.pretrain.vision import CLIPWithDenseHeads, pretrain_vision, retrieval_recall_at_1

        cfg = self.cfg.vision
        cfg.dense_targets = dict(DENSE_TARGETS) if self.cfg.dense_vision_targets else {}
        tokenizer = PreTrainedTokenizerFast.from_pretrained(self.out / "tokenizer")
        model = CLIPWithDenseHeads(tokenizer, cfg)
        rng = random.Random(self.cfg.seed + 1)
        losses = pretrain_vision(model, lambda step, n: vision_batch(rng, n, tokenizer, cfg.patch_size), cfg,
                                 log=lambda d: self.log(f"  vision {d}"))
        model.vision_tower().save_pretrained(self.out / "vision")
        model.text_tower().save_pretrained(self.out / "text_encoder")  # conditions the draw generator
        val = vision_batch(random.Random(12345), 256, tokenizer, cfg.patch_size, split="val")
        recall = retrieval_recall_at_1(model, val["pixel_values"], val["input_ids"], val["attention_mask"])
        return {"final_loss": _tail_mean(losses), "clip_recall_at_1_val256": recall}

    def _vision_gate(self) -> dict:
        """A stage of its own, like the LM gate: a failed gate keeps the trained ViT."""
        from transformers import CLIPVisionModel

        from mmbridge.pretrain.shapes import vision_probes

        vision = CLIPVisionModel.from_pretrained(self.out / "vision")
        gate = self.cfg.vision_gate
        probes = vision_probes(vision, vision.config.patch_size, num_train=gate.train_scenes, num_val=gate.val_scenes)
        failed = {k: v for k, v in probes.items() if k != "objects_val" and v < self.cfg.vision_gate.min_accuracy}
        if failed:
            raise ConfigError(
                f"vision gate: linear probes on the frozen ViT's object features (held-out scenes) are {probes}; "
                f"{sorted(failed)} below {self.cfg.vision_gate.min_accuracy}. The trained ViT is kept in "
                f"{self.out / 'vision'}: train it longer (stages=[vision] after deleting its line in report.json) "
                f"or pass vision_gate.min_accuracy=0 to go on with it.")
        return {"probes_val": probes, "min_accuracy": self.cfg.vision_gate.min_accuracy}

    def _generator(self) -> dict:
        """Draw's frozen image generator (pretrain.diffusion), conditioned on the stage-0 CLIP text tower;
        written as a StableDiffusionPipeline dir at OUT/generator."""
        if not self.cfg.draw_generator:
            return {"skipped": "draw_generator is false"}
        from transformers import CLIPTextModel, PreTrainedTokenizerFast

        from mmbridge.pretrain.diffusion import train_generator

        text_encoder = CLIPTextModel.from_pretrained(self.out / "text_encoder")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(self.out / "tokenizer")
        return train_generator(self.out, text_encoder.eval(), tokenizer, self.cfg.generator,
                               log=lambda d: self.log(f"  generator {d}"))

    def _compose(self) -> dict:
        """Frozen ViT + fresh Q-Former (with BLIP-2's text side) + projection + frozen LM, saved whole."""
        from transformers import CLIPVisionModel

        from mmbridge.config import MMBridgeConfig
        from mmbridge.modeling import MMBridgeModel
        from mmbridge.pretrain.shapes import OBJECT_ATTRIBUTES, shapes_processor

        tokenizer, lm = self._tokenizer_and_lm()
        vision = CLIPVisionModel.from_pretrained(self.foundation / "vision")
        q = self.cfg.qformer
        processor = shapes_processor(tokenizer, q.num_query_tokens, vision.config.image_size,
                                     instruction=q.instruction)
        config = MMBridgeConfig(
            vision_config=vision.config.to_dict(), text_config=lm.config.to_dict(),
            qformer_config={"hidden_size": q.hidden_size, "num_hidden_layers": q.num_layers,
                            "num_attention_heads": q.num_heads, "intermediate_size": q.intermediate_size,
                            "cross_attention_frequency": 1, "vocab_size": len(tokenizer),
                            "pad_token_id": tokenizer.pad_token_id, "max_position_embeddings": q.max_text_length},
            num_query_tokens=q.num_query_tokens, image_token_index=processor.image_token_id,
            image_text_hidden_size=q.image_text_hidden_size, qformer_cls_token_id=tokenizer.bos_token_id,
            qformer_dec_token_id=tokenizer.convert_tokens_to_ids("[DEC]"), qformer_instruction=q.instruction,
            projection_norm=q.projection_norm,  # the scale is measured from the LM when the model is built
            qformer_object_attributes=OBJECT_ATTRIBUTES if q.objects else None,
        )
        torch.manual_seed(self.cfg.seed)
        model = MMBridgeModel(config, vision_model=vision, language_model=lm)
        model.save_pretrained(self.out / "base")
        processor.save_pretrained(self.out / "base")
        return {"params": {c: sum(p.numel() for p in getattr(model, c).parameters())
                           for c in ("vision", "qformer", "projection", "llm")},
                "projection_norm_scale": model.config.projection_norm_scale}

    # -- stage 1 ---------------------------------------------------------------------------------
    def _stage1(self) -> dict:
        result = self._trainer_stage(self.cfg.stage1, self.out / "base", self.out / "stage1", self._shard_overrides())
        # no see rows: stage 1 trains no path into the LM (the projection is still fresh)
        return {**result, **self._measure(self.out / "stage1" / "model", see=False)}

    def _measure(self, model_dir: Path, see: bool = True) -> dict:
        """A stage's checks: ITC retrieval R@1 on 1000 val scenes, the soft-prompt probes (`probe_items`) and,
        with `see`, the see table's rows (pretrain/see.py) on `see_scenes` val scenes; stage 2 also holds
        the frozen LM's blind baselines."""
        from mmbridge.modeling import MMBridgeModel
        from mmbridge.pretrain.qformer import retrieval_recall
        from mmbridge.pretrain.see import blind_baselines, see_records, stage_see
        from mmbridge.pretrain.shapes import object_slot_accuracy, scene_features, soft_prompt_probes
        from mmbridge.processing import MMBridgeProcessor

        model = MMBridgeModel.from_pretrained(model_dir)
        processor = MMBridgeProcessor.from_pretrained(model_dir)
        out = {}
        if model.qformer.text is not None:
            features, texts = scene_features(model, "val", 1000)
            out["itc_recall_at_1_val1000"] = retrieval_recall(model.qformer, features, texts, processor.tokenizer,
                                                              cls_token_id=model.config.qformer_cls_token_id)
        if model.qformer.objects is not None:  # one object per query, attributes bound (modeling/objects.py)
            out["object_slots"] = object_slot_accuracy(model, "val", 500)
        if self.cfg.probe_items > 0:  # attributes and their binding in the soft prompt (pretrain/shapes.py)
            out["soft_prompt_probes"] = soft_prompt_probes(model, processor.tokenizer, self.cfg.probe_items,
                                                           max(self.cfg.probe_items // 4, 8))
        if see and self.cfg.see_scenes > 0:
            out["see"] = stage_see(model, processor, see_records(self.cfg.see_scenes))
            if not any("blind_baselines" in r for r in self._report()["stages"].values()):
                tokenizer, lm = self._tokenizer_and_lm()
                out["blind_baselines"] = blind_baselines(lm.eval(), tokenizer, self.cfg.see_scenes)
        return out

    def _shard_overrides(self) -> list[str]:
        data = self.out / "data"
        return [f"data.datasets.0.shards={data / 'captions' / 'shard-*.tar'}",
                f"data.datasets.1.shards={data / 'descriptions' / 'shard-*.tar'}"]

    # -- data for stages 2 and 3 -----------------------------------------------------------------
    def _data(self) -> dict:
        from mmbridge.pretrain.shapes import write_stage_data

        return write_stage_data(self.out / "data", self.cfg.data.train_scenes, self.cfg.data.qa_per_scene,
                                self.cfg.data.single_qa_per_scene, seed=self.cfg.seed)

    # -- stages 2 and 3: the trainer ----------------------------------------------------------------
    def _trainer_stage(self, stage: TrainerStage, model_dir: Path, run_dir: Path, data_overrides: list[str]) -> dict:
        from mmbridge.train.config import load_stage_config
        from mmbridge.train.trainer import Trainer

        path = Path(self.cfg.base_dir) / stage.config
        overrides = [f"model={model_dir}", *data_overrides, *stage.overrides]
        cfg = load_stage_config(path, overrides)
        cfg.run.progress_bar = False
        result = Trainer(cfg, run_dir, resume=True).fit()
        torch.set_num_threads(self.cfg.threads)  # the trainer may have lowered it for its data workers
        return {"final_loss": result["loss"], "final_losses": result.get("losses"), "steps": result["step"],
                "samples": result["samples"]}

    def _stage2(self) -> dict:
        result = self._trainer_stage(self.cfg.stage2, self.out / "stage1" / "model", self.out / "stage2",
                                     self._shard_overrides())
        return {**result, **self._measure(self.out / "stage2" / "model")}

    def _stage3(self) -> dict:
        result = self._trainer_stage(self.cfg.stage3, self.out / "stage2" / "model", self.out / "stage3", [
            f"data.datasets.0.path={self.out / 'data' / 'instruct.json'}",
            f"data.datasets.1.shards={self.out / 'data' / 'captions' / 'shard-*.tar'}"])
        return {**result, **self._measure(self.out / "stage3" / "model")}

    # -- the draw head (issue 14): data, then its two trainer stages on the stage-3 model -------------
    def _draw_data(self) -> dict:
        from mmbridge.pretrain.draw import write_draw_data

        return write_draw_data(self.out / "draw" / "data", self.cfg.draw.train_scenes, self.cfg.draw.stories,
                               self.cfg.draw.see_turns, seed=self.cfg.seed)

    def _draw_stage1(self) -> dict:
        from mmbridge.pretrain.draw import add_draw_head

        generator = self.foundation / "generator"
        if not (generator / "model_index.json").is_file():
            raise ConfigError(f"the draw stages need the foundation's generator, and {generator} has none: train it "
                              "with `mmbridge train shapes-foundation --out DIR draw_generator=true` (resumable)")
        base = self.out / "draw" / "base"
        if not (base / "config.json").is_file():  # a resumed stage keeps the head it started with
            torch.manual_seed(self.cfg.seed)
            add_draw_head(self._trained_see_model(), generator, base, **self.cfg.draw.head)
        return self._trainer_stage(self.cfg.draw_stage1, base, self.out / "draw" / "stage1",
                                   [f"data.datasets.0.path={self.out / 'draw' / 'data' / 'draw_stage1.json'}"])

    def _draw_stage2(self) -> dict:
        return self._trainer_stage(self.cfg.draw_stage2, self.out / "draw" / "stage1" / "model",
                                   self.out / "draw" / "stage2",
                                   [f"data.datasets.0.path={self.out / 'draw' / 'data' / 'draw_stage2.json'}",
                                    f"data.datasets.1.path={self.out / 'draw' / 'data' / 'see.json'}"])

    def _trained_see_model(self) -> Path:
        """The see-model the heads start from: `see_model` (a directory or a shipped name) or stage 3's."""
        if self.cfg.see_model is not None:
            from mmbridge.models import resolve_model_path

            return resolve_model_path(self.cfg.see_model)
        return self.out / "stage3" / "model"

    def _see_model(self) -> Path:
        """The model later heads build on: the draw model when this recipe draws, else the see-model."""
        if "draw_stage2" in self.cfg.stages:
            return self.out / "draw" / "stage2" / "model"
        return self._trained_see_model()

    # -- the act head (issue 15): data, then its two trainer stages on the see (or draw) model ---------
    def _act_data(self) -> dict:
        from mmbridge.data.shapes.act_eval import write_act_eval
        from mmbridge.pretrain.act import write_act_data

        act, out = self.cfg.act, self.out / "act"
        poses = self._act_poses()
        return {"train": write_act_data(out / "data", act.train_scenes, act.requests_per_scene, act.see_turns,
                                        seed=self.cfg.seed, pose_figures=act.pose_figures if poses else 0),
                "eval": write_act_eval(out / "eval", act.eval_scenes, seed=self.cfg.seed,
                                       pose_figures=act.eval_pose_figures if poses else 0)}

    def _act_poses(self) -> bool:
        """Whether the act head finds poses: `[POSE]` among its tasks and stick figures to train it on."""
        from mmbridge.pretrain.act import SHAPES_ACT_HEAD

        return "pose" in self.cfg.act.head.get("tasks", SHAPES_ACT_HEAD["tasks"]) and self.cfg.act.pose_figures > 0

    def _pose_overrides(self, stage: TrainerStage, weight: float, appended: int = 0) -> list[str]:
        """The stick figures' `[POSE]` requests appended to a stage's mix (at `weight`; after the `appended`
        datasets other overrides add) and the keypoint decoder to what it trains: ~1 sample in 8 in stage 1
        (0.15 against act.json's 1), 1 in 22 in stage 2 (0.25 against act 2, see 1, region 1, refusals 1,
        draw 1). At 1 in 4 and 1 in 9 (run d2) the other act tasks lost much (box AP 0.25 -> 0.11, region VQA
        62 -> 46 %)."""
        if not self._act_poses():
            return []
        spec = yaml.safe_load((Path(self.cfg.base_dir) / stage.config).read_text())  # its lists' lengths only
        pose = {"name": "pose", "type": "llava_json", "weight": weight,
                "path": str(self.out / "act" / "data" / "pose.json")}
        return [f"data.datasets.{len(spec['data']['datasets']) + appended}={json.dumps(pose)}",
                f"train.{len(spec['train'])}=act.pose_decoder"]

    def _act_stage1(self) -> dict:
        from mmbridge.pretrain.act import add_act_head

        base = self.out / "act" / "base"
        if not (base / "config.json").is_file():  # a resumed stage keeps the head it started with
            from mmbridge.config import MMBridgeConfig

            see_model = self._see_model()
            if self.cfg.act.head.get("name", "act") in MMBridgeConfig.from_pretrained(see_model).head_configs:
                raise ConfigError(f"{see_model} already has an act head; the act stages start from a see-model "
                                  "without one (the bridges' stage-3 model, or `see_model=DIR` naming one)")
            torch.manual_seed(self.cfg.seed)
            tower = self.foundation / "text_encoder"
            settings = dict(self.cfg.act.head)
            if "tasks" not in settings and self.cfg.act.pose_figures <= 0:  # no figures: no untrained [POSE]
                from mmbridge.pretrain.act import SHAPES_ACT_HEAD

                settings["tasks"] = [t for t in SHAPES_ACT_HEAD["tasks"] if t != "pose"]
            add_act_head(see_model, base, tower if self.cfg.act.text_encoder and tower.is_dir() else None,
                         **settings)
        return self._trainer_stage(self.cfg.act_stage1, base, self.out / "act" / "stage1",
                                   [f"data.datasets.0.path={self.out / 'act' / 'data' / 'act.json'}",
                                    *self._pose_overrides(self.cfg.act_stage1, weight=0.15)])

    def _act_stage2(self) -> dict:
        """Act stage 2 trains the LLM's LoRA, so the refusals (`refusals.json`: requests for classes the world
        lacks, answered in text) join the act and see data here, not in stage 1, and the chats that ask about a
        region in words (`region_vqa.json`) come a second time, at weight 1: the LoRA learns to read the
        `<region>` from them. On a model that draws, the draw requests (`draw_stage1.json`) join too, with the
        LDM loss through the frozen mapper — else the LoRA forgets to answer "Draw …" with `[IMG0]` (measured:
        12 of 100 requests drawn after an act stage 2 without them)."""
        from mmbridge.data.formats.llava import write_llava
        from mmbridge.pretrain.act import region_answer_chats

        data = self.out / "act" / "data"
        overrides = [f"data.datasets.0.path={data / 'act.json'}", f"data.datasets.1.path={data / 'see.json'}"]
        if not (data / "region_vqa.json").is_file():  # act data written before it existed
            write_llava(region_answer_chats(json.loads((data / "act.json").read_text())), str(data / "region_vqa.json"))
        extra = []
        if json.loads((data / "region_vqa.json").read_text()):  # a few scenes may ask no region question
            extra.append({"name": "region_vqa", "type": "llava_json", "weight": 1,
                          "path": str(data / "region_vqa.json")})
        if json.loads((data / "refusals.json").read_text()):  # nor for an unknown class
            extra.append({"name": "refusals", "type": "llava_json", "weight": 1, "path": str(data / "refusals.json")})
        if "draw_stage2" in self.cfg.stages:
            extra.append({"name": "draw", "type": "llava_json", "weight": 1,
                          "path": str(self.out / "draw" / "data" / "draw_stage1.json")})
            overrides.append("losses.draw_ldm=1.0")
        spec = yaml.safe_load((Path(self.cfg.base_dir) / self.cfg.act_stage2.config).read_text())
        first = len(spec["data"]["datasets"])
        overrides += [f"data.datasets.{first + i}={json.dumps(d)}" for i, d in enumerate(extra)]
        overrides += self._pose_overrides(self.cfg.act_stage2, weight=0.25, appended=len(extra))
        return self._trainer_stage(self.cfg.act_stage2, self.out / "act" / "stage1" / "model",
                                   self.out / "act" / "stage2", overrides)

    def _act_model(self, before: str | None = None) -> Path:
        """The act model the stages listed so far end with (before stage `before`): act_edit's, act_decoders',
        act_pose's or act stage 2's."""
        folders = {"act_stage2": "stage2", "act_pose": "pose", "act_decoders": "decoders", "act_edit": "edit"}
        listed = [s for s in folders if s in self.cfg.stages and (s != "act_pose" or self._act_poses())]
        if before is not None:
            listed = listed[:listed.index(before)]
        return self.out / "act" / folders[listed[-1]] / "model"

    def _act_pose(self) -> dict:
        """The keypoint decoder alone on the stick figures (`recipes/shapes_act_pose.yaml`): in stage 2's mix it
        is undertrained, and training it alone moves nothing else."""
        if not self._act_poses():
            return {"skipped": "the act head has no [POSE] route or no stick figures"}
        return self._trainer_stage(self.cfg.act_pose, self._act_model("act_pose"), self.out / "act" / "pose",
                                   [f"data.datasets.0.path={self.out / 'act' / 'data' / 'pose.json'}"])

    def _act_decoders(self) -> dict:
        """The box / mask / grounding decoder alone on the act chats and `absent.json` (requests for classes the
        world lacks, routed with no boxes: `recipes/shapes_act_decoders.yaml`)."""
        data = self.out / "act" / "data"
        if not (data / "absent.json").is_file():
            raise ConfigError(f"{data} was written before absent.json existed: delete the folder and run act_data "
                              "again (or leave act_decoders out of the stages)")
        return self._trainer_stage(self.cfg.act_decoders, self._act_model("act_decoders"),
                                   self.out / "act" / "decoders",
                                   [f"data.datasets.0.path={data / 'act.json'}",
                                    f"data.datasets.1.path={data / 'absent.json'}"])

    def _act_edit(self) -> dict:
        """The act head gains `[EDIT]` (`MMBridgeModel.extend_head`: the stage-2 model's weights as they were,
        the routing token, its queries and an editing UNet initialised from the draw UNet) and trains it on
        `edit.json` with the act and see chats (`recipes/shapes_act_edit.yaml`). Needs the draw head: the editor
        edits in its generator's latent space."""
        from mmbridge.config import MMBridgeConfig
        from mmbridge.pretrain.act import SHAPES_EDIT_SETTINGS, extend_act_head, write_edit_data

        data, base = self.out / "act" / "data", self.out / "act" / "edit" / "base"
        stage2 = self._act_model("act_edit")
        if "draw" not in MMBridgeConfig.from_pretrained(stage2).head_configs:
            raise ConfigError("act_edit edits in the draw head's latent space: run the draw stages first "
                              "(or start from a see_model that draws)")
        written = None
        if not (data / "edit.json").is_file():
            written = write_edit_data(data, self.cfg.act.edit_pairs, seed=self.cfg.seed)
        if not (base / "config.json").is_file():  # a resumed stage keeps the head it started with
            torch.manual_seed(self.cfg.seed)
            extend_act_head(stage2, base, "edit", **SHAPES_EDIT_SETTINGS)
        result = self._trainer_stage(self.cfg.act_edit, base, self.out / "act" / "edit", [
            f"data.datasets.0.path={data / 'edit.json'}", f"data.datasets.1.path={data / 'act.json'}",
            f"data.datasets.2.path={data / 'see.json'}"])
        return {**result, **({"data": written} if written else {})}

    def _draw_mapper(self) -> dict:
        """The draw mapper fit alone on the final LLM's cached states (`pretrain.draw.fit_draw_mapper`) on the
        requests (`draw_stage1.json`, each drawing with its caption) and the stories' first frames
        (`draw_story_first.json`). Not whole stories: their later frames' captions name objects the request
        window does not (earlier steps), and at 62 % of the drawings they cost the requests half their samples —
        run n1 (both files) drew 44 %, run n3 (requests) 48 % of 300 prompts. Without the first frames, story
        openings were drawn right 13 % of the time (run p1m; 86 % with them, run p3m)."""
        from mmbridge.config import MMBridgeConfig
        from mmbridge.pretrain.draw import fit_draw_mapper

        model = self._trained_model(before="draw_mapper")
        if "draw" not in MMBridgeConfig.from_pretrained(model).head_configs:
            raise ConfigError(f"draw_mapper fits the draw head's mapper, and {model} has none: list the draw stages")
        data = self.out / "draw" / "data"
        stage = self.cfg.draw
        # the requests last: the held-out drawings (the stage's check) are the data's last ones
        files = [f for f in [data / "draw_story_first.json"] if f.is_file()] + [data / "draw_stage1.json"]
        return fit_draw_mapper(model, files,
                               self.out / "draw" / "mapper", steps=stage.mapper_steps,
                               batch_size=stage.mapper_batch_size, lr=stage.mapper_lr, held_out=stage.mapper_held_out,
                               seed=self.cfg.seed, log=lambda entry: self.log(f"[draw_mapper] {json.dumps(entry)}"))

    def _trained_model(self, before: str | None = None) -> Path:
        """The model the stages listed end with (before stage `before`): draw_mapper's, else the last act
        model, else the draw model, else the see-model."""
        if "draw_mapper" in self.cfg.stages and before != "draw_mapper":
            return self.out / "draw" / "mapper" / "model"
        return self._act_model() if "act_stage2" in self.cfg.stages else self._see_model()

    def _export(self) -> dict:
        """The finished model, self-contained; checked to load and to be bit-identical in its frozen parts:
        `_trained_model()` (draw_mapper's, the last act model, the draw model or the see-model)."""
        from mmbridge.config import MMBridgeConfig
        from mmbridge.modeling import MMBridgeModel
        from mmbridge.pretrain.shapes import frozen_parts_identical

        final = self.out / "model"
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(self._trained_model(), final)
        config = MMBridgeConfig.from_pretrained(final)
        for sub in (config.vision_config, config.qformer_config, config.text_config):
            sub._name_or_path = ""  # where stage 0 happened to write its parts means nothing elsewhere
        for name, head in config.heads.items():  # the draw generator travels inside the model: self-contained
            if head.get("pipeline_path"):
                shutil.copytree(head["pipeline_path"], final / "generator")
                head["pipeline_path"] = config.component_paths[f"{name}.generator"] = "generator"
        config.save_pretrained(final)
        model = MMBridgeModel.from_pretrained(final)
        base = MMBridgeModel.from_pretrained(self.out / "base" if self.cfg.see_model is None
                                             else self._trained_see_model())
        size = sum(f.stat().st_size for f in final.iterdir() if f.is_file())
        return {"model_dir": str(final), "bytes": size, "frozen_parts_identical": frozen_parts_identical(base, model)}


def _tail_mean(values: list[float], n: int = 50) -> float:
    tail = values[-n:]
    return round(sum(tail) / len(tail), 4) if tail else float("nan")


def run_recipe(name_or_path: str, out: str | os.PathLike, overrides: list[str] | None = None,
               until: str | None = None, log: Callable[[str], None] = print) -> dict:
    cfg = load_recipe(name_or_path, overrides)
    if until is not None and until not in RUN_ORDER:
        raise ConfigError(f"--until must be one of {list(RUN_ORDER)}, got {until!r}")
    return Recipe(cfg, out, log).run(until)
