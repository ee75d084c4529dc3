"""Evaluation before the merge.

run.py evaluates a run's adapters and writes its eval log (`evaluate_run`, `judge_again`, `describe`); heldout.py
the held-out metrics, mmlu.py MMLU through lm-evaluation-harness, completions.py the completions side by side,
log.py the eval log's parts and gates, card.py the merged model's card.
"""
