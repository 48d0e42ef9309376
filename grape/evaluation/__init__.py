"""The evaluation stage: NLL and perplexity per domain on held-out documents (`perplexity`),
lm-evaluation-harness tasks run offline (`lmeval_*`), standard errors by document (`stats`).
"""
