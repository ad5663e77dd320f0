"""Neo et al. 2024 (arXiv 2410.07149): what the three ``recipes.neo2024_*`` programs share.

"Towards Interpreting Visual Information Processing in Vision-Language Models" asks where
LLaVA keeps object information: mean-ablating the visual tokens at the object's place in the
LM input breaks identification; the logit lens shows visual tokens turning into words of the
object late in the LM; blocking attention from object tokens to the last position in middle
to late layers hurts the answer. Everything here speaks standard names, layouts and
`VLM.prepare`, so it runs on every image family (LLaVA-1.5, the original's, and tiled ones:
LLaVA-NeXT, InternVL, SmolVLM, ...) with no per-family branch.

- `prompts`: the tasks as `Prompt` (question, answer prefix) put into each family's own format
  by `VLM.prepare` (``USER: <image>\\n{question} ASSISTANT: It is a`` on LLaVA-1.5, a chat
  template elsewhere, PaliGemma's prefix + reply), and `score`: one forward, argmax at the last
  position, correct when the object's first token (as it follows the prompt) starts with the
  decoded argmax token.
- `subsets`: token subsets as indices into the row's visual tokens (``layout.visual``: the
  patch tokens of every view), so one subset serves prompts of any length; the object's cells
  in every view with a pixel geometry; integrated gradients at the LM input.
- `ablation`: mean ablation at the LM input (what ``vlm.layers[0]`` reads, the projected image
  features merged in) with `vlminterp.interventions.ablate`.
- `knockout`: attention knockout per batch row with
  `vlminterp.interventions.knockout_attention_rows`.
- `lens`: the logit lens at every layer and position, heatmaps and the HTML view.
- `summaries`: per-condition rates and means with bootstrap intervals, and plots.
- `cli`: the recipes' shared flags, data loading and resumable per-image loop.
"""

from vlminterp.neo2024.ablation import (ablated_generate, ablated_logits, dataset_mean,
                                        lm_input_visual, object_ablation, run_task)
from vlminterp.neo2024.cli import (add_common_args, add_questions_arg, check_args, load_model,
                                   load_samples, run_info, run_samples)
from vlminterp.neo2024.knockout import (PAIRS, attention_knockout, knockout_blocks, knockout_layers,
                                        knockout_logits, knockout_sets, last_view, layer_groups,
                                        layer_sets, sliding_windows)
from vlminterp.neo2024.lens import (lens_figures, lens_image, lens_view, logit_lens_topk,
                                    shown_view, word_token_ids, write_lens_html)
from vlminterp.neo2024.prompts import (ANSWER_PREFIX, TASKS, Prompt, Task, answer_id,
                                       batch_inputs, reply_separator,
                                       first_token_match, load_questions, names_object,
                                       prompt_inputs, question_for, score,
                                       task_inputs, token_text, vqa_task)
from vlminterp.neo2024.subsets import (integrated_gradients, object_indices, random_indices,
                                       register_indices, subset_sizes, top_indices)
from vlminterp.neo2024.summaries import (mean_ci, plot_ablation, plot_knockout, plot_lens, rate,
                                         summarize_ablation, summarize_knockout, summarize_lens)

__all__ = [
    "ablated_generate", "ablated_logits", "add_common_args", "add_questions_arg", "answer_id",
    "ANSWER_PREFIX", "attention_knockout", "batch_inputs", "check_args", "dataset_mean",
    "first_token_match", "integrated_gradients", "knockout_blocks", "knockout_layers",
    "knockout_logits", "knockout_sets", "last_view", "layer_groups", "layer_sets",
    "lens_figures", "lens_image", "lens_view", "lm_input_visual", "load_model",
    "load_questions", "load_samples", "logit_lens_topk", "mean_ci", "names_object",
    "object_ablation", "object_indices", "PAIRS", "plot_ablation", "plot_knockout", "plot_lens",
    "Prompt", "prompt_inputs", "question_for", "random_indices", "rate", "register_indices",
    "reply_separator", "run_info", "run_samples", "run_task", "score", "shown_view",
    "sliding_windows", "subset_sizes", "summarize_ablation", "summarize_knockout",
    "summarize_lens", "Task", "task_inputs", "TASKS", "token_text", "top_indices", "vqa_task",
    "word_token_ids", "write_lens_html",
]
