"""Tests of ``pipeline.evaluation.adherence``: captions parsed back, shapes read back from pixels, scoring."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pipeline.evaluation.synthetic import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, UNNAMEABLE, caption_for, render_sample
from pipeline.evaluation.adherence import ATTRIBUTES, SCORED, adherence_table, analyse, evaluate, parse_caption, render_caption, score

KEYS = (*SCORED, "all")


def rates(results: list[dict]) -> dict[str, float]:
    return {key: sum(r[key] for r in results) / len(results) for key in KEYS}


def describe(results: list[dict]) -> str:
    return " ".join(f"{key}={value:.3f}" for key, value in rates(results).items())


@pytest.fixture(scope="module")
def clean_32() -> list[tuple[Image.Image, dict, dict]]:
    """500 synth samples at 32 px: (image, ground truth, analyse(image))."""
    samples = []
    for i in range(500):
        image, truth = render_sample(i, 32, seed=101, second_object_prob=0.25)
        samples.append((image, truth, analyse(image)))
    return samples


# ----------------------------------------------------------------------------- captions


def test_parse_caption_inverts_synth_captions() -> None:
    for i in range(1000):
        _, truth = render_sample(i, 16, seed=7, second_object_prob=0.5)
        parsed = parse_caption(truth["caption"])
        assert parsed["background"] == truth["background"]
        assert parsed["objects"] == [
            {k: o[k] for k in ("size", "colour", "shape", "position")} for o in truth["objects"]
        ]
        assert caption_for(parsed["background"], parsed["objects"]) == truth["caption"]


def test_parse_caption_every_vocabulary_word() -> None:
    for background in BACKGROUNDS:
        for colour, shape, size, position in zip(COLOURS, SHAPES * 2, [*SIZES] * 4, [*POSITIONS] * 2):
            objects = [{"size": size, "colour": colour, "shape": shape, "position": position}]
            assert parse_caption(caption_for(background, objects)) == {"background": background, "objects": objects}


@pytest.mark.parametrize(
    "caption",
    [
        "",
        "a cat",
        "a small circle on a navy background",  # two attributes unnamed (colour, position)
        "a circle at the top left on a navy background",  # size and colour
        "a small red circle",  # position and background
        "a small red circle at the top left and a large square at the center on a navy background",  # one colour only
        "a small red circle at the top left and a blue square at the center",  # a size and the background
        "a small red circle at the top left on a navy background.",
        "A small red circle at the top left on a navy background",
        "a small red circle at the top left on a  navy background",
        " a small red circle at the top left on a navy background",
        "a huge red circle at the top left on a navy background",
        "a small magenta circle at the top left on a navy background",
        "a small red hexagon at the top left on a navy background",
        "a small red circle at the middle on a navy background",
        "a small red circle at the top left on a orange background",  # orange is no background
        "a small red circle at the top left on an navy background",  # wrong article
        "an small red circle at the top left on a navy background",
        "a small red circle at the top left and on a navy background",
        "a small red circle at the top left and a large blue square on a navy background",
        "on a navy background",
    ],
)
def test_parse_caption_rejects_captions_outside_the_grammar(caption: str) -> None:
    with pytest.raises(ValueError, match="outside the synthetic grammar"):
        parse_caption(caption)


def test_parse_caption_rejects_non_strings() -> None:
    with pytest.raises(TypeError):
        parse_caption(None)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- under-specified captions

RED_CIRCLE = {"size": "small", "colour": "red", "shape": "circle", "position": "top left"}
BLUE_SQUARE = {"size": "small", "colour": "blue", "shape": "square", "position": "center"}


@pytest.mark.parametrize(
    ("caption", "unnamed"),
    [
        ("a small circle at the top left on a navy background", "colour"),
        ("a small red circle on a navy background", "position"),
        ("a red circle at the top left on a navy background", "size"),
        ("a small red circle at the top left", "background"),
    ],
)
def test_parse_caption_underspecified_forms(caption: str, unnamed: str) -> None:
    blank = {} if unnamed == "background" else {unnamed: None}
    background = None if unnamed == "background" else "navy"
    assert parse_caption(caption) == {"background": background, "objects": [{**RED_CIRCLE, **blank}], "unnamed": unnamed}
    two = caption_for("navy", [RED_CIRCLE, BLUE_SQUARE], unnamed)  # left out of both objects
    assert parse_caption(two) == {"background": background, "objects": [{**RED_CIRCLE, **blank}, {**BLUE_SQUARE, **blank}],
                                  "unnamed": unnamed}
    with pytest.raises(ValueError, match="leaves the"):
        render_caption(caption)


def test_parse_caption_inverts_underspecified_synth_captions() -> None:
    seen = set()
    for i in range(400):
        _, truth = render_sample(i, 16, seed=8, second_object_prob=0.5, underspecify=1.0)
        parsed, unnamed = parse_caption(truth["caption"]), truth["unnamed"]
        seen.add(unnamed)
        assert parsed["unnamed"] == unnamed
        assert parsed["background"] == (None if unnamed == "background" else truth["background"])
        assert parsed["objects"] == [
            {k: None if k == unnamed else o[k] for k in ("size", "colour", "shape", "position")} for o in truth["objects"]
        ]
        assert caption_for(parsed["background"], parsed["objects"], unnamed) == truth["caption"]
    assert seen == set(UNNAMEABLE)


@pytest.mark.parametrize("attribute", UNNAMEABLE)
def test_score_leaves_the_unnamed_attribute_unscored(clean_32, attribute: str) -> None:
    """Renders scored against their caption with one attribute changed: wrong when the caption
    names it, all right when the caption leaves that attribute unnamed (then it is None)."""
    rng = random.Random(attribute)
    for _, truth, predicted in clean_32[:200]:
        if not score(predicted, truth)["all"]:
            continue  # a misread render (<1 %)
        background, objects = change_one(truth, attribute, rng)
        named = score(predicted, parse_caption(caption_for(background, objects)))
        unnamed = score(predicted, parse_caption(caption_for(background, objects, attribute)))
        assert named[attribute] is False and named["all"] is False
        assert unnamed == {**{key: True for key in KEYS}, attribute: None}, (truth["caption"], unnamed)


def test_evaluate_and_table_score_named_attributes_only() -> None:
    image = render_caption("a small red circle at the top left on a navy background")
    captions = [
        "a small red circle at the top left on a navy background",
        "a small green circle at the top left on a navy background",  # the colour wrong
        "a small circle at the top left on a navy background",  # no colour named
    ]
    result = evaluate([image] * 3, captions)
    assert [s["correct"]["colour"] for s in result["per_sample"]] == [True, False, None]
    assert result["accuracy"]["colour"] == 0.5 and result["named"]["colour"] == 2
    assert result["accuracy"]["background"] == 1.0 and result["named"]["background"] == 3
    assert result["all_correct"] == pytest.approx(2 / 3)
    table = adherence_table(result)
    assert "| colour | 0.500 (n = 2) |" in table and "| background | 1.000 |" in table
    alone = evaluate([image], captions[2:])
    assert alone["accuracy"]["colour"] is None and alone["all_correct"] == 1.0
    assert "| colour | unnamed in every caption (n = 0) |" in adherence_table(alone)


def test_render_caption_is_synths_render() -> None:
    for resolution in (32, 64):
        for i in range(40):
            image, truth = render_sample(i, resolution, seed=3, second_object_prob=0.5)
            assert np.array_equal(np.asarray(image), np.asarray(render_caption(truth["caption"], resolution)))


# ----------------------------------------------------------------------------- analyse on renders


def test_clean_renders_at_32px(clean_32) -> None:
    results = [score(predicted, truth) for _, truth, predicted in clean_32]
    assert rates(results)["all"] >= 0.99, describe(results)
    # the matched template's box is synth's box
    for _, truth, predicted in clean_32[:100]:
        if score(predicted, truth)["all"]:
            assert sorted(o["bbox"] for o in predicted["objects"]) == sorted(o["bbox"] for o in truth["objects"])


def test_clean_renders_at_64px() -> None:
    results = []
    for i in range(120):
        image, truth = render_sample(i, 64, seed=202, second_object_prob=0.4)
        results.append(score(analyse(image), truth))
    assert rates(results)["all"] >= 0.99, describe(results)


def degrade(image: Image.Image, rng: np.random.Generator, sigma: float = 8.0, blur: float = 0.5) -> Image.Image:
    """A slightly blurred render with Gaussian pixel noise (``sigma`` in 0..255 units)."""
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float64)
    pixels = pixels + rng.normal(0.0, sigma, pixels.shape)
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


@pytest.mark.parametrize(("resolution", "count"), [(32, 300), (64, 80)])
def test_blurred_noisy_renders(resolution: int, count: int) -> None:
    rng = np.random.default_rng(0)
    results = []
    for i in range(count):
        image, truth = render_sample(i, resolution, seed=303, second_object_prob=0.25)
        results.append(score(analyse(degrade(image, rng)), truth))
    assert rates(results)["all"] >= 0.95, describe(results)


def test_analyse_accepts_other_modes_and_limits_objects() -> None:
    index = next(i for i in range(100) if len(render_sample(i, 32, seed=5, second_object_prob=1.0)[1]["objects"]) == 2)
    image, truth = render_sample(index, 32, seed=5, second_object_prob=1.0)
    expected = analyse(image)
    assert len(expected["objects"]) == 2 and score(expected, truth)["all"]
    assert analyse(image.convert("RGBA")) == expected
    one = analyse(image, expected_objects=1)
    assert one["objects"] == expected["objects"][:1]
    assert expected["objects"][0]["pixels"] >= expected["objects"][1]["pixels"]  # largest first
    with pytest.raises(ValueError, match="square"):
        analyse(image.crop((0, 0, 32, 30)))


def test_blank_image_scores_all_false() -> None:
    for name, rgb in BACKGROUNDS.items():
        blank = analyse(Image.new("RGB", (32, 32), rgb))
        assert blank == {"background": name, "objects": []}
        result = score(blank, {"background": name, "objects": [obj("red", "circle", "large", "center")]})
        assert result["background"] and not any(result[key] for key in (*ATTRIBUTES, "count", "all")), result


# ----------------------------------------------------------------------------- wrong renders


def change_one(truth: dict, attribute: str, rng: random.Random) -> tuple[str, list[dict]]:
    """``truth``'s scene with exactly one attribute of one object (or the background) changed."""
    background = truth["background"]
    objects = [{k: o[k] for k in ATTRIBUTES} for o in truth["objects"]]
    if attribute == "background":
        return rng.choice([b for b in BACKGROUNDS if b != background]), objects
    target = rng.randrange(len(objects))
    vocabulary = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES)}
    if attribute == "position":  # a position no object holds, so the pairing stays unambiguous
        choices = [p for p in POSITIONS if p not in {o["position"] for o in objects}]
    else:
        choices = [v for v in vocabulary[attribute] if v != objects[target][attribute]]
    objects[target][attribute] = rng.choice(choices)
    return background, objects


