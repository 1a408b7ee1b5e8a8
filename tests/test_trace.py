"""sgfast.trace against independent readings: the tokenizer's words and positions read piece by
piece, capture selections and views' properties written out as loops (float64, odd sizes), and a
trace's record of every UNet call."""

import ast
import math

import pytest
import torch

from sgfast.testing import build_tokenizer
from sgfast.trace import PromptWords, Trace, TraceStep, View, at_least_float32, selection


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def words_by_pieces(tokenizer, prompt, limit):
    """(words, positions) read from the tokenizer's pieces: a piece ending in "</w>" ends a word;
    at most `limit` pieces (the encoded prompt holds the start and end tokens too)."""
    pieces = tokenizer.tokenize(prompt)[:limit]
    words, positions, word, where = [], [], "", []
    for position, piece in enumerate(pieces, start=1):
        word += piece.replace("</w>", "")
        where.append(position)
        if piece.endswith("</w>"):
            words.append(word)
            positions.append(where)
            word, where = "", []
    if where:
        words.append(word)
        positions.append(where)
    return words, positions


@pytest.mark.parametrize("max_length, pad", [(77, None), (77, "!"), (12, None), (12, "!")])
def test_prompt_words_are_the_tokenizers_pieces_grouped_into_words(tokenizer, max_length, pad):
    kwargs = {} if pad is None else dict(pad_token=pad)
    tok = build_tokenizer(max_length=max_length, **kwargs) if (max_length, pad) != (77, None) else tokenizer
    prompt = "A Red  catdog and the blue zebra"
    got = PromptWords.from_tokenizer(tok, prompt)
    words, positions = words_by_pieces(tok, prompt, max_length - 2)
    assert got.prompt == prompt
    assert got.words == words and got.positions == positions
    if max_length == 77:
        assert words == ["a", "red", "catdog", "and", "the", "blue", "zebra"]
        assert [len(p) for p in positions] == [1, 1, 3, 1, 1, 1, 4]
    else:  # ten pieces fit: "zebra" is cut after its second piece, and is still a word
        assert words == ["a", "red", "catdog", "and", "the", "blue", "ze"]
        assert positions == [[1], [2], [3, 4, 5], [6], [7], [8], [9, 10]]


def test_prompt_words_index_is_the_first_occurrence_and_names_the_words_when_missing(tokenizer):
    words = PromptWords.from_tokenizer(tokenizer, "a cat and a dog")
    assert words.index("a") == 0 and words.index(" DOG ") == 4 and words.index("Cat") == 1
    with pytest.raises(ValueError) as error:
        words.index("Zebra")
    assert str(error.value) == (
        "word 'Zebra' is not in the prompt 'a cat and a dog'; its words are: ['a', 'cat', 'and', 'a', 'dog']"
    )


def test_selection_lists_each_words_tokens_and_averages_them():
    # Three prompts, words of one to four tokens, a different number of chosen words each.
    g = torch.Generator().manual_seed(5)
    prompt_words, chosen = [], []
    for count in (3, 1, 2):
        lengths = torch.randint(1, 5, (count + 2,), generator=g).tolist()
        names = [f"w{i}" for i in range(count + 2)]
        positions, at = [], 1
        for n in lengths:
            positions.append(list(range(at, at + n)))
            at += n
        prompt_words.append(PromptWords(" ".join(names), names, positions))
        chosen.append([names[i] for i in torch.randperm(count + 2, generator=g)[:count].tolist()])
    token_index, weights = selection(prompt_words, chosen, "cpu")

    tokens = [[p for w in ws for p in pw.positions[pw.words.index(w)]] for pw, ws in zip(prompt_words, chosen)]
    width = max(len(t) for t in tokens)
    assert token_index.dtype == torch.long and token_index.shape == (3, width)
    assert weights.dtype == torch.float32 and weights.shape == (3, 3, width)
    for b, (pw, ws) in enumerate(zip(prompt_words, chosen)):
        assert token_index[b].tolist() == tokens[b] + [tokens[b][0]] * (width - len(tokens[b]))
        column = 0
        for slot in range(3):
            for c in range(width):
                if slot < len(ws):
                    n = len(pw.positions[pw.words.index(ws[slot])])
                    want = 1 / n if column <= c < column + n else 0.0
                else:
                    want = 0.0
                assert weights[b, slot, c].item() == torch.tensor(want, dtype=torch.float32).item()
            if slot < len(ws):
                column += len(pw.positions[pw.words.index(ws[slot])])
    # On the device asked for (the meta device: no storage, a device other than the CPU's).
    on_meta = selection(prompt_words, chosen, torch.device("meta"))
    assert [t.device.type for t in on_meta] == ["meta", "meta"]
    # What the capture does with them: each chosen word's map is the mean of its tokens' maps.
    maps = torch.rand(3, 6, 20, generator=g, dtype=torch.float64)  # [B, pixels, tokens]
    picked = maps.gather(2, token_index[:, None].expand(3, 6, width))
    words_maps = torch.einsum("bpt,bst->bsp", picked, weights.double())
    for b, (pw, ws) in enumerate(zip(prompt_words, chosen)):
        for slot, w in enumerate(ws):
            want = maps[b][:, pw.positions[pw.words.index(w)]].mean(-1)
            torch.testing.assert_close(words_maps[b, slot], want)


