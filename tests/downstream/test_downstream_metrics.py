"""Downstream metrics (``lgvq_fast.downstream.metrics``) and the shapes label maps (``lgvq_fast.data.shapes``):
the caption parser and its canonical form, ``caption_scores`` / ``bleu4`` / ``chrf`` on hand-computed cases,
``render_labels`` against the rendered pixels, ``read_scene`` on ground-truth label maps, ``probe_scores`` through
an oracle probe, and a short ``train_probe`` run with its save/load round trip."""
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _fixtures import one_thread  # noqa: F401 (autouse)

from lgvq_fast.data.shapes import (
    BACKGROUND,
    COLOURS,
    LABELS,
    RELATIONS,
    SHAPES,
    SIZES,
    caption_of,
    label_of,
    pil_to_tensor,
    render,
    render_labels,
    sample_scene,
)
from lgvq_fast.downstream.metrics import (
    Obj,
    Scene,
    ShapesProbe,
    bleu4,
    caption_scores,
    chrf,
    load_probe,
    parse_caption,
    predict_labels,
    probe_accuracy_on_real,
    probe_scores,
    read_scene,
    relation_holds,
    save_probe,
    scene_of,
    size_thresholds,
    train_probe,
)

RELATION_WORDS = [word for word, _, _ in RELATIONS]


