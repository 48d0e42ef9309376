"""The calibration stage: a model and calibration text in, a scores file out (per-expert
statistics, similarity, layer cost curves, the reconstruction order). `stage.calibrate_checkpoint`
is the one function every entry point calls; it runs the whole model (`calibrate`), layer by layer
(`sequential`) or under torchrun (`distributed`), and resumes (`resume`).
"""
