"""A plain bar chart of the benchmark's results, drawn with PIL (no plotting library needed):
for each model, seconds per image of each row (median, with a min-max whisker), labelled with the
ratio to the plain diffusers image and the guided / plain step-time ratio (both measured in the
row's own process)."""

from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "plain": (120, 120, 120),
    "attend_excite": (214, 96, 77),
    "reference": (67, 147, 195),
    "fast": (33, 102, 172),
}


def _colour(row):
    kind = row.get("row", {}).get("kind", "plain")
    if kind == "sgfast":
        return COLOURS.get(row["row"].get("mode"), (33, 102, 172))
    return COLOURS.get(kind, (120, 120, 120))


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def bar_chart(report, path, width=1200, bar_height=22, gap=8):
    font = _font(13)
    label_width, right_margin = 400, 300
    plot_width = width - label_width - right_margin
    panels = [(model, [r for r in data["rows"] if "image_s" in r], data) for model, data in report["models"].items()]
    panels = [p for p in panels if p[1]]
    height = 40 + sum(50 + len(rows) * (bar_height + gap) for _, rows, _ in panels) + 20
    image = Image.new("RGB", (width, max(height, 120)), "white")
    draw = ImageDraw.Draw(image)
    info = report["info"]
    title = f"Seconds per guided image ({info['steps']} steps, {info['dtype']}) - {info.get('gpu') or info['cpu']}"
    draw.text((10, 10), title, fill="black", font=_font(15))
    if not panels:
        draw.text((10, 50), "no image timings", fill="black", font=font)
        image.save(path)
        return path
    y = 40
    for model, rows, data in panels:
        draw.text((10, y), f"{model} ({data.get('image_size')}px)", fill="black", font=font)
        y += 24
        top = max(r["image_s"]["max"] for r in rows)
        scale = plot_width / top if top > 0 else 1.0
        for r in rows:
            s = r["image_s"]
            draw.text((10, y + 4), r["name"][:60], fill="black", font=font)
            x0 = label_width
            draw.rectangle([x0, y, x0 + max(1, int(s["median"] * scale)), y + bar_height], fill=_colour(r))
            mid = y + bar_height // 2
            draw.line([x0 + int(s["min"] * scale), mid, x0 + int(s["max"] * scale), mid], fill="black", width=1)
            text = f"{s['median']:.3f} s"
            if "image_over_plain" in r:
                text += f"   image x{r['image_over_plain']:.2f} plain"
            if "guided_over_plain" in r:
                text += f"   guided step x{r['guided_over_plain']:.2f}"
            draw.text((x0 + int(s["max"] * scale) + 6, y + 4), text, fill="black", font=font)
            y += bar_height + gap
        draw.line([label_width, y, label_width + plot_width, y], fill=(180, 180, 180))
        y += 26
    image.save(path)
    return path