@pytest.mark.parametrize("attribute", ["background", *ATTRIBUTES])
def test_render_scored_against_a_caption_one_attribute_off(clean_32, attribute: str) -> None:
    rng = random.Random(attribute)
    flagged = others_right = 0
    for _, truth, predicted in clean_32[:300]:
        background, objects = change_one(truth, attribute, rng)
        result = score(predicted, parse_caption(caption_for(background, objects)))
        flagged += not result[attribute] and not result["all"]
        others_right += all(result[key] for key in SCORED if key != attribute)
    assert flagged / 300 >= 0.99, f"{attribute} changed but scored right in {300 - flagged}/300"
    assert others_right / 300 >= 0.99, (
        f"{attribute} changed but another attribute scored wrong in {300 - others_right}/300"
    )


# ----------------------------------------------------------------------------- score, evaluate, table


def obj(colour: str, shape: str, size: str, position: str) -> dict:
    return {"colour": colour, "shape": shape, "size": size, "position": position}


def test_score_pairs_objects_to_agree_most() -> None:
    a, b = obj("red", "circle", "small", "top left"), obj("blue", "cross", "small", "center")
    truth = {"background": "white", "objects": [a, b]}
    assert score({"background": "white", "objects": [b, a]}, truth) == {key: True for key in KEYS}

    wrong_shape = {"background": "white", "objects": [obj("blue", "square", "small", "center"), a]}
    assert score(wrong_shape, truth) == {**{key: True for key in KEYS}, "shape": False, "all": False}

    extra = {"background": "white", "objects": [a, b, obj("green", "square", "large", "top right")]}
    assert score(extra, truth) == {**{key: True for key in KEYS}, "count": False, "all": False}

    missing = score({"background": "black", "objects": [b]}, truth)
    assert not any(missing.values()), missing  # a's attributes all wrong, and the background
    # ties are broken the same way every time
    twins = {"background": "white", "objects": [obj("red", "circle", "small", "center")] * 2}
    assert score(twins, truth) == score(twins, truth)


