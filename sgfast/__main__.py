"""Command line: `python -m sgfast demo|edit|serve|serve-ray|train`.

`demo` generates an image, moves and resizes an object and copies its appearance from a second
generation, says what each edit did as the scene reader sees it, and writes the images and a sheet of
attention maps and centroids; `edit` inverts a photo and moves or resizes its objects; `serve` runs
the HTTP server (`sgfast.serve`), `serve-ray` the same API on Ray
Serve, `train` trains the built-in model (`sgfast.shapes.train`). The web stack and Ray are imported
only when their command runs."""

import argparse
import math
import os
import sys
import time

import torch


def demo_guidance_scale(args):
    """--guidance-scale, else the built-in model's own: 2 for the MMDiT model (sgfast.shapes.mmdit), 5 else."""
    from sgfast.shapes.mmdit import GUIDANCE_SCALE, NAME

    if args.guidance_scale is not None:
        return args.guidance_scale
    return GUIDANCE_SCALE if args.model == NAME else 5.0


def demo_seed(args):
    """--seed, else the built-in model's demo seed: one whose circle has room to move left by 0.3 and
    to double (24 on the UNet model; 6 on the MMDiT model, sgfast.shapes.mmdit.DEMO_SEED)."""
    from sgfast.shapes.mmdit import DEMO_SEED, NAME

    if args.seed is not None:
        return args.seed
    return DEMO_SEED if args.model == NAME else 24


def check_demo_steps(sg, steps, edits):
    """Refuse a --steps of which the model's schedule for one of the demo's edits guides none (the
    built-in models' resize guides from step 5 to 80% of the steps), saying how many it needs."""
    from sgfast.sampler import resolve_schedule
    from sgfast.settings import kind_of

    def guided(edit, count):
        return any(resolve_schedule(sg.settings.resolve([[edit]], count)[1][2], count))

    for edit in edits:
        if not guided(edit, steps):
            fewest = next((n for n in range(steps + 1, 1001) if guided(edit, n)), None)
            needed = f"use --steps {fewest} or more" if fewest else "its schedule guides no step count up to 1000"
            raise SystemExit(f"--steps {steps}: the model's {kind_of(type(edit))} settings guide none of the {steps} steps; {needed}")


def demo(args):
    from sgfast import SelfGuidancePipeline, copy_appearance, move, resize
    from sgfast.edits import content_words, phrase_of
    from sgfast.shapes import load_pipeline
    from sgfast.shapes.scenes import describe_changes, describe_scene, read_edit
    from sgfast.sheet import sheet
    from sgfast.trace import PromptWords

    pipe, name = load_pipeline(args.model)
    # Bare calls: the model's own guidance settings (its folder's self_guidance.json) are the defaults.
    try:
        sg = SelfGuidancePipeline.from_pipe(pipe)
    except TypeError as error:  # a pipeline family this build does not wrap
        raise SystemExit(f"{name}: {error}") from None
    settings = dict(num_inference_steps=args.steps, guidance_scale=demo_guidance_scale(args))
    seed = demo_seed(args)
    if args.weight is not None:
        settings["self_guidance_scale"] = args.weight
    print(f"model: {name}\nprompt: {args.prompt!r}")
    start = time.perf_counter()
    original = sg(args.prompt, generator=torch.Generator().manual_seed(seed), **settings)
    source = sg(args.source_prompt, generator=torch.Generator().manual_seed(args.source_seed), **settings)
    # Copy appearance as the paper composes it: the target prompt names the object but not its look
    # ("a circle and a blue square"), so that no word of it contradicts the source.
    words_ = PromptWords.from_tokenizer(pipe.tokenizer, args.prompt).words
    open_prompt = args.appearance_prompt or " ".join(
        w for w in words_ if w == args.appearance_word or w not in phrase_of(words_, args.appearance_word))
    open_original = sg(open_prompt, generator=torch.Generator().manual_seed(seed), **settings)
    edits = {
        "move": (f"move {args.move_word} by dx={args.dx:+}", args.prompt, original, move(args.move_word, dx=args.dx)),
        "resize": (f"resize {args.resize_word} x{args.scale}", args.prompt, original, resize(args.resize_word, args.scale)),
        "appearance": (f"copy appearance of {args.appearance_word} from {args.source_prompt!r}", open_prompt, open_original,
                       copy_appearance(args.appearance_word, source.trace)),
    }
    check_demo_steps(sg, args.steps, [edit for *_, edit in edits.values()])  # before anything is written
    os.makedirs(args.out, exist_ok=True)
    rows = [("original", original.images[0], original.trace)]
    written = [os.path.join(args.out, name_) for name_ in ("original.png", "source.png", "appearance_unedited.png")]
    for path, image in zip(written, (original, source, open_original)):
        image.images[0].save(path)
    for name_, (title, prompt, unedited, edit) in edits.items():
        # The unedited generation's trace is reused: its pass is not run again.
        out = sg(prompt, edits=[edit], trace=unedited.trace, **settings)
        path = os.path.join(args.out, name_ + ".png")
        out.images[0].save(path)
        written.append(path)
        # A scene of the built-in model: say what the edit did to every object, as the reader sees it,
        # and what it did besides what it asked (the moved object's size, the resized one's place).
        for line in describe_changes(args.prompt, original.images[0], out.images[0]) if prompt == args.prompt else []:
            print(f"{title}: {line}")
        word = {"move": args.move_word, "resize": args.resize_word}.get(name_)
        change = read_edit(args.prompt, word, original.images[0], out.images[0]) if word else None
        if change is not None:
            print(f"{title}: {side_effects(name_, change, args)}")
        if prompt != args.prompt and describe_changes(args.prompt, original.images[0], original.images[0]):
            print(f"{title} into {prompt!r}: unedited, reads {describe_scene(unedited.images[0])}; "
                  f"edited, reads {describe_scene(out.images[0])}")
        # Read the edited image's maps back the paper's way (noise it, run the denoiser, record); a
        # family without trace_image shows the maps its edited generation itself recorded, where its
        # prompt is the sheet's.
        try:
            rows.append((title, out.images[0], sg.trace_image(out.images[0], args.prompt, args.steps, torch.Generator().manual_seed(0))))
        except NotImplementedError:
            if prompt == args.prompt:
                rows.append((title, out.images[0], out.trace))
    # The edited words first, then the prompt's other content words (so a held object's map shows too).
    prompt_words = PromptWords.from_tokenizer(pipe.tokenizer, args.prompt).words
    words = list(dict.fromkeys([args.move_word, args.resize_word] + content_words(prompt_words)))
    written.append(sheet(rows, words, os.path.join(args.out, "sheet.png")))
    print(f"done in {time.perf_counter() - start:.1f} s; wrote:")
    for path in written:
        print("  " + path)


