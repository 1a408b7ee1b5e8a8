"""The docs' charts, drawn from the tables the benchmark commands write into benchmarks/RESULTS.md:

- docs/img/cost.png: what guidance costs over a plain generation, sgfast against diffusers'
  Attend-and-Excite: FLOPs of a guided step on SD1.5 and SDXL (`python -m benchmarks.flops`), UNet
  passes per image and CPU time (`python -m benchmarks`), GPU time of a 50-step image (`make bench-gpu`);
- docs/img/serve_load.png: the serving benchmark's latency against offered load (`make bench-serve`
  writes the same plot from its JSON; this redraws it from the table).

Each bar is read from a table row named below, so a chart cannot show a figure RESULTS.md does not
hold. `python -m benchmarks.charts` (`make docs-charts`; `make bench` and `make bench-gpu` run it)."""

import argparse
import re
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parent.parent
SGFAST_ROW = "sgfast fast: move + keep shape + keep appearance"
PEER_ROW = "diffusers Attend-and-Excite"
COLOURS = {"sgfast": (33, 102, 172), "Attend-and-Excite": (214, 96, 77)}


# ---------------------------------------------------------------------------------------------------
# Reading RESULTS.md.
# ---------------------------------------------------------------------------------------------------


def section(text, heading):
    """The text from the line starting with `heading` to the next heading of the same or a higher level."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
    if start is None:
        raise KeyError(f"RESULTS.md has no section {heading!r}")
    level = len(heading) - len(heading.lstrip("#"))
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"#{1,%d} " % level, lines[i])), len(lines))
    return "\n".join(lines[start:end])


def tables(text):
    """Every Markdown table of `text`, as a list of {header: cell} rows."""
    found, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if len(block) > 2:
            header = block[0]
            found.append([dict(zip(header, row)) for row in block[2:]])
        block = []
    return found


def table_with(text, column, after=None):
    """The first table of `text` (after the line containing `after`) that has `column`."""
    if after is not None:
        text = text[text.index(after):]
    for rows in tables(text):
        if rows and column in rows[0]:
            return rows
    raise KeyError(f"no table with a column {column!r}")


def row(rows, first_cell):
    for r in rows:
        if next(iter(r.values())).startswith(first_cell):
            return r
    raise KeyError(f"no row {first_cell!r}")


def number(cell):
    """The first number of a cell ("2.776 (2.1-3.0)" -> 2.776; "+0.777" -> 0.777)."""
    match = re.search(r"\d+(?:\.\d+)?", cell.replace("**", ""))
    if match is None:
        raise ValueError(f"no number in {cell!r}")
    return float(match.group())


def unet_passes(cell):
    """Forward + backward passes of one image, from "103 / 83 / 70 (...)": forward / with grad / backward."""
    forward, _, backward = (number(part) for part in cell.split("(")[0].split("/"))
    return forward + backward


def cost_measures(text):
    """[(label, source, {method: ratio over plain})], each read from its benchmark's table."""
    measures = []
    flops = section(text, "## FLOPs on the real architectures")
    for arch, marker in (("SD1.5 512px", "SD15 UNet"), ("SDXL 1024px", "SDXL UNet")):
        rows = table_with(flops, "x plain", after=marker)
        measures.append((f"FLOPs of a guided step, {arch}", "python -m benchmarks.flops (meta device, exact)",
                         {"sgfast": number(row(rows, SGFAST_ROW)["x plain"]),
                          "Attend-and-Excite": number(row(rows, PEER_ROW + " guided step")["x plain"])}))
    speed = section(text, "## Speed, memory and FLOPs")
    cpu_header = next(line for line in speed.splitlines() if line.startswith("### CPU"))
    cpu = speed[speed.index(cpu_header):]
    default = cpu[cpu.index("**default**"):]
    costs = table_with(default, "per image: UNet fwd / with grad / backward")
    times = table_with(default, "guided / plain")
    plain_passes = unet_passes(row(costs, "diffusers plain")["per image: UNet fwd / with grad / backward"])
    measures.append(("UNet passes per image (forward + backward)", "python -m benchmarks, built-in model, 20 steps",
                     {name: unet_passes(row(costs, label)["per image: UNet fwd / with grad / backward"]) / plain_passes
                      for name, label in (("sgfast", SGFAST_ROW), ("Attend-and-Excite", PEER_ROW))}))
    when = re.search(r"\d{4}-\d\d-\d\d", cpu_header).group()
    machine = f"python -m benchmarks, built-in model, {when}, 2 shared CPU cores"
    measures.append(("CPU time of a guided step", machine,
                     {name: number(row(times, label)["guided / plain"]) for name, label in (("sgfast", SGFAST_ROW), ("Attend-and-Excite", PEER_ROW))}))
    measures.append(("CPU time of an image", machine,
                     {name: number(row(times, label)["image / plain image"]) for name, label in (("sgfast", SGFAST_ROW), ("Attend-and-Excite", PEER_ROW))}))
    gpu = section(text, "## GPU")
    when = re.search(r"\d{4}-\d\d-\d\d", gpu).group()
    device = re.search(r": (NVIDIA [^(,]+)", gpu).group(1).strip()
    images = table_with(gpu, "x plain", after="**sd15_image**")
    measures.append(("GPU time of a 50-step SD1.5 image", f"make bench-gpu, {device}, {when}",
                     {"sgfast": number(row(images, "sgfast fast: move + keep")["x plain"]),
                      "Attend-and-Excite": number(row(images, PEER_ROW)["x plain"])}))
    return measures


