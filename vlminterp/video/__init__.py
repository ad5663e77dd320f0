"""The video study: counterfactual clips, multiple-choice scoring, causal tracing over frames, and
Have-1 / Have-2 probes (originally on Qwen2-VL; here on every video family)."""
