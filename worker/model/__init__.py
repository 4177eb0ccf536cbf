"""Phi-3-vision in plain torch, with our own image path and processor.

`config` reads the official checkpoint files, `processor` turns a prompt and images into
token ids and pixel crops, `layers` (the Phi-3 decoder layer and CLIP, drop-ins for
transformers' classes), `vision` and `modeling` hold the network, `weights` finds and
loads the checkpoint; `kvcache`, `attention`, `model_runner` and `sampling` run batched
decoding steps (the scheduler that drives them is `worker.inference.scheduler`). Nothing
here loads a model or touches a device at import time. See docs/model.md.
"""
