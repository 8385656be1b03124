"""Silence, by exact message, the warnings every run printed that are not the user's business.

By logger name and message pattern only, so nothing is imported and every other warning still shows:
DeepSpeed's engine asks its LR scheduler for the LR before the first step, and DeepSpeed's comm layer
calls torch's deprecated ``all_gather_into_tensor``.
"""
from __future__ import annotations

import logging
import warnings

DEEPSPEED_LOGGER = "DeepSpeed"  # deepspeed.utils.logger
DROPPED = ("Attempting to get learning rate from scheduler before it has started",)


class DropMessages(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes``; lets every other one through."""

    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def silence_known_noise() -> None:
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    logger = logging.getLogger(DEEPSPEED_LOGGER)
    if not any(isinstance(f, DropMessages) for f in logger.filters):
        logger.addFilter(DropMessages(DROPPED))
