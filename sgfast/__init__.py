"""sgfast: fast diffusion self-guidance (Epstein et al., NeurIPS 2023) for diffusers Stable Diffusion."""

from sgfast.edits import (
    collage,
    copy_appearance,
    copy_layout,
    copy_shape,
    keep_appearance,
    keep_shape,
    move,
    place,
    resize,
    restyle,
)
from sgfast.pipeline import SelfGuidanceOutput, SelfGuidancePipeline
from sgfast.mmdit_pipeline import MMDiTSelfGuidancePipeline  # SD3 / FLUX: from_pipe hands them to it
from sgfast.trace import Trace

__version__ = "0.1.0"
