"""The run folder and the shared store.

`folder.py` is the format of runs/<name>/ (its layout, run.json, atomic writes, what a finished stage or merge
looks like); `store.py` is the cache shared across run folders (finished stages, reference log-probs).
"""
