"""A1111's prompt language, torch-free: composable AND parts, prompt editing over the steps,
emphasis weights (see `parse`)."""

from .parse import explain, old_timeline_differs, parse_attention, prompt_problem, prompt_schedule, split_and

__all__ = ["explain", "old_timeline_differs", "parse_attention", "prompt_problem", "prompt_schedule", "split_and"]