def side_effects(kind, change, args):
    """One line: how far a move landed from its target and the moved object's area, or a resize's
    area and centroid drift, then every other object's IoU and colour shift (`read_edit`)."""
    edited = change["object"]
    if edited is None:
        return "the edited object is not read in the edited image"
    if kind == "move":
        off = math.hypot(edited["dx"] - args.dx, edited["dy"])
        said = f"lands {off:.2f} from its target, its area x{edited['area']:.2f}"
    else:
        said = f"area x{edited['area']:.2f} (x{args.scale:g} asked), centroid drift {math.hypot(edited['dx'], edited['dy']):.2f}"
    others = [f"{name} " + ("gone" if o is None else f"IoU {o['iou']:.2f}, colour shift {o['colour']:.0f}")
              for name, o in change["others"].items()]
    return "; ".join([said] + others)


def parse_pairs(values, flag, count):
    """["cup:-0.2,0", ...] -> [("cup", (-0.2, 0.0)), ...]; a malformed value is an error naming the form."""
    parsed = []
    for value in values or []:
        word, _, numbers = value.partition(":")
        try:
            numbers = tuple(float(n) for n in numbers.split(","))
        except ValueError:
            numbers = ()
        if not word or len(numbers) != count:
            form = "WORD:DX,DY" if count == 2 else "WORD:SCALE"
            raise SystemExit(f"{flag} takes {form}, got {value!r}")
        parsed.append((word, numbers))
    return parsed


