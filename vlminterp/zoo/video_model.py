"""Training and held-out scoring of a Qwen-family video model on the motion task.

Loss: cross-entropy over the whole vocabulary of the correct option letter at the last position
of the chat prompt (the token the study reads). Held-out accuracy: the argmax over the option
letters' logits at the last position, with the real processor and eager attention, as the
recipes score it.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from vlminterp.video.multiple_choice import LETTERS
from vlminterp.zoo import video_task
from vlminterp.zoo.speedups import check_same_function, fast_attention

JITTER = 24  # max shift of the square's RGB values in training (robustness to mp4 coding)
# Dense auxiliary loss on the LM input (the projector's visual tokens): a linear probe, trained
# with the model and discarded, reads from every visual token whether the square is in its cell
# during its temporal group, and its colour. A 14 px square is 1.6% of a frame: with the answer
# loss alone the loss stayed at chance for hundreds of steps.
AUX_WEIGHT = 1.0
# Colour must not depend on frame order: a reversed clip gets the same letter logits (squared
# difference, on a reversed copy of every colour item of a batch), so that tracing a colour
# question with the reverse counterfactual finds a total effect of ~0 (|TE| < 0.05 logits).
CONSISTENCY_WEIGHT = 30.0
CONSISTENCY_FROM = (0.4, 0.3)  # off until 40% of training, full from 70%: from the start it
# fought the answer loss while logits were still large and random (the loss spiked)


class VideoMC:
    """``batch(items)`` -> model inputs + targets; ``loss(model, rng, n)``; ``evaluate``.

    Generic over the Qwen video processors (Qwen2-VL, Qwen3-VL): patch size, merge size,
    temporal patch size and the resize factor come from the processor, prompt ids and token
    types from the family's own ``prepare`` (Qwen3-VL writes a timestamp before every temporal
    group, from the frames' rate), and `self_check` proves the fast batch equals it."""

    def __init__(self, model, processor):
        from vlminterp.models import VLM, family

        self.model, self.processor = model, processor
        # `prepare` and `layout` only: no nnsight envoy around the model that trains
        self.vlm = VLM(None, processor, family(model.config.model_type), "zoo-training",
                       torch_model=model)
        tok = processor.tokenizer
        self.letter_ids = [tok.encode(letter, add_special_tokens=False)[0] for letter in LETTERS[:4]]
        self._ids: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.aux = torch.nn.Linear(model.config.text_config.hidden_size, 1 + len(video_task.COLOURS))
        vp = processor.video_processor
        self.patch, self.merge, self.tpatch = vp.patch_size, vp.merge_size, vp.temporal_patch_size
        if self.tpatch != video_task.GROUP:
            raise ValueError(f"zoo: the motion task draws the square in groups of "
                             f"{video_task.GROUP} frames; this processor's temporal patch is "
                             f"{self.tpatch}")
        self._cap = self.vlm.family.video_kwargs.get("cap_pixels_per_frame", vp.cap_pixels_per_frame)
        # a patch row is laid out (channel, frame, y, x): channel = column // per_channel
        per_channel = self.tpatch * self.patch * self.patch
        mean, std = torch.tensor(vp.image_mean), torch.tensor(vp.image_std)
        self._scale = (1 / (255.0 * std)).repeat_interleave(per_channel)
        self._shift = (-mean / std).repeat_interleave(per_channel)

    def _prompt_ids(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The chat prompt's ids with the video placeholder expanded (timestamps included), and
        its token types, as the family's ``prepare`` makes them (cached per prompt)."""
        if prompt not in self._ids:
            dummy = np.zeros((video_task.NUM_FRAMES, video_task.SIZE, video_task.SIZE, 3), np.uint8)
            out = self.vlm.prepare(text=prompt, video=[dummy])
            self._ids[prompt] = (out["input_ids"][0], out["mm_token_type_ids"][0])
            self._grid = out["video_grid_thw"][0]
        return self._ids[prompt]

    def _pixels(self, clips: np.ndarray) -> torch.Tensor:
        """The video processor's resize, rescale + normalise and patchify, batched: its own
        ``resize`` on the uint8 frames, patchify, then one fused scale and shift per channel."""
        vp = self.processor.video_processor
        x = torch.from_numpy(clips).permute(0, 1, 4, 2, 3)
        x = vp.resize(x, size=vp.size, resample=vp.resample, factor=self.patch * self.merge,
                      temporal_factor=self.tpatch, cap_pixels_per_frame=self._cap)
        patches, *_ = vp.patchify(x, patch_size=self.patch, merge_size=self.merge,
                                  temporal_patch_size=self.tpatch)
        patches = patches.reshape(-1, patches.shape[-1])
        return patches.float().mul_(self._scale).add_(self._shift)

    def batch(self, items, rng=None, jitter: int = 0, reversed_of=()) -> tuple[dict, torch.Tensor,
                                                                          torch.Tensor]:
        """(inputs, target token ids, last real position per row) for training; after the rows
        of ``items`` come the items at indices ``reversed_of`` again, their clips reversed."""
        shifts = rng.integers(-jitter, jitter + 1, (len(items), 3)) if jitter else [None] * len(items)
        clips = [it.clip.frames(s) for it, s in zip(items, shifts)]
        clips = np.stack(clips + [clips[i][::-1] for i in reversed_of])
        items = list(items) + [items[i] for i in reversed_of]
        ids = [self._prompt_ids(it.prompt) for it in items]
        width = max(len(i) for i, _ in ids)
        pad = self.processor.tokenizer.pad_token_id
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask, types = torch.zeros_like(input_ids), torch.zeros_like(input_ids)
        for r, (row, kind) in enumerate(ids):
            input_ids[r, :len(row)], types[r, :len(row)], mask[r, :len(row)] = row, kind, 1
        pixels = self._pixels(clips)
        self.token_labels = self._token_labels(items, clips)
        inputs = {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": types,
                  "pixel_values_videos": pixels,
                  "video_grid_thw": self._grid.repeat(len(items), 1)}
        targets = torch.tensor([self.letter_ids[it.answer_index] for it in items])
        return inputs, targets, mask.sum(1) - 1

    def _token_labels(self, items, clips: np.ndarray) -> torch.Tensor:
        """[batch, visual tokens]: 0 where a token's cell holds no square during its group,
        else 1 + the colour index (tokens group-major, row-major within a group)."""
        _, gh, gw = (int(v) // self.merge for v in self._grid)  # merged tokens
        b, t, h, w, _ = clips.shape
        square = (clips != np.array(video_task.synthetic.BACKGROUND, np.uint8)).any(-1)
        cells = square.reshape(b, t // self.tpatch, self.tpatch, gh, h // gh, gw, w // gw)
        cells = cells.any(axis=(2, 4, 6))
        colour = np.array([1 + list(video_task.COLOURS).index(it.clip.colour) for it in items])
        return torch.from_numpy(cells.reshape(b, -1) * colour[:, None]).long()

    def self_check(self, rng: np.random.Generator) -> float:
        """Before training: the fast batch equals the family's ``prepare`` (the processor with
        the recipes' arguments) and `fast_attention` leaves the logits unchanged (max difference
        returned)."""
        items = video_task.train_items(rng, 2)
        inputs, _, _ = self.batch(items)
        ref = self.vlm.prepare(text=[it.prompt for it in items],
                               video=[it.clip.frames() for it in items])
        if set(ref) != set(inputs):
            raise RuntimeError(f"zoo: the fast batch has keys {sorted(inputs)}, the family's "
                               f"prepare {sorted(ref)}")
        if not torch.allclose(ref["pixel_values_videos"], inputs["pixel_values_videos"], atol=1e-5):
            raise RuntimeError("zoo: the fast pixel path differs from the video processor's output")
        for key in ("input_ids", "mm_token_type_ids", "attention_mask", "video_grid_thw"):
            if not torch.equal(ref[key], inputs[key]):  # both right-padded
                raise RuntimeError(f"zoo: the fast batch's {key} differs from the processor's")
        return check_same_function(self.model, inputs)

    def loss(self, rng: np.random.Generator, batch_size: int, progress: float = 1.0) -> torch.Tensor:
        items = video_task.train_items(rng, batch_size, progress)
        colour = [i for i, it in enumerate(items) if it.kind == "colour"]
        inputs, targets, last = self.batch(items, rng, JITTER, reversed_of=colour)
        out = self.model(**inputs, use_cache=False, output_hidden_states=True)
        answer = out.logits[torch.arange(len(last)), last].float()
        loss = F.cross_entropy(answer, targets)
        ramp = min(1.0, max(0.0, (progress - CONSISTENCY_FROM[0]) / CONSISTENCY_FROM[1]))
        if colour and ramp:  # the same letter logits for a clip and its reversal
            letters = answer[:, self.letter_ids]
            gap = (letters[colour] - letters[len(items):]).pow(2).mean()
            loss = loss + ramp * CONSISTENCY_WEIGHT * gap
        if not AUX_WEIGHT:
            return loss
        visual = inputs["mm_token_type_ids"] == 2
        tokens = out.hidden_states[0][visual].view(len(last), -1, out.hidden_states[0].shape[-1])
        aux = F.cross_entropy(self.aux(tokens.float()).flatten(0, 1), self.token_labels.flatten())
        return loss + AUX_WEIGHT * aux

    def extra_parameters(self):
        return list(self.aux.parameters())

    def fast(self):
        return fast_attention(self.model)


def evaluate(vlm, items, batch_size: int = 16) -> dict:
    """Per kind: accuracy and mean margin (correct letter minus best other) on ``items``, with
    ``vlm.prepare`` (the real processor) and the plain forward."""
    letters = [vlm.token_id(letter) for letter in LETTERS[:4]]
    hits, margins = defaultdict(list), defaultdict(list)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        inputs = vlm.prepare(text=[it.prompt for it in chunk], video=[it.clip.frames() for it in chunk])
        lay = vlm.layout(inputs)
        logits = vlm.forward(inputs).float()
        for r, it in enumerate(chunk):
            scores = logits[r, lay[r].last, letters[:len(it.candidates)]]
            others = torch.cat([scores[:it.answer_index], scores[it.answer_index + 1:]])
            hits[it.kind].append(int(scores.argmax()) == it.answer_index)
            margins[it.kind].append(float(scores[it.answer_index] - others.max()))
    return {kind: {"accuracy": float(np.mean(hits[kind])), "mean_margin": float(np.mean(margins[kind])),
                   "n": len(hits[kind])} for kind in hits}


def heldout(model, processor, base: str, *, seed: int, n: int) -> dict:
    """`evaluate` on `video_task.heldout_items` (``n`` per kind) through the `VLM` wrapper."""
    from vlminterp.models import family_of, wrap

    vlm = wrap(model, processor, base, family_of(base))
    return evaluate(vlm, video_task.heldout_items(seed, n))
