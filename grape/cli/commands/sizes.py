"""Sizes left unset on the command line and in a recipe: small on the embedded test-bed model (a
few minutes on a 2-core CPU), larger on a model of your own. `grape run` fills every one of
them; `grape search` its search passes, so that the same inputs give the plan `grape run` chose."""

SMALL = {"samples": 32, "seq_len": 256, "subsample": 256, "eval_tokens": 8192, "eval_seq_len": 256,
         "search_passes": 100}
LARGE = {"samples": 256, "seq_len": 2048, "subsample": 512, "eval_tokens": 65536, "eval_seq_len": 1024,
         "search_passes": 200}

__all__ = ["LARGE", "SMALL"]
