"""The search stage: candidate plans judged by their measured effect on held-out text.
`stage.run_search` is the one function every entry point calls; `algorithm` is the search itself,
`meter` and `sequential` measure candidates (whole model or one decoder layer at a time), `prefix`
shares the work plans have in common.
"""
