"""sgfast: fast diffusion self-guidance (Epstein et al., NeurIPS 2023) for diffusers Stable Diffusion."""

from sgfast.notices import silence_known_notices

silence_known_notices()  # before diffusers is imported: its pipelines import transformers' image processors


from sgfast.edits import (  # noqa: E402
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
from sgfast.pipeline import SelfGuidanceOutput, SelfGuidancePipeline  # noqa: E402
from sgfast.mmdit_pipeline import MMDiTSelfGuidancePipeline  # noqa: E402  (SD3 / FLUX: from_pipe hands them to it)
from sgfast.trace import Trace  # noqa: E402

__version__ = "0.1.0"
