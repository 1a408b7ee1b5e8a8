"""Latency against offered load for each scheduler (the serving benchmark's figure), drawn with PIL:
one panel per model, p95 (solid) and p50 (thin) of answered requests against the offered load in
requests per second, the SLO as a dashed line."""

from PIL import Image, ImageDraw, ImageFont

COLOURS = {"request": (214, 96, 77), "iteration": (33, 102, 172)}


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _panel(draw, box, rows, model, slo_ms, font, small):
    left, top, right, bottom = box
    points = {s: [(r["rate"], r["summary"]["p95_ms"], r["summary"]["p50_ms"]) for r in rows if r["model"] == model and r["scheduler"] == s]
              for s in COLOURS}
    values = [v for pts in points.values() for p in pts for v in p[1:] if v is not None] + [slo_ms]
    xs = [p[0] for pts in points.values() for p in pts] or [1.0]
    x_max, y_max = max(xs) * 1.08, max(values) * 1.1
    plot = (left + 70, top + 30, right - 20, bottom - 50)

    def at(x, y):
        return (plot[0] + (plot[2] - plot[0]) * x / x_max, plot[3] - (plot[3] - plot[1]) * y / y_max)

    draw.rectangle(plot, outline=(0, 0, 0))
    draw.text((left + 70, top + 5), f"{model} model", fill=(0, 0, 0), font=font)
    for k in range(6):
        y = y_max * k / 5
        draw.text((left + 5, at(0, y)[1] - 7), f"{y / 1000:.1f} s", fill=(60, 60, 60), font=small)
        x = x_max * k / 5
        draw.text((at(x, 0)[0] - 12, plot[3] + 6), f"{x:.2f}", fill=(60, 60, 60), font=small)
    draw.text(((plot[0] + plot[2]) // 2 - 90, plot[3] + 26), "offered load (requests / s)", fill=(0, 0, 0), font=small)
    y = at(0, slo_ms)[1]
    for x in range(int(plot[0]), int(plot[2]), 12):
        draw.line((x, y, x + 6, y), fill=(120, 120, 120))
    draw.text((plot[2] - 120, y - 16), f"SLO p95 {slo_ms / 1000:.1f} s", fill=(90, 90, 90), font=small)
    for scheduler, pts in points.items():
        pts = sorted(p for p in pts if p[1] is not None)
        for index, width in ((1, 3), (2, 1)):
            line = [at(p[0], p[index]) for p in pts if p[index] is not None]
            if len(line) > 1:
                draw.line(line, fill=COLOURS[scheduler], width=width)
            for x, y in line:
                r = 4 if width == 3 else 2
                draw.ellipse((x - r, y - r, x + r, y + r), fill=COLOURS[scheduler])


def latency_plot(rows, path, slos, panel=(620, 420)):
    models = list(dict.fromkeys(r["model"] for r in rows))
    width, height = panel[0] * max(1, len(models)), panel[1] + 40
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font, small = _font(16), _font(12)
    for k, model in enumerate(models):
        _panel(draw, (k * panel[0], 0, (k + 1) * panel[0], panel[1]), rows, model, slos[model], font, small)
    x = 80
    for scheduler, colour in COLOURS.items():
        draw.line((x, height - 22, x + 30, height - 22), fill=colour, width=3)
        draw.text((x + 36, height - 30), f"{scheduler}-level: p95 thick, p50 thin", fill=(0, 0, 0), font=small)
        x += 280
    image.save(path)
    return path
