"""The steps of a run, in the order pipeline.run calls them: data.py (the reference filter; `prefopt data`),
train.py (each stage: kept, reused, resumed or trained), evaluate.py (the eval step; `prefopt eval`), merge.py (the
merge step; `prefopt merge RUN_DIR`). A step composes the modules below it and makes the run-level decisions."""
