"""Quality gate of the built-in model: does it draw what the caption says?

    python -m benchmarks.quality_gate --seeds 100
    python -m benchmarks.quality_gate --seeds 40 --guidance 3,5,7.5     # compare guidance scales
    python -m benchmarks.quality_gate --seeds 100 --model default-mmdit   # the built-in MMDiT model

Captions come from held-out scenes (`sgfast.shapes.scenes.make_scene(HELDOUT_SEED + k)`, a seed family
that training never draws from). Each is generated with the model (its own scheduler), the image is read
back with the scene reader (colour segmentation + connected components + shape classification), and
an image passes when it holds exactly the captioned objects: the right colours, the right count.
Shapes are reported too. Writes `<out>/gate.json` and a PNG sheet of samples with their captions,
marked OK / FAIL. The target is a pass rate of at least 90%.
"""

import argparse
import json
import os
import time
from collections import Counter

import numpy as np
import torch

TARGET = 0.90


class AttentionRecorder:
    """Sums, over the denoising steps, the head-averaged cross-attention probabilities of the
    conditional half of the batch in the UNet's decoder cross-attention layers."""

    def __init__(self, unet):
        self.unet = unet
        self.original = unet.attn_processors
        self.sums = {}
        processors = {}
        for name, proc in self.original.items():
            if name.startswith("up_blocks.") and ".attn2." in name:
                processors[name] = self._wrap(name, proc)
            else:
                processors[name] = proc
        unet.set_attn_processor(processors)

    def _wrap(self, name, inner):
        def processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
            if encoder_hidden_states is not None:
                q = attn.head_to_batch_dim(attn.to_q(hidden_states))
                k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
                probs = attn.get_attention_scores(q, k, None)  # (batch * heads, Q, K)
                probs = probs.view(-1, attn.heads, *probs.shape[1:]).mean(1)
                probs = probs[-self.batch :]  # the conditional rows (the second half under CFG)
                self.sums[name] = self.sums.get(name, 0) + probs.detach().float()
            return inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)

        return processor

    def reset(self, batch):
        """Start a call of `batch` prompts (with CFG the pipeline doubles it: [uncond; cond])."""
        self.sums, self.batch = {}, batch

    def centroids(self, token_index):
        """(batch, 2) centroid (x, y) of each image's map for `token_index[b]`, pixel centres in
        [0, 1], the mean over layers of each layer's step-summed map's centroid."""
        out = []
        for probs in self.sums.values():
            side = int(round(probs.shape[1] ** 0.5))
            maps = probs[torch.arange(probs.shape[0]), :, token_index].view(-1, side, side)
            coords = (torch.arange(side, dtype=torch.float32) + 0.5) / side
            mass = maps.sum((1, 2))
            x = (maps.sum(1) * coords).sum(1) / mass
            y = (maps.sum(2) * coords).sum(1) / mass
            out.append(torch.stack([x, y], 1))
        return torch.stack(out).mean(0)

    def restore(self):
        self.unet.set_attn_processor(self.original)


class JointAttentionRecorder(AttentionRecorder):
    """The same for an SD3 transformer, in every block: the head-averaged joint-attention
    probabilities of image queries at the CLIP text keys (the first `text_positions` text tokens),
    as the MMDiT's training records them (`sgfast.shapes.train_mmdit.JointAttentionRecorder`, which
    also computes the block's output)."""

    def __init__(self, transformer, text_positions):
        from sgfast.shapes.train_mmdit import JointAttentionRecorder as Recorder

        self.unet = transformer
        self.original = transformer.attn_processors
        self.text_positions = text_positions
        self.sums = {}
        self.store = {"active": True, "maps": [], "multiplicity": 1}
        recorder = Recorder(self.store)
        transformer.set_attn_processor({name: self._wrap(name, recorder) for name in self.original})

    def _wrap(self, name, recorder):
        def processor(attn, hidden_states, encoder_hidden_states=None, *args, **kw):
            out = recorder(attn, hidden_states, encoder_hidden_states, *args, **kw)
            probs = self.store["maps"].pop()[:, :, : self.text_positions]
            probs = probs[-self.batch :]  # the conditional rows (the second half under CFG)
            self.sums[name] = self.sums.get(name, 0) + probs.detach().float()
            return out

        return processor