def serving_rows(text):
    """The serving table's rows as serve_plot.latency_plot takes them, and each model's SLO."""
    serving = section(text, "## Serving")
    slos = {r["model"]: number(r["SLO: p95 <= ms"]) for r in table_with(serving, "SLO: p95 <= ms")}
    rows = [{"model": r["model"], "scheduler": r["scheduler"], "rate": number(r["offered req/s"]),
             "summary": {"p95_ms": number(r["p95 ms"]), "p50_ms": number(r["p50 ms"])}}
            for r in table_with(serving, "p95 ms", after="| model | scheduler |")]
    return rows, slos


# ---------------------------------------------------------------------------------------------------
# Drawing.
# ---------------------------------------------------------------------------------------------------


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def cost_chart(measures, path, width=1100, bar=20, label_width=330):
    """Horizontal bars of each measure's ratio over plain (1.0 = a plain generation), per method."""
    title, small, font = _font(17), _font(12), _font(14)
    methods = list(COLOURS)
    group = 34 + len(methods) * (bar + 6) + 18
    height = 90 + group * len(measures) + 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((12, 10), "What guidance costs over a plain generation (x plain; lower is better)", fill="black", font=title)
    top = max(value for _, _, values in measures for value in values.values())
    plot = width - label_width - 110
    scale = plot / top
    x0, y = label_width, 60
    for label, source, values in measures:
        draw.text((12, y), label, fill="black", font=font)
        draw.text((12, y + 17), source, fill=(90, 90, 90), font=small)
        y += 34
        for method in methods:
            value = values[method]
            draw.text((x0 - 130, y + 3), method, fill="black", font=small)
            draw.rectangle([x0, y, x0 + int(value * scale), y + bar], fill=COLOURS[method])
            draw.text((x0 + int(value * scale) + 6, y + 3), f"x{value:.2f}", fill="black", font=font)
            y += bar + 6
        plain = x0 + int(scale)
        draw.line([plain, y - len(methods) * (bar + 6) - 4, plain, y], fill=(60, 60, 60), width=2)
        y += 18
    draw.text((x0 + int(scale) - 40, y - 8), "plain = x1", fill=(60, 60, 60), font=small)
    image.save(path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.charts", description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--out", default=str(REPO / "docs" / "img"))
    args = parser.parse_args(argv)
    text = Path(args.results).read_text()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("wrote", cost_chart(cost_measures(text), out / "cost.png"))
    # Imported as part of the package: benchmarks/ itself on sys.path would make benchmarks/kernels.py
    # answer transformers' `import kernels`.
    from benchmarks.serve_plot import latency_plot

    rows, slos = serving_rows(text)
    print("wrote", latency_plot(rows, out / "serve_load.png", slos))


if __name__ == "__main__":
    main()
