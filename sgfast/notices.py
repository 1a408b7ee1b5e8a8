"""Third-party notices sgfast silences, each with the reason we decided to ignore it.

Installed when sgfast is imported. Only these exact notices go; every other warning of transformers or
diffusers still reaches the user.
"""

import logging

# (logger, text the message contains), each after the reason it is silenced
SILENCED = (
    (
        # diffusers' pipeline modules import CLIPImageProcessor (and Siglip's) for the safety checker's
        # feature extractor, which sgfast never runs; the PIL fallback is the right one on a machine with
        # the CPU build of torch, beside which PyPI's torchvision cannot be installed.
        "transformers.utils.import_utils",
        "requires torchvision (not installed); falling back to",
    ),
)


class _DropNotice(logging.Filter):
    def __init__(self, text):
        super().__init__()
        self.text = text

    def filter(self, record):
        return self.text not in record.getMessage()


def silence_known_notices():
    """Adds the filters once (idempotent: importing sgfast twice adds nothing)."""
    for name, text in SILENCED:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) and f.text == text for f in logger.filters):
            logger.addFilter(_DropNotice(text))