# ---- views ----------------------------------------------------------------------------------------


def loop_normalize(m):
    low, high = min(min(r) for r in m), max(max(r) for r in m)
    return [[(v - low) / max(high - low, 1e-8) for v in r] for r in m]


def loop_shape(m, sharpness):
    n = loop_normalize(m)
    return loop_normalize([[1 / (1 + math.exp(-sharpness * (v - 0.5))) for v in r] for r in n])


def loop_centroid(m):
    h, w = len(m), len(m[0])
    mass = sum(sum(r) for r in m)
    x = sum(m[i][j] * (j + 0.5) / w for i in range(h) for j in range(w)) / mass
    y = sum(m[i][j] * (i + 0.5) / h for i in range(h) for j in range(w)) / mass
    return [x, y]


def loop_resize(m, height, width):
    """Bilinear resampling on pixel centres (source coordinate (i + 0.5) * in / out - 0.5, clamped)."""
    h, w = len(m), len(m[0])

    def taps(i, size, out):
        s = max((i + 0.5) * size / out - 0.5, 0.0)
        lo = min(int(math.floor(s)), size - 1)
        return lo, min(lo + 1, size - 1), s - lo

    out = []
    for i in range(height):
        y0, y1, fy = taps(i, h, height)
        row = []
        for j in range(width):
            x0, x1, fx = taps(j, w, width)
            top = m[y0][x0] * (1 - fx) + m[y0][x1] * fx
            bottom = m[y1][x0] * (1 - fx) + m[y1][x1] * fx
            row.append(top * (1 - fy) + bottom * fy)
        out.append(row)
    return out


WORDS = ["red", "circle", "and", "red", "square"]  # "red" twice: its first slot is the one read


def random_view(g, sharpness=10.0, features=None):
    maps = {"up": torch.rand(5, 5, 7, generator=g, dtype=torch.float64),
            "mid": torch.rand(5, 3, 3, generator=g, dtype=torch.float64),
            "down": torch.rand(5, 9, 11, generator=g, dtype=torch.float64)}
    return View(WORDS, maps, features=features, sharpness=sharpness), maps


def test_view_reads_each_words_first_slot_on_every_layer():
    view, maps = random_view(torch.Generator().manual_seed(1), sharpness=7.0)
    assert view.words == ["red", "circle", "and", "square"]
    assert view.slots == {"red": 0, "circle": 1, "and": 2, "square": 4}
    for word, slot in [("red", 0), ("circle", 1), ("square", 4)]:
        layers = view.layer_maps(word)
        assert [m.shape for m in layers] == [(1, 1) + m.shape[1:] for m in maps.values()]
        for got, m in zip(layers, maps.values()):
            assert torch.equal(got[0, 0], m[slot])
        grids = [m[slot].tolist() for m in maps.values()]
        want_centroid = torch.tensor([loop_centroid(m) for m in grids], dtype=torch.float64)
        torch.testing.assert_close(view.centroid(word), want_centroid)
        shapes = [loop_shape(m, 7.0) for m in grids]
        torch.testing.assert_close(view.size(word), torch.tensor([sum(map(sum, s)) / (len(s) * len(s[0])) for s in shapes],
                                                                 dtype=torch.float64))
        got_shapes = view.shape(word)
        assert len(got_shapes) == 3
        for got, want in zip(got_shapes, shapes):
            torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
        mean = [[sum(v) / 3 for v in zip(*cells)] for cells in zip(*[loop_resize(m, 4, 6) for m in grids])]
        got_mean = view.mean_map(word, (4, 6))
        assert got_mean.shape == (1, 1, 4, 6)
        torch.testing.assert_close(got_mean[0, 0], torch.tensor(mean, dtype=torch.float64))


def test_view_subset_shows_fewer_words_in_the_same_slots():
    g = torch.Generator().manual_seed(2)
    features = torch.rand(6, 4, 5, generator=g, dtype=torch.float64)
    view, maps = random_view(g, sharpness=4.0, features=features)
    part = view.subset(["square", "red"])
    assert part.words == ["square", "red"] and part.slots == view.slots
    assert part.maps is view.maps and part.features is view.features and part.sharpness == 4.0
    torch.testing.assert_close(part.centroid("square"), view.centroid("square"))
    torch.testing.assert_close(part.appearance("red"), view.appearance("red"))
    recorded = View(WORDS, maps, appearance=torch.rand(5, 6, generator=g))
    assert torch.equal(recorded.subset(["square"]).appearance("square"), recorded.appearance("square"))


