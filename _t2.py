import torch, time, numpy as np
from sgfast import SelfGuidancePipeline, move
from sgfast.testing import tiny_sd3_pipeline, tiny_flux_pipeline
for name, pipe, kw in [("sd3", tiny_sd3_pipeline(), {}), ("sd35m", tiny_sd3_pipeline(variant="sd35-medium"), {}), ("flux", tiny_flux_pipeline(), dict(height=64,width=64))]:
    sg = SelfGuidancePipeline.from_pipe(pipe)
    print(type(sg).__name__, sg.layers, sg.feature_layer, sg.words("a red circle and a blue square"))
    a = pipe("a red circle and a blue square", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np", **kw).images
    t0=time.time()
    out = sg("a red circle and a blue square", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np", **kw)
    print(name, "equal", np.array_equal(a, out.images), time.time()-t0, type(out.trace).__name__, len(out.trace.calls))
    t0=time.time()
    e = sg("a red circle and a blue square", [move("circle", dx=0.25)], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np", **kw)
    print(name, "edited differs", not np.array_equal(a, e.images), e.energies, time.time()-t0)
    z = sg("a red circle and a blue square", [move("circle", dx=0.25)], self_guidance_scale=0, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np", **kw)
    print(name, "zero scale equal", np.array_equal(a, z.images), z.energies)
