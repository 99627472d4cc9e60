"""Preference training (DPO, BPO) of vision-language models on ``transformers.Trainer``.

``losses`` holds the pure math; ``data`` turns records into token tensors; ``forward``
scores the chosen and the K rejected responses of each example against one shared
prompt; ``reference`` provides reference log-probs (frozen copy, adapters disabled, or a
cache on disk); ``trainer`` runs it all from a :class:`~mmsafe.train.config.TrainConfig`.
"""