def edit(args):
    import PIL.Image

    from sgfast import SelfGuidancePipeline, move, resize
    from sgfast.edits import content_words
    from sgfast.invert import edit_arguments
    from sgfast.shapes import load_pipeline
    from sgfast.sheet import sheet

    moves, resizes = parse_pairs(args.move, "--move", 2), parse_pairs(args.resize, "--resize", 1)
    if not moves and not resizes:
        raise SystemExit("edit needs at least one --move WORD:DX,DY or --resize WORD:SCALE")
    try:
        photo = PIL.Image.open(args.photo)
        photo.load()
    except (OSError, ValueError) as error:
        raise SystemExit(f"cannot read the photo {args.photo!r}: {error}")
    pipe, name = load_pipeline(args.model)
    sg = SelfGuidancePipeline.from_pipe(pipe)
    # Weights, keep terms and guidance: the model's own settings (its self_guidance.json), else the paper's.
    edits = [move(w, dx=dx, dy=dy) for w, (dx, dy) in moves] + [resize(w, s) for w, (s,) in resizes]
    inverted = sg.invert(photo.convert("RGB"), args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
    print(f"model: {name}; reconstruction PSNR {inverted.inversion['psnr']:.1f} dB (the VAE alone: {inverted.inversion['vae_psnr']:.1f} dB)")
    out = sg(args.prompt, edits=edits, trace=inverted, **edit_arguments(inverted, args.strength, edits=edits))
    out.images[0].save(args.out)
    # The edited image's maps read back the paper's way, next to the photo's own.
    seen = sg.trace_image(out.images[0], args.prompt, args.steps, torch.Generator().manual_seed(0))
    words = list(dict.fromkeys([w for w, _ in moves + resizes] + content_words(sg.words(args.prompt))))
    sheet_path = os.path.splitext(args.out)[0] + "_sheet.png"
    sheet([("photo (inverted)", photo, inverted), ("edited", out.images[0], seen)], words, sheet_path)
    print(f"wrote {args.out} and {sheet_path}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sgfast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    d = commands.add_parser("demo", help="generate, move, resize and copy appearance; write images and an attention sheet")
    d.add_argument("--model", default="default", help='"default", "tiny", or a local diffusers pipeline folder')
    d.add_argument("--prompt", default="a red circle and a blue square")
    d.add_argument("--move-word", default="circle")
    d.add_argument("--dx", type=float, default=-0.3, help="horizontal move, image fractions (negative: left)")
    d.add_argument("--resize-word", default="circle")
    d.add_argument("--scale", type=float, default=2.0)
    d.add_argument("--appearance-word", default="circle")
    d.add_argument("--source-prompt", default="a green circle", help="the second generation whose appearance is copied")
    d.add_argument("--source-seed", type=int, default=1)
    d.add_argument("--appearance-prompt", default=None,
                   help="the prompt whose object takes the appearance (default: --prompt without the words describing it)")
    d.add_argument("--weight", type=float, default=None, help="self-guidance scale v (default: the model's own settings per edit)")
    d.add_argument("--steps", type=int, default=25)
    d.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: 5; the MMDiT model's 2)")
    d.add_argument("--seed", type=int, default=None,
                   help="default: the model's demo seed (24; the MMDiT model's 6), whose circle has room to move left by 0.3 and to double")
    d.add_argument("--out", default=os.path.join("outputs", "demo"))
    d.set_defaults(run=demo)
    e = commands.add_parser("edit", help="invert a photo, move or resize its objects; write the image and an attention sheet")
    e.add_argument("photo", help="the photo (PNG/JPEG, RGB, sides multiples of 8)")
    e.add_argument("--prompt", required=True, help="what the photo shows; edits name its words")
    e.add_argument("--move", action="append", metavar="WORD:DX,DY", help="move WORD by (DX, DY) image fractions (repeatable)")
    e.add_argument("--resize", action="append", metavar="WORD:SCALE", help="scale WORD's area by SCALE (repeatable)")
    e.add_argument("--strength", type=float, default=None, help="share of the steps that edit (as image-to-image's; lower changes less); default: the model's photo setting")
    e.add_argument("--model", default="default", help='"default", "tiny", or a local diffusers pipeline folder (DDIM scheduler)')
    e.add_argument("--steps", type=int, default=25)
    e.add_argument("--guidance-scale", type=float, default=5.0)
    e.add_argument("--out", default="edited.png", help="the edited image; the sheet goes beside it as NAME_sheet.png")
    e.set_defaults(run=edit)
    from sgfast.serve.cli import add_arguments as add_serve_arguments, serve

    s = commands.add_parser("serve", help="HTTP server: POST /v1/images with edits and a time budget; /metrics, /healthz, a page at /")
    add_serve_arguments(s)
    s.set_defaults(run=serve)
    # These two parse their own flags (`python -m sgfast train --help`): the rest of the line goes to them.
    for name, run, help in (
        ("serve-ray", serve_ray, "the serve command's API on Ray Serve, one replica per GPU (the ray extra)"),
        ("train", train, "train the built-in model on synthetic shape scenes (CPU, resumable)"),
    ):
        commands.add_parser(name, help=help, add_help=False).set_defaults(run=run, forward=True)
    args, rest = parser.parse_known_args(argv)
    if not getattr(args, "forward", False):
        args = parser.parse_args(argv)  # unknown flags of demo/serve are errors
    else:
        args.rest = rest
    args.run(args)


def serve_ray(args):
    try:
        import ray  # noqa: F401
    except ImportError:
        sys.exit("serve-ray needs the ray extra: pip install -e '.[ray]'")
    from sgfast.serve.ray_serve import main

    main(args.rest)


def train(args):
    # `--family sd3` trains the built-in MMDiT model (sgfast.shapes.train_mmdit, its own flags);
    # the default, the built-in UNet model.
    family = argparse.ArgumentParser(add_help=False)
    family.add_argument("--family", default="unet")
    if family.parse_known_args(args.rest)[0].family == "sd3":
        from sgfast.shapes.train_mmdit import main
    else:
        from sgfast.shapes.train import main
    main(args.rest)


if __name__ == "__main__":
    main()