def test_view_names_the_recorded_words_for_an_unknown_word():
    view, _ = random_view(torch.Generator().manual_seed(3))
    with pytest.raises(KeyError) as error:
        view.centroid("zebra")
    message = error.value.args[0]
    assert message.startswith("word 'zebra' was not recorded; recorded: [") and message.endswith("]")
    assert sorted(ast.literal_eval(message.split("recorded: ")[1])) == ["and", "circle", "red", "square"]


def test_view_sharpness_defaults_to_ten():
    _, maps = random_view(torch.Generator().manual_seed(9))
    view = View(WORDS, maps)
    assert view.sharpness == 10.0
    grids = [m[1].tolist() for m in maps.values()]
    want = [sum(map(sum, s)) / (len(s) * len(s[0])) for s in (loop_shape(m, 10.0) for m in grids)]
    torch.testing.assert_close(view.size("circle"), torch.tensor(want, dtype=torch.float64))


# float32 maps with float64 features: the silhouette is taken in the features' precision.
@pytest.mark.parametrize("dtype, want, maps_dtype",
                         [(torch.float64, torch.float64, torch.float64), (torch.float16, torch.float32, torch.float64),
                          (torch.float64, torch.float64, torch.float32)])
def test_view_appearance_is_the_mean_feature_inside_the_layer_averaged_silhouette(dtype, want, maps_dtype):
    g = torch.Generator().manual_seed(4)
    features = torch.rand(6, 4, 5, generator=g, dtype=torch.float64)
    view, maps = random_view(g, sharpness=6.0, features=features.to(dtype))
    view.maps = maps = {layer: m.to(maps_dtype) for layer, m in maps.items()}
    exact = 1e-12 if dtype == maps_dtype == torch.float64 else 1e-5
    for word, slot in [("red", 0), ("square", 4)]:
        grids = [m[slot].double().tolist() for m in maps.values()]
        mean = [[sum(v) / 3 for v in zip(*cells)] for cells in zip(*[loop_resize(m, 4, 5) for m in grids])]
        mask = loop_shape(mean, 6.0)
        f = features.to(dtype).double().tolist()
        expected = [sum(mask[i][j] * f[c][i][j] for i in range(4) for j in range(5)) / sum(map(sum, mask))
                    for c in range(6)]
        got = view.appearance(word)
        assert got.dtype == want and got.shape == (6,)
        torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64),
                                   atol=exact, rtol=exact)


def test_view_appearance_takes_a_float32_maps_silhouette_in_float64():
    # One layer on the features' grid: the mean map is the float32 map itself, and its silhouette,
    # taken in the features' float64, matches the float64 loop to far below float32's rounding.
    g = torch.Generator().manual_seed(10)
    maps = {"up": torch.rand(5, 4, 5, generator=g, dtype=torch.float32)}
    features = torch.rand(6, 4, 5, generator=g, dtype=torch.float64)
    view = View(WORDS, maps, features=features, sharpness=6.0)
    mask = loop_shape(maps["up"][1].double().tolist(), 6.0)
    f = features.tolist()
    expected = [sum(mask[i][j] * f[c][i][j] for i in range(4) for j in range(5)) / sum(map(sum, mask))
                for c in range(6)]
    got = view.appearance("circle")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=1e-12)


def test_view_appearance_reads_a_recorded_row_else_needs_features():
    g = torch.Generator().manual_seed(6)
    maps = {"up": torch.rand(5, 3, 5, generator=g)}
    recorded = torch.rand(5, 7, generator=g)
    view = View(WORDS, maps, features=torch.rand(7, 3, 5, generator=g), appearance=recorded)
    assert torch.equal(view.appearance("red"), recorded[0]) and torch.equal(view.appearance("square"), recorded[4])
    with pytest.raises(ValueError) as error:
        View(WORDS, maps).appearance("red")
    assert str(error.value) == "appearance needs features: the capture has no feature layer"


def test_at_least_float32():
    for dtype, want in [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                        (torch.float32, torch.float32), (torch.float64, torch.float64), (torch.int64, torch.float32)]:
        assert at_least_float32(torch.ones(2, dtype=dtype)).dtype == want


# ---- traces ---------------------------------------------------------------------------------------


