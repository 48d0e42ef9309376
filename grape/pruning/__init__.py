"""The apply stage: a plan made real. `stage.apply_checkpoint` is the one function every entry point
calls; `apply` edits a loaded model, `streaming` rewrites the shards without loading it,
`checkpoint` saves and reloads pruned models, `repair*` re-fits the kept experts afterwards.
"""
