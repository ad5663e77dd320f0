"""What each zoo model is: its architecture (a tiny builder + sizes), its task and how it trains.

A new zoo model is one more `ZooSpec`: the training script takes the builder by name, so the
motion task can be trained on another video family's tiny builder without code changes
(``python -m vlminterp.zoo.train tiny-qwen2-vl-motion --builder module:function``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ZooSpec:
    zoo_id: str
    base: str  # the random-weight tiny id of the same architecture (`vlminterp.load`)
    builder: str  # "module:function" returning (torch_model, processor)
    builder_kwargs: dict
    task: str  # "module:Class" with loss(rng, batch_size), fast(), and evaluate(...) in its module
    steps: int
    batch_size: int
    lr: float
    eval_n: int  # held-out items per question kind (or per class) on the card
    storage_dtype: str = "float32"
    description: str = ""
    data: str = ""
    mechanism: dict = field(default_factory=dict)


SPECS = {s.zoo_id: s for s in [
    ZooSpec(
        zoo_id="tiny-qwen2-vl-motion", base="tiny-qwen2-vl",
        builder="vlminterp.models.tiny:build_qwen2_vl",
        builder_kwargs={"max_pixels": 56 * 56, "rope_theta": 2.0},
        task="vlminterp.zoo.video_model:VideoMC", steps=1200, batch_size=32, lr=2e-3, eval_n=200,
        description="Qwen2-VL answering multiple-choice questions about a moving coloured square "
                    "(8 frames, resized by its processor to 56x56: 4 temporal groups of 2x2 "
                    "tokens; rope_theta 2 so the LM's rotary positions tell grid columns apart)",
        data="vlminterp.zoo.video_task (clips from vlminterp.data.synthetic.make_video)",
        mechanism={
            "direction": "needs the square's x in >= 2 temporal groups (on hold=2 clips no group "
                         "shows motion); all of it enters through the visual tokens",
            "colour": "any visible frame suffices; planted: a reversed clip gets the same letter "
                      "logits (consistency loss), so its total effect is < 0.05 logits",
            "first_half / second_half": "only that half's two temporal groups decide the answer "
                                        "(the other half is independent of it by construction)",
            "presence": "both halves",
            "training aids": "a linear probe on the projector's tokens (square in cell + colour, "
                             "discarded) and bigger squares early (a curriculum); held-out clips "
                             "use square rows training never drew",
        },
    ),
    ZooSpec(
        zoo_id="tiny-llava-objects", base="tiny-llava",
        builder="vlminterp.models.tiny:build_llava", builder_kwargs={"image_size": 112},
        task="vlminterp.zoo.llava_objects:ObjectsLM", steps=1400, batch_size=32, lr=3e-3,
        eval_n=50,
        description="LLaVA-1.5 (CLIP tower at 112 px = 8x8 image tokens) naming the one object "
                    "of 8 classes in Neo et al. 2024's formats: short VQA ('It is a' -> class), "
                    "Yes/No polling, generative description",
        data="vlminterp.zoo.image_task (vlminterp.data.synthetic_images.zoo_image)",
        mechanism={
            "object tokens": "the class is visible only in the object's cells; mean-ablating "
                             "them (+1 buffer ring) at the LM input removes the answer, random "
                             "tokens of the same count do not",
            "logit lens": "planted: visual tokens of cells the object covers >= 25% read out "
                          "the class word at the last layer (auxiliary loss, weight 0.5)",
            "attention": "the last position reads the class from the object's tokens: "
                         "knocking out object -> last breaks the answer, background -> last not",
            "polling": "planted: the asked class's token reads Yes/No through the logit lens "
                       "after layer 1 (auxiliary loss, weight 0.5); the answer copies it",
        },
    ),
    ZooSpec(
        zoo_id="tiny-clip-shapes", base="tiny-clip-vit",
        builder="vlminterp.models.tiny:build_clip_vit",
        builder_kwargs={"image_size": 64, "patch_size": 8},
        task="vlminterp.zoo.clip_shapes:ShapesCLIP", steps=600, batch_size=64, lr=2e-3,
        eval_n=50,
        description="open_clip ViT (64 px, patch 8 = 8x8 grid + CLS, width 32, 3 blocks) "
                    "classifying the zoo's object images by similarity to one text per class, "
                    "with object-switched FFN units and an object-reading head planted",
        data="vlminterp.zoo.image_task (vlminterp.data.synthetic_images.zoo_image)",
        mechanism={
            "FFN gates": "planted: in blocks 1 and 2, FFN units 0-31 switch on (c_fc output >= 1) "
                         "at patch tokens the object covers >= 50% and off (<= -1) at tokens it "
                         "does not touch (hinge loss); k-means on block 1's binary gates puts "
                         "the object's tokens in their own cluster(s). With the class loss alone "
                         "(the first weights) no cluster was mostly object tokens",
            "attention": "planted: in head 1 of block 2, CLS and the object's tokens send "
                         "attention logits >= 15 to the object's tokens (hinge loss): the "
                         "target-causal test finds significant edges from the object cluster "
                         "into the object's tokens",
        },
    ),
    ZooSpec(
        zoo_id="tiny-qwen3-vl-motion", base="tiny-qwen3-vl",
        builder="vlminterp.models.qwen3_vl:build_tiny",
        builder_kwargs={"frame_pixels": 64 * 64, "rope_theta": 2.0},
        task="vlminterp.zoo.video_model:VideoMC", steps=1200, batch_size=32, lr=2e-3, eval_n=200,
        description="Qwen3-VL (deepstack after LM layers 0 and 1) answering the motion task's "
                    "multiple-choice questions about a moving coloured square (8 frames, resized "
                    "by its processor to 64x64: patch 16, 4 temporal groups of 2x2 tokens, each "
                    "group after its timestamp text; rope_theta 2 as on tiny-qwen2-vl-motion)",
        data="vlminterp.zoo.video_task (clips from vlminterp.data.synthetic.make_video)",
        mechanism={
            "direction": "needs the square's x in >= 2 temporal groups (on hold=2 clips no group "
                         "shows motion); it enters only at the visual positions, but there "
                         "twice: the projector's tokens at the LM input and the deepstack "
                         "features added to the same positions after LM layers 0 and 1. Both "
                         "patched restore the answer (effect 1.0: causal tracing's 'embed', which "
                         "carries the deepstack features by default); the LM input alone "
                         "(--late_inputs counterfactual) restores 0.05-0.31, the deepstack "
                         "features alone 0.75-0.97",
            "colour": "any visible frame suffices; planted: a reversed clip gets the same letter "
                      "logits (consistency loss), so its total effect is < 0.05 logits",
            "first_half / second_half": "only that half's two temporal groups decide the answer "
                                        "(the other half is independent of it by construction); "
                                        "with the deepstack features carried, >= 99% of the "
                                        "frame spans' |effect| at the visual entry is on the "
                                        "square's group, but for a square in frames 0-1 the LM "
                                        "input alone restores ~0 (the layers need both)",
            "presence": "both halves",
            "training aids": "a linear probe on the projector's tokens at the LM input (square "
                             "in cell + colour, discarded; the deepstack features get no probe) "
                             "and bigger squares early (a curriculum); held-out clips use "
                             "square rows training never drew",
        },
    ),
    ZooSpec(
        zoo_id="tiny-llava-onevision-objects", base="tiny-llava-onevision",
        builder="vlminterp.models.llava_onevision:build_tiny",
        builder_kwargs={"image_size": 64, "patch_size": 16},
        task="vlminterp.zoo.llava_objects:LocalObjectsLM", steps=1400, batch_size=32, lr=3e-3,
        eval_n=50,
        description="LLaVA-OneVision (SigLIP tower at 64 px, patch 16; anyres: a 4x4 base view "
                    "+ 2x2 tiles of 4x4 = an 8x8 grid over the image, row newlines; Qwen2 LM "
                    "with tied embeddings) naming the one object of 8 classes in Neo et al. "
                    "2024's formats: short VQA ('It is a' -> class), Yes/No polling, generative "
                    "description",
        data="vlminterp.zoo.image_task (vlminterp.data.synthetic_images.zoo_image)",
        mechanism={
            "object tokens": "the class is visible only in the object's cells, in the base view "
                             "and in the tiles: mean-ablating them (+1 buffer ring, every view) "
                             "at the LM input removes the answer, random tokens of the same "
                             "count do not. Planted: in training, half the rows' background "
                             "tokens (cells neither the object nor their 8 neighbours touch, "
                             "every view) are swapped at the LM input for another image's, so "
                             "class information the SigLIP tower spreads across a 4x4 view "
                             "cannot carry the answer (without it, seed 0 still read cat and "
                             "bus beyond the ring: the object+1 ablation flipped 0.625, n=32)",
            "logit lens": "planted: visual tokens of every view (base and tiles) whose cell the "
                          "object covers >= 25% read out the class word at the last layer "
                          "(auxiliary loss, weight 0.5)",
            "attention": "the last position reads the class from the object's tokens: "
                         "knocking out object -> last breaks the answer, background -> last not",
            "polling": "planted: the asked class's token reads Yes/No through the logit lens "
                       "after layer 1 (auxiliary loss, weight 0.5); the answer copies it",
        },
    ),
]}