def attention_recorder(pipe):
    if getattr(pipe, "transformer", None) is not None:
        return JointAttentionRecorder(pipe.transformer, pipe.tokenizer.model_max_length)
    return AttentionRecorder(pipe.unet)


def load_model(model):
    """(pipeline, folder) for --model: None (the shipped UNet model), "default-mmdit" (the shipped
    MMDiT model), or a local folder of either kind (by its model_index.json)."""
    from sgfast.shapes import default_model_path, load_default_pipeline
    from sgfast.shapes.mmdit import NAME, load_mmdit_pipeline, mmdit_model_path

    if model is None:
        return load_default_pipeline(), default_model_path()
    folder = mmdit_model_path() if model == NAME else model
    with open(os.path.join(folder, "model_index.json")) as f:
        kind = json.load(f).get("_class_name")
    if kind == "StableDiffusion3Pipeline":
        return load_mmdit_pipeline(folder), folder
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None), folder


def evaluate(pipe, seeds, steps, guidance_scale, first=0, batch=16):
    """Generate the held-out captions, read the images back, and check where each object's colour
    word attends against where the object was drawn."""
    from sgfast.shapes import scenes

    held_out = [scenes.make_scene(scenes.HELDOUT_SEED + k) for k in range(first, first + seeds)]
    captions = [s.caption for s in held_out]
    recorder = attention_recorder(pipe)
    images, read, ok, attention_errors, attention_right = [], [], [], [], []
    start = time.perf_counter()
    try:
        for begin in range(0, len(captions), batch):
            chunk = captions[begin : begin + batch]
            recorder.reset(len(chunk))
            out = pipe(
                chunk, height=scenes.SIZE, width=scenes.SIZE, num_inference_steps=steps,
                guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(begin), output_type="np",
            ).images
            chunk_images = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
            chunk_read = [scenes.read_scene(im) for im in chunk_images]
            chunk_ok = [scenes.matches_caption(r, c) for r, c in zip(chunk_read, chunk)]
            # Attention check on the images that hold exactly their captioned objects.
            ids = pipe.tokenizer(chunk, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True).input_ids
            for slot in range(scenes.MAX_OBJECTS):
                token_index, rows = [], []
                for b, (cap, good) in enumerate(zip(chunk, chunk_ok)):
                    wanted = scenes.parse_caption(cap)
                    if good and len(wanted) > 1 and slot < len(wanted):
                        word_id = pipe.tokenizer.convert_tokens_to_ids(wanted[slot][0] + "</w>")
                        token_index.append(ids[b].index(word_id))
                        rows.append(b)
                if not rows:
                    continue
                full = torch.zeros(len(chunk), dtype=torch.long)
                full[rows] = torch.tensor(token_index)
                cents = recorder.centroids(full)[rows]
                for b, c in zip(rows, cents.tolist()):
                    colour = scenes.parse_caption(chunk[b])[slot][0]
                    objs = {o.colour: o for o in chunk_read[b]}
                    err = float(np.hypot(c[0] - objs[colour].centroid[0], c[1] - objs[colour].centroid[1]))
                    nearest = min(objs.values(), key=lambda o: np.hypot(c[0] - o.centroid[0], c[1] - o.centroid[1]))
                    attention_errors.append(err)
                    attention_right.append(nearest.colour == colour)
            images.append(chunk_images)
            read += chunk_read
            ok += chunk_ok
    finally:
        recorder.restore()
    seconds = time.perf_counter() - start
    images = np.concatenate(images)
    shapes_ok = [scenes.matches_caption(r, c, check_shapes=True) for r, c in zip(read, captions)]
    by_count, failures = {}, Counter()
    for cap, r, good in zip(captions, read, ok):
        wanted = scenes.parse_caption(cap)
        n = len(wanted)
        hits, total = by_count.get(n, (0, 0))
        by_count[n] = (hits + good, total + 1)
        if not good:
            want, got = Counter(c for c, _ in wanted), Counter(o.colour for o in r)
            if want - got:
                failures["missing object"] += 1  # a captioned colour absent
            if got - want:
                failures["extra object"] += 1  # an uncaptioned colour, or a captioned one twice
    return dict(
        guidance_scale=guidance_scale,
        steps=steps,
        images=len(captions),
        rate=float(np.mean(ok)),
        rate_with_shapes=float(np.mean(shapes_ok)),
        by_count={str(n): dict(rate=h / t, images=t) for n, (h, t) in sorted(by_count.items())},
        failures=dict(failures),
        # Colour word's cross-attention centroid vs the drawn object's centroid (image fractions),
        # over the objects of passing images with two or three objects; "right" = the nearest object
        # to the centroid is its own.
        attention_centroid_error_median=float(np.median(attention_errors)) if attention_errors else None,
        attention_nearest_object_right=float(np.mean(attention_right)) if attention_right else None,
        attention_objects=len(attention_errors),
        seconds=round(seconds, 1),
    ), (images, captions, ok)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=100, help="number of held-out captions")
    p.add_argument("--first", type=int, default=0, help="first held-out scene index")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", default="3.0", help="guidance scale, or a comma-separated list to compare")
    p.add_argument("--model", default=None,
                   help='a local pipeline folder (StableDiffusionPipeline or StableDiffusion3Pipeline), or "default-mmdit" '
                        "(default: the shipped UNet model)")
    p.add_argument("--out", default=os.path.join("outputs", "quality_gate"))
    p.add_argument("--sheet", type=int, default=32, help="samples in the PNG sheet")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--strict", action="store_true", help="exit 1 when the rate is below the target")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from sgfast.shapes import scenes

    pipe, where = load_model(args.model)
    pipe.set_progress_bar_config(disable=True)
    info_path = os.path.join(where, "training.json")
    trained = json.load(open(info_path)) if os.path.exists(info_path) else {}
    os.makedirs(args.out, exist_ok=True)

    results = []
    for g in [float(x) for x in args.guidance.split(",")]:
        result, (images, captions, ok) = evaluate(pipe, args.seeds, args.steps, g, args.first)
        results.append(result)
        sheet_path = os.path.join(args.out, f"samples_g{g:g}.png")
        scenes.caption_sheet(images[: args.sheet], captions[: args.sheet], ok[: args.sheet]).save(sheet_path)
        counts = ", ".join(f"{n} object(s) {v['rate']:.0%} of {v['images']}" for n, v in result["by_count"].items())
        print(
            f"guidance {g:g}, {args.steps} {type(pipe.scheduler).__name__} steps: {sum(ok)}/{len(ok)} = {result['rate']:.1%} right colours and count "
            f"({result['rate_with_shapes']:.1%} with shapes); {counts}; failures {result['failures']}; "
            f"attention: colour word's map centroid to its object median {result['attention_centroid_error_median']}, "
            f"nearest object is its own {result['attention_nearest_object_right']} "
            f"({result['attention_objects']} objects); "
            f"{result['seconds']} s; sheet {sheet_path}",
            flush=True,
        )
    best = max(results, key=lambda r: r["rate"])
    summary = dict(
        model=where, model_step=trained.get("step"), model_exported=trained.get("exported"), target=TARGET,
        passed=best["rate"] >= TARGET, best=best, results=results,
    )
    with open(os.path.join(args.out, "gate.json"), "w") as f:
        json.dump(summary, f, indent=1)
    verdict = "PASS" if summary["passed"] else "BELOW TARGET"
    print(
        f"{verdict}: {best['rate']:.1%} (target {TARGET:.0%}) at guidance {best['guidance_scale']:g}; "
        f"model step {trained.get('step')} exported {trained.get('exported')}"
    )
    if args.strict and not summary["passed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