def _random_obj(rng):
    return {"size": rng.choice(list(SIZES)), "colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES)}


def _scene(text):
    scene = parse_caption(text)
    assert scene is not None, text
    return scene


# ---------------------------------------------------------------- parser


@pytest.mark.parametrize("relation", RELATION_WORDS)
def test_parse_caption_round_trips_every_relation(relation):
    rng = random.Random(random.random())
    for _ in range(20):
        objs = [_random_obj(rng), _random_obj(rng)]
        assert parse_caption(caption_of(objs, relation)) == scene_of(objs, relation)
        assert parse_caption(caption_of(objs[:1], None)) == scene_of(objs[:1], None)


def test_parse_caption_reads_sampled_scenes_any_case_and_spacing():
    start = random.randrange(10**6)
    for i in range(start, start + 400):
        objs, relation = sample_scene(3, "train", i)
        text = caption_of(objs, relation)
        truth = scene_of(objs, relation)
        assert parse_caption(text) == truth
        shouted = "  " + "   ".join(w.upper() if j % 2 else w.title() for j, w in enumerate(text.split())) + "\n"
        assert parse_caption(shouted).canonical() == truth.canonical()


@pytest.mark.parametrize("text", [
    "a large red zebra",
    "a large red",
    "large red circle",
    "a red large circle",
    "a large red circle left of",
    "a large red circle left of a small blue",
    "a large red circle left a small blue square",
    "a large red circle near a small blue square",
    "a large red circle left of a small blue square please",
    "a large red circle a small blue square",
    "a small green cross above",
    "",
], ids=lambda t: t.replace(" ", "_") or "empty")
def test_parse_caption_rejects_text_outside_the_grammar(text):
    assert parse_caption(text) is None


def test_canonical_makes_equivalent_captions_equal():
    a = _scene("a small red circle right of a large blue square")
    b = _scene("a large blue square left of a small red circle")
    assert a != b and a.canonical() == b.canonical() == b
    assert _scene("a large white cross below a small green triangle").canonical() == \
        _scene("a small green triangle above a large white cross")
    # the reversed claim is another scene
    assert _scene("a small red circle left of a large blue square").canonical() != b.canonical()
    one = _scene("a small orange diamond")
    assert one.canonical() == one and one.swapped() == one


def test_scene_rejects_inconsistent_relation():
    with pytest.raises(ValueError, match="relation"):
        Scene((Obj("small", "red", "circle"),), "left of")
    with pytest.raises(ValueError, match="relation"):
        Scene((Obj("small", "red", "circle"), Obj("large", "blue", "cross")), "near")


# ---------------------------------------------------------------- caption scores and text overlap


def test_caption_scores_hand_computed():
    truth = ["a large red square left of a small blue circle", "a small green cross",
             "a large white diamond above a small yellow triangle", "a small red circle",
             "a large red circle left of a small blue square", "a small purple cross"]
    generated = [
        # colours and shapes swapped between the objects: every colour and shape present, no pair, no object
        "a large red circle left of a small blue square",
        "a small green cross",
        # the equivalent wording
        "A small yellow triangle  below a large white diamond",
        "a small red zebra",
        # one of the two objects
        "a large red circle",
        # an extra object, the wrong size
        "a large purple cross right of a small orange circle",
    ]
    got = caption_scores(generated, [_scene(t) for t in truth])
    want = {"n": 6, "parsed": 5 / 6, "exact": 2 / 6, "count": 3 / 6, "colour": 4.5 / 6, "shape": 4.5 / 6,
            "size": 4.5 / 6, "colour_shape": 3.5 / 6, "object": 2.5 / 6, "relation": 1 / 3, "n_relation": 3}
    assert got == pytest.approx(want)


def test_caption_scores_swapped_attributes_and_unparseable_alone():
    truth = [_scene("a large red square left of a small blue circle")]
    swapped = caption_scores(["a large red circle left of a small blue square"], truth)
    assert (swapped["colour"], swapped["shape"], swapped["colour_shape"], swapped["object"]) == (1.0, 1.0, 0.0, 0.0)
    assert swapped["relation"] == 0.0 and swapped["exact"] == 0.0
    bad = caption_scores(["a large red square left of"], truth)
    assert all(bad[k] == 0.0 for k in bad if k not in ("n", "n_relation")) and bad["n_relation"] == 1
    one = caption_scores(["zebra"], [_scene("a small red circle")])
    assert math.isnan(one["relation"]) and one["n_relation"] == 0 and one["parsed"] == 0.0


def test_caption_scores_of_true_captions_are_one_for_raw_scenes():
    start = random.randrange(10**6)
    raw = [sample_scene(0, "val", i) for i in range(start, start + 200)]
    # half of them in the swapped wording
    captions = [(scene_of(*r).swapped() if i % 2 else scene_of(*r)).caption() for i, r in enumerate(raw)]
    got = caption_scores(captions, raw)
    assert all(got[k] == 1.0 for k in got if k not in ("n", "n_relation"))
    assert got["n_relation"] == sum(r[1] is not None for r in raw)


@pytest.mark.parametrize(("generated", "truth", "match"), [
    ([], [], "generated must be a non-empty list"),
    (["a small red circle"], [], "truth must be a non-empty list"),
    (["a small red circle"] * 2, [Scene((Obj("small", "red", "circle"),))], "differ in length: 2 vs 1"),
    (["a small red circle"], ["a small red circle"], r"truth\[0\] must be a Scene"),
], ids=["empty", "empty-truth", "lengths", "truth-type"])
def test_caption_scores_errors(generated, truth, match):
    with pytest.raises(ValueError, match=match):
        caption_scores(generated, truth)


def test_bleu4_and_chrf():
    truth = ["a large red circle left of a small blue square", "a small green cross",
             "a large white diamond below a small yellow triangle"]
    assert bleu4(truth, truth) == pytest.approx(1.0)
    assert chrf(truth, truth) == pytest.approx(1.0)
    swapped = [_scene(t).swapped().caption() for t in truth]
    assert swapped[0] == "a small blue square right of a large red circle"
    assert bleu4(swapped, truth) == pytest.approx(1.0)
    assert chrf(swapped, truth) == pytest.approx(1.0)
    wrong = ["a small purple triangle above a large orange diamond", "a large white circle", "a small red square"]
    assert bleu4(wrong, truth) < 0.5
    with pytest.raises(ValueError, match="differ in length"):
        bleu4(truth, truth[:2])


def test_bleu4_with_several_free_text_captions_per_image():
    """CUB/COCO: each image has several captions outside the shapes grammar; any of them is a reference."""
    refs = [["this bird has a red crown and black wings", "a small bird with a short beak"],
            ["a man riding a wave on top of a surfboard", "a surfer rides a large wave"]]
    assert bleu4([refs[0][1], refs[1][0]], refs) == pytest.approx(1.0)
    assert bleu4([refs[0][0], refs[1][1]], refs) == pytest.approx(1.0)
    assert bleu4(["a red bird", "a cat on a sofa"], refs) < 0.5
    with pytest.raises(ValueError, match=r"truth_captions\[1\] has no caption"):
        bleu4(["a", "b"], [["a"], []])


# ---------------------------------------------------------------- label maps and reading them


def test_label_table():
    assert LABELS[0] == "background" and len(LABELS) == 1 + len(COLOURS) * len(SHAPES)
    assert sorted(label_of(c, s) for c in COLOURS for s in SHAPES) == list(range(1, len(LABELS)))
    assert all(LABELS[label_of(c, s)] == f"{c} {s}" for c in COLOURS for s in SHAPES)
    with pytest.raises(ValueError, match="zebra"):
        label_of("red", "zebra")


def test_render_labels_agree_with_rendered_pixels():
    res = 32
    start = random.randrange(10**6)
    palette = np.array([BACKGROUND, *COLOURS.values()], dtype=float)
    for i in range(start, start + 60):
        objs, _ = sample_scene(2, "val", i)
        img = np.asarray(render(objs, res)).astype(float)
        lab = render_labels(objs, res)
        assert lab.dtype == np.int64 and lab.shape == (res, res)
        assert set(np.unique(lab)) == {0, *(label_of(o["colour"], o["shape"]) for o in objs)}
        # the background label's pixels are background; away from edges (Lanczos ringing) each one is
        assert np.abs(img[lab == 0].mean(0) - BACKGROUND).max() < 12
        pad = np.pad(lab, 1, constant_values=-1)
        interior = np.logical_and.reduce([pad[dy:dy + res, dx:dx + res] == 0 for dy in range(3) for dx in range(3)])
        assert np.abs(img[interior] - BACKGROUND).max() < 40
        for o in objs:
            mean = img[lab == label_of(o["colour"], o["shape"])].mean(0)
            assert np.abs(mean - COLOURS[o["colour"]]).max() < 32, (o, mean)
            nearest = np.argmin(((palette - mean) ** 2).sum(1))
            assert nearest == 1 + list(COLOURS).index(o["colour"])


@pytest.mark.parametrize("res", [16, 32, 48])
def test_render_labels_areas_scale_with_size(res):
    ratio = (SIZES["large"] / SIZES["small"]) ** 2
    thresholds = size_thresholds(res)
    for shape in SHAPES:
        centres = [(random.uniform(0.3, 0.7), random.uniform(0.3, 0.7)) for _ in range(8)]
        area = {size: np.array([np.count_nonzero(render_labels([{"shape": shape, "colour": "red", "size": size,
                                                                "centre": c}], res)) for c in centres])
                for size in SIZES}
        # every placement falls on its side of the threshold read_scene sizes by
        assert area["small"].max() < thresholds[shape] < area["large"].min()
        # pixel quantisation: the ratio of mean areas stays within 5 / R of the drawn one (worst of 300 draws: 3 / R)
        assert area["large"].mean() / area["small"].mean() == pytest.approx(ratio, rel=5 / res)


def _same_colour_touching(objs, lab):
    """Two shapes of one colour whose label regions are 4-adjacent: read_scene reads them as one part."""
    if len(objs) != 2 or objs[0]["colour"] != objs[1]["colour"]:
        return False
    a, b = (lab == label_of(o["colour"], o["shape"]) for o in objs)
    near = np.zeros_like(a)
    near[1:] |= a[:-1]
    near[:-1] |= a[1:]
    near[:, 1:] |= a[:, :-1]
    near[:, :-1] |= a[:, 1:]
    return bool((near & b).any())


@pytest.mark.parametrize("res", [16, 32, 64])
def test_read_scene_on_true_label_maps_is_exact(res):
    start, n, touching = random.randrange(10**6), 400, 0
    for i in range(start, start + n):
        objs, relation = sample_scene(4, "train", i)
        lab = render_labels(objs, res)
        if _same_colour_touching(objs, lab):
            touching += 1
            continue
        seen = read_scene(torch.from_numpy(lab) if i % 2 else lab)
        truth = scene_of(objs, relation)
        assert sorted(map(repr, (s.obj for s in seen))) == sorted(map(repr, truth.objects)), (truth, seen)
        assert relation is None or relation_holds(seen, truth)
        assert relation is None or not relation_holds(seen, Scene(truth.objects[::-1], relation))
        centres = {(s.obj.colour, s.obj.shape): s.centre for s in seen}
        for o in objs:
            assert np.allclose(centres[o["colour"], o["shape"]], o["centre"], atol=0.75 / res)
    assert touching <= n // 50


def test_read_scene_errors_and_min_pixels():
    with pytest.raises(ValueError, match="square integer"):
        read_scene(np.zeros((4, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="square integer"):
        read_scene(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="must lie in"):
        read_scene(np.full((4, 4), len(LABELS)))
    lab = np.zeros((32, 32), dtype=np.int64)
    lab[3:6, 3:6] = label_of("red", "circle")
    assert read_scene(lab) == ()
    assert [s.obj for s in read_scene(lab, min_pixels=9)] == [Obj("small", "red", "circle")]


class _OracleProbe(torch.nn.Module):
    """Stands in for a perfect probe: one-hot logits of the label maps it holds, in order."""

    def __init__(self, label_maps):
        super().__init__()
        self.resolution = label_maps.shape[-1]
        self.register_buffer("maps", label_maps)
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, images):
        assert len(images) == len(self.maps)
        return torch.nn.functional.one_hot(self.maps, len(LABELS)).permute(0, 3, 1, 2).float()


def test_probe_scores_through_an_oracle_probe():
    start, res = random.randrange(10**6), 32
    # two-object scenes whose label maps read back exactly: two shapes of one colour that touch read as one
    # (read_scene's stated limit, measured by test_read_scene_on_true_label_maps_is_exact; 1 draw of 24 in 400 had one)
    raw = [r for r in (sample_scene(6, "val", i) for i in range(start, start + 120))
           if r[1] is not None and not _same_colour_touching(r[0], render_labels(r[0], res))][:24]
    assert len(raw) == 24
    images = torch.stack([pil_to_tensor(render(objs, res)) for objs, _ in raw])
    oracle = _OracleProbe(torch.stack([torch.from_numpy(render_labels(objs, res)) for objs, _ in raw]))
    assert torch.equal(predict_labels(oracle, images), oracle.maps)
    got = probe_scores(oracle, images, raw)
    assert all(got[k] == 1.0 for k in got if k not in ("n", "n_relation")) and got["n_relation"] == len(raw)
    # prompts stating the reversed relation: every object right, no relation, nothing exact
    reversed_ = [scene_of(objs[::-1], rel) for objs, rel in raw]
    got = probe_scores(oracle, images, reversed_)
    assert (got["object"], got["count"], got["relation"], got["exact"]) == (1.0, 1.0, 0.0, 0.0)
    # prompts with only their first object: counts wrong, the object found, no relation to check
    got = probe_scores(oracle, images, [scene_of(objs[:1], None) for objs, _ in raw])
    assert (got["count"], got["object"], got["exact"], got["n_relation"]) == (0.0, 1.0, 0.0, 0)


@pytest.mark.parametrize(("images", "match"), [
    (torch.zeros(2, 3, 32, 32, dtype=torch.int64), "float tensor"),
    (torch.zeros(2, 1, 32, 32), r"\[B, 3, R, R\]"),
    (torch.zeros(2, 3, 16, 16), "32x32"),
    (torch.full((2, 3, 32, 32), 255.0), r"\[-1, 1\]"),
], ids=["int", "channels", "resolution", "range"])
def test_probe_scores_image_errors(images, match):
    oracle = _OracleProbe(torch.zeros(2, 32, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match=match):
        probe_scores(oracle, images, [Scene((Obj("small", "red", "circle"),))] * 2)


def test_probe_scores_truth_length_error():
    oracle = _OracleProbe(torch.zeros(2, 32, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"truth must be a list with one scene per image \(2\), got 1"):
        probe_scores(oracle, torch.zeros(2, 3, 32, 32), [Scene((Obj("small", "red", "circle"),))])


# ---------------------------------------------------------------- the trained probe


@pytest.fixture(scope="module")
def short_probe():
    return train_probe(resolution=32, steps=200, batch_size=16, seed=random.randrange(1000), progress=False)


def test_short_training_beats_chance(short_probe):
    seed, start = random.randrange(1000), random.randrange(10**6)
    raw = [sample_scene(seed, "val", i) for i in range(start, start + 96)]
    images = torch.stack([pil_to_tensor(render(objs, 32)) for objs, _ in raw])
    truth = torch.stack([torch.from_numpy(render_labels(objs, 32)) for objs, _ in raw])
    pred = predict_labels(short_probe, images)
    obj = truth > 0
    colour_of = torch.tensor([-1] + [i // len(SHAPES) for i in range(len(LABELS) - 1)])
    # chance among the object classes: 1 / 35 for an object pixel's class, 1 / 7 for its colour
    assert (pred[obj] == truth[obj]).float().mean() > 0.15
    assert (colour_of[pred[obj]] == colour_of[truth[obj]]).float().mean() > 0.8
    assert (pred[~obj] == 0).float().mean() > 0.9
    scores = probe_accuracy_on_real(short_probe, n=32, seed=seed)
    assert scores["n"] == 32 and 0.15 < scores["object_pixel_accuracy"] <= 1.0


def test_save_load_round_trip(short_probe, tmp_path):
    path = tmp_path / "probe.pt"
    save_probe(short_probe, path)
    assert [p.name for p in tmp_path.iterdir()] == ["probe.pt"]
    loaded = load_probe(path)
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(images), short_probe(images))
    assert (loaded.resolution, loaded.width) == (short_probe.resolution, short_probe.width)


def test_load_rejects_other_files(short_probe, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a probe\n")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(3)}, other)
    for path in (text, other):
        with pytest.raises(ValueError, match=f"{path.name}: not a shapes probe file") as err:
            load_probe(path)
        assert "\n" not in str(err.value)
    table = tmp_path / "table.pt"
    save_probe(short_probe, table)
    payload = torch.load(table, weights_only=True)
    torch.save({**payload, "labels": payload["labels"][:-1]}, table)
    with pytest.raises(ValueError, match=f"{table.name}: the probe's class table"):
        load_probe(table)
    torch.save({**payload, "width": payload["width"] + 2}, table)
    with pytest.raises(ValueError, match=f"{table.name}: a shapes probe file whose weights do not load"):
        load_probe(table)


@pytest.mark.parametrize("change", ["small", "large", "cross_arm", "colour"])
def test_load_rejects_a_probe_of_another_drawing(short_probe, tmp_path, monkeypatch, change):
    """A probe records the geometry it was trained on; once the renderer draws differently it reads today's images
    wrongly, so loading it fails naming the difference (and a probe that records none fails too)."""
    import lgvq_fast.data.shapes as shapes

    path = tmp_path / "probe.pt"
    save_probe(short_probe, path)
    key = {"small": "sizes", "large": "sizes", "cross_arm": "cross_arm", "colour": "colours"}[change]
    if change in ("small", "large"):
        monkeypatch.setitem(shapes.SIZES, change, shapes.SIZES[change] * random.uniform(0.8, 0.95))
    elif change == "cross_arm":
        monkeypatch.setattr(shapes, "CROSS_ARM", shapes.CROSS_ARM + random.uniform(0.01, 0.1))
    else:
        monkeypatch.setitem(shapes.COLOURS, "red", (random.randrange(256), 0, 0))
    want = f"{path.name}: the probe was trained on shapes drawn with other {key} "
    with pytest.raises(ValueError, match=want) as err:
        load_probe(path)
    assert "\n" not in str(err.value) and "train a new one" in str(err.value)
    monkeypatch.undo()
    assert load_probe(path).resolution == short_probe.resolution  # the renderer's drawing again: loads
    payload = torch.load(path, weights_only=True)
    del payload["geometry"]
    torch.save(payload, path)
    with pytest.raises(ValueError, match=f"{path.name}: the probe records no drawing geometry"):
        load_probe(path)


def test_cached_probe_is_per_drawing(tmp_path, monkeypatch):
    """The downstream trainer's cached probe is named by the renderer's geometry: a changed drawing trains its own
    instead of reading images with a probe of the old one."""
    import lgvq_fast.data.shapes as shapes
    import lgvq_fast.downstream.metrics as metrics_mod
    from lgvq_fast.downstream.evaluate import get_probe

    trained = []

    def quick(resolution, **kw):
        trained.append(shapes.geometry_tag())
        return ShapesProbe(resolution, 4)

    monkeypatch.setattr(metrics_mod, "train_probe", quick)
    cfg = SimpleNamespace(train=SimpleNamespace(probe=None, progress=False), data=SimpleNamespace(cache_dir=tmp_path))
    get_probe(cfg, 16, "cpu", log=lambda *a: None)
    get_probe(cfg, 16, "cpu", log=lambda *a: None)
    assert trained == [shapes.geometry_tag()]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"shapes_probe_r16_{shapes.geometry_tag()}.pt"]
    monkeypatch.setattr(shapes, "CROSS_ARM", shapes.CROSS_ARM * random.uniform(0.7, 0.9))
    get_probe(cfg, 16, "cpu", log=lambda *a: None)
    assert len(trained) == 2 and trained[1] != trained[0] and len(list(tmp_path.iterdir())) == 2