def test_evaluate_and_table_on_a_hand_made_case() -> None:
    right = "a small red circle at the top left and a large blue square at the bottom right on a white background"
    colour_off = (
        "a small green circle at the top left and a large blue square at the bottom right on a white background"
    )
    one_object = "a large yellow cross at the center on a navy background"
    images = [render_caption(right), render_caption(right), Image.new("RGB", (32, 32), BACKGROUNDS["navy"])]
    result = evaluate(images, [right, colour_off, one_object])
    assert result["count"] == 3 and len(result["per_sample"]) == 3
    assert [s["correct"]["all"] for s in result["per_sample"]] == [True, False, False]
    assert result["per_sample"][1]["caption"] == colour_off
    assert result["per_sample"][2]["predicted"] == {"background": "navy", "objects": []}
    third = pytest.approx(1 / 3)
    expected = {"background": 1.0, "colour": third, "shape": 2 / 3, "size": 2 / 3, "position": 2 / 3, "count": 2 / 3}
    assert result["accuracy"] == pytest.approx(expected)
    assert result["all_correct"] == third

    table = adherence_table(result)
    lines = table.strip().splitlines()
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    assert re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[1])
    assert len(lines) == 2 + len(SCORED) + 1
    assert "| colour | 0.333 |" in table and "0.333" in lines[-1] and "n = 3" in lines[0]


def test_evaluate_rejects_bad_input() -> None:
    image = render_caption("a small red circle at the center on a gray background")
    with pytest.raises(ValueError, match="1 images but 2 captions"):
        evaluate([image], ["a", "b"])
    with pytest.raises(ValueError, match="outside the synthetic grammar"):
        evaluate([image], ["a red circle"])
    with pytest.raises(ValueError):
        evaluate([], [])


def test_by_object_count_splits_the_all_correct_rate():
    from pipeline.evaluation.adherence import by_object_count

    captions = [render_sample(i, 32, seed=5, second_object_prob=0.5)[1]["caption"] for i in range(40)]
    correct = [i % 3 == 0 for i in range(40)]
    result = {"per_sample": [{"correct": {"all": c}} for c in correct]}
    split = by_object_count(result, captions)
    for count in ("1", "2"):
        chosen = [c for c, cap in zip(correct, captions) if cap.count(" at the ") == int(count)]
        assert split[count] == sum(chosen) / len(chosen)
