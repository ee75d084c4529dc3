"""Merging the final adapter into its base, and proving the merged model behaves like the adapter model.

`stream.py` merges tensor by tensor (DoRA magnitude included) into safetensors shards; `verify.py` compares the
merged model's logits with the adapter model's on probe prompts.
"""
