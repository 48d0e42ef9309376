"""Text in: calibration text packed into rows (`text`), held-out documents by domain (`heldout`),
and the split of one corpus into calibration, search and confirmation documents (`split`).
"""