def test_trace_keeps_every_call_and_each_timesteps_first():
    g = torch.Generator().manual_seed(7)
    trace = Trace("a red circle", ["a", "red", "circle"])
    records = []
    # A second-order scheduler's order: 901 twice, then 501, then 501 again, then 101.
    for t in (torch.tensor(901), 901, 501.0, 501, 101):
        maps = {"x": torch.rand(3, 3, 5, generator=g, dtype=torch.float16, requires_grad=False),
                "y": torch.rand(3, 2, 2, generator=g, dtype=torch.float64).requires_grad_()}
        appearance = torch.rand(3, 4, generator=g, dtype=torch.float16)
        trace.add(t, maps, appearance)
        records.append((maps, appearance))
    assert [t for t, _ in trace.calls] == [901, 901, 501, 501, 101]
    assert list(trace.steps) == [901, 501, 101] and all(type(t) is int for t in trace.steps)
    assert trace.steps[901] is trace.calls[0][1] and trace.steps[501] is trace.calls[2][1]
    for (_, step), (maps, appearance) in zip(trace.calls, records):
        assert step.maps["x"].dtype == torch.float32 and step.maps["y"].dtype == torch.float64
        assert not step.maps["y"].requires_grad and step.appearance.dtype == torch.float32
        assert torch.equal(step.maps["x"], maps["x"].float()) and torch.equal(step.maps["y"], maps["y"].detach())
        assert torch.equal(step.appearance, appearance.float())
    trace.add(51, {"x": torch.zeros(3, 1, 1)}, None)
    assert trace.calls[-1][1].appearance is None

    # Each call reads its own record when the timestep matches; otherwise the nearest timestep's first.
    for call, t in enumerate((901, 901, 501, 501, 101)):
        view = trace.view(t, sharpness=3.0, call=call)
        assert view.maps is trace.calls[call][1].maps and view.sharpness == 3.0
        assert view.words == ["a", "red", "circle"]
        assert torch.equal(view.appearance("red"), records[call][1][1].float())
    assert trace.view(901, call=1).maps is not trace.view(901).maps
    assert trace.view(501, call=1).maps is trace.steps[501].maps  # call 1 was at 901
    assert trace.view(101, call=6).maps is trace.steps[101].maps  # past the last call
    assert trace.view(101, call=5).maps is trace.steps[101].maps  # call 5 was at 51
    assert trace.view(75).maps is trace.steps[51].maps and trace.view(77).maps is trace.steps[101].maps
    assert trace.view(torch.tensor(700)).maps is trace.steps[501].maps
    assert trace.view(701).maps is trace.steps[901].maps
    # Equally near: the earlier recorded (the first in the trace's order).
    assert trace.view(701.0).maps is trace.steps[901].maps and trace.view(301).maps is trace.steps[501].maps
    assert trace.view(5000).maps is trace.steps[901].maps and trace.view(-40).maps is trace.steps[51].maps
    assert trace.view(901).sharpness == 10.0


def test_an_empty_trace_has_no_view():
    with pytest.raises(ValueError) as error:
        Trace("a red circle", ["a", "red", "circle"]).view(500)
    assert str(error.value) == "the trace is empty"


def test_trace_nbytes_counts_every_call_else_every_step():
    g = torch.Generator().manual_seed(8)
    trace = Trace("a red circle", ["a", "red", "circle"])
    trace.add(901, {"x": torch.rand(3, 5, 7, generator=g), "y": torch.rand(3, 3, 3, generator=g).double()},
              torch.rand(3, 9, generator=g))
    trace.add(901, {"x": torch.rand(3, 5, 7, generator=g), "y": torch.rand(3, 3, 3, generator=g).double()}, None)
    one_call = 3 * 5 * 7 * 4 + 3 * 3 * 3 * 8
    assert trace.nbytes() == 2 * one_call + 3 * 9 * 4
    # A trace built from steps alone (no call list): its steps.
    steps = Trace("a red circle", ["a", "red", "circle"],
                  steps={901: TraceStep({"x": torch.zeros(3, 5, 7)}, torch.zeros(3, 11, dtype=torch.float64)),
                         501: TraceStep({"x": torch.zeros(3, 5, 7)})})
    assert steps.nbytes() == 2 * 3 * 5 * 7 * 4 + 3 * 11 * 8
    assert Trace("a", ["a"]).nbytes() == 0


def test_trace_index_normalises_the_word_and_names_the_words_when_missing():
    trace = Trace("A Red circle", ["a", "red", "circle"])
    assert trace.index("  RED ") == "red" and trace.index("circle") == "circle"
    with pytest.raises(ValueError) as error:
        trace.index("Zebra")
    assert str(error.value) == (
        "word 'Zebra' is not in the source prompt 'A Red circle'; its words are: ['a', 'red', 'circle']"
    )


def test_trace_defaults():
    trace = Trace("a", ["a"])
    assert trace.latents is None and trace.steps == {} and trace.calls == [] and trace.image_size is None
    assert trace.noise_state is None and trace.settings is None and trace.inversion is None
    assert Trace("a", ["a"]).steps is not trace.steps and Trace("a", ["a"]).calls is not trace.calls
    assert TraceStep({}).appearance is None
