"""Tests of ``pipeline.evaluation.one_to_many``: the training distribution of an unnamed attribute,
the finite-K expectations, and the scores of a perfect, a collapsed and an unreadable sampler."""

from __future__ import annotations

import math
import random
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipeline.evaluation.adherence import parse_caption, render_caption
from pipeline.evaluation.evaluate import pipeline_generator
from pipeline.evaluation.one_to_many import (
    UNREADABLE,
    Generate,
    compare,
    completions,
    evaluate_one_to_many,
    one_to_many_table,
    perfect_sampler,
    read_unnamed,
    slot_scores,
    training_distribution,
    underspecified_prompts,
)
from pipeline.evaluation.synthetic import BACKGROUNDS, COLOURS, POSITIONS, UNNAMEABLE, caption_for, sample_scene

K = 16
PROMPT_SEED = 2027
# 6 prompts per unnamed attribute (20 of the 24 name two objects): the perfect-sampler test set
PROMPTS = [c for a in UNNAMEABLE for c in underspecified_prompts(6, PROMPT_SEED, (a,), second_object_prob=0.5)]


def truth_sampler(seeded: bool = True, resolution: int = 32) -> Generate:
    """A model that draws the training distribution exactly: each image a clean render of one
    completion of the prompt, drawn with ``random.Random(seed)``. ``seeded=False``: the same draw
    for every seed of a prompt (the same noise for every seed — a collapsed sampler)."""

    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        images = []
        for prompt, seed in zip(prompts, seeds):
            scenes = completions(prompt)
            rng = random.Random(seed if seeded else prompt)
            _, background, objects = rng.choices(scenes, weights=[p for p, _, _ in scenes])[0]
            images.append(render_caption(caption_for(background, objects), resolution))
        return images

    return generate


# ----------------------------------------------------------------------------- training distribution


def test_training_distribution_closed_forms() -> None:
    colour = training_distribution("a small circle at the top left on a navy background")
    assert colour == [pytest.approx(dict.fromkeys(COLOURS, 1 / 8))]  # never the novel mint
    background = training_distribution("a small red circle at the top left and a large blue square at the bottom right")
    assert background == [pytest.approx(dict.fromkeys(BACKGROUNDS, 1 / 7))]
    one = training_distribution("a red circle at the top left on a navy background")
    assert one == [pytest.approx({"small": 0.5, "large": 0.5})]
    centre = training_distribution("a red circle at the center and a blue square at the top left on a white background")
    assert centre == [{"small": 1.0, "large": 0.0}] * 2  # two objects, one at the center: both small
    assert training_distribution("a small red circle on a white background") == [pytest.approx(dict.fromkeys(POSITIONS, 0.2))]
    # two small objects: the 8 ordered pairs holding the center weigh 1, the 12 others (1/2)² each
    small = training_distribution("a small red circle and a small blue square on a white background")
    corners = {p: 7 / 44 for p in POSITIONS if p != "center"}
    assert small == [pytest.approx({**corners, "center": 4 / 11})] * 2
    large = training_distribution("a large red circle and a small blue square on a white background")
    assert large == [pytest.approx({**{p: 1 / 4 for p in corners}, "center": 0.0})] * 2
    assert sum(p for p, _, _ in completions("a large red circle and a small blue square on a white background")) == pytest.approx(1)


def test_training_distribution_rejects_what_has_no_distribution() -> None:
    with pytest.raises(ValueError, match="names every attribute"):
        training_distribution("a small red circle at the top left on a navy background")
    with pytest.raises(ValueError, match="no training scene fits"):
        training_distribution("a mint circle at the center on a white background")  # a novel colour
    with pytest.raises(ValueError, match="outside the synthetic grammar"):
        training_distribution("a circle on a white background")


@pytest.mark.parametrize("unnamed", ["position", "size"])
def test_training_distribution_is_sample_scenes_conditional(unnamed: str) -> None:
    """Among 8000 ``sample_scene`` draws, those whose caption gets the same q (per slot) hold each
    value of the unnamed attribute with frequency q, within 5 binomial standard errors. The
    unconditional distribution would fail: two small objects are at the center 4/11 of the time, not 1/5."""
    groups: dict[tuple, Counter] = {}
    for i in range(8000):
        background, objects = sample_scene(random.Random(f"calibration:{i}"), 0.5)
        for slot, (q, obj) in enumerate(zip(training_distribution(caption_for(background, objects, unnamed)), objects)):
            groups.setdefault((slot, tuple(sorted(q.items()))), Counter())[obj[unnamed]] += 1
    assert len(groups) >= 3  # e.g. position: one object; two small; one large of two
    for (_, q), counts in groups.items():
        n = sum(counts.values())
        for value, p in q:
            assert abs(counts[value] / n - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12, (q, counts)


# ----------------------------------------------------------------------------- distances


def test_perfect_sampler_expectations() -> None:
    uniform = dict.fromkeys(COLOURS, 1 / 8)
    assert perfect_sampler(uniform, 1) == pytest.approx((7 / 8, 0.0))  # one draw: one value
    assert perfect_sampler({"small": 1.0, "large": 0.0}, 16) == (0.0, None)  # nothing to vary
    tv, ratio = perfect_sampler(uniform, K)
    assert (tv, ratio) == pytest.approx((0.2530, 0.8781), abs=1e-4)
    # against 20000 simulated K-draw histograms (standard error of the mean about 0.0005)
    counts = np.random.default_rng(0).multinomial(K, [1 / 8] * 8, size=20000) / K  # (20000, 8)
    logs = np.log(np.where(counts > 0, counts, 1.0))
    assert 0.5 * np.abs(counts - 1 / 8).sum(1).mean() == pytest.approx(tv, abs=0.003)
    assert (-(counts * logs).sum(1) / math.log(8)).mean() == pytest.approx(ratio, abs=0.003)
    with pytest.raises(ValueError, match="k must be >= 1"):
        perfect_sampler(uniform, 0)


def test_slot_scores_by_hand() -> None:
    q = {"small": 0.5, "large": 0.5}
    even = slot_scores(q, ["small", "large", "large", "small"])
    assert (even["tv"], even["entropy_ratio"], even["unreadable"]) == (0.0, 1.0, 0)
    # 3 small + 1 unreadable: ½(|¾ − ½| + |0 − ½| + |¼ − 0|) = ½; the readable draws do not vary
    lost = slot_scores(q, ["small", "small", "small", UNREADABLE])
    assert (lost["tv"], lost["entropy_ratio"], lost["unreadable"]) == (0.5, 0.0, 1)
    assert lost["generated"] == {"small": 3, UNREADABLE: 1}
    nothing = slot_scores(q, [UNREADABLE] * 4)
    assert (nothing["tv"], nothing["entropy_ratio"]) == (1.0, 0.0)
    assert slot_scores({"small": 1.0, "large": 0.0}, ["large", "small"])["entropy_ratio"] is None


def test_per_prompt_collapse_that_pooling_hides() -> None:
    """64 one-object colour prompts; each draws one colour for all K seeds, the colours cycling
    over the prompts: pooled, the colours are exactly uniform, per prompt the TV is 7/8."""
    prompts = ["a small circle at the top left on a navy background"] * 64
    collapsed = [[[colour]] * K for colour in list(COLOURS) * 8]  # prompt i: K readings of one slot
    result = compare(prompts, collapsed)["by_attribute"]["colour"]
    assert result["pooled_tv"] == pytest.approx(0.0, abs=1e-12)
    assert result["tv"] == pytest.approx(7 / 8) and result["entropy_ratio"] == 0.0
    assert result["tv_excess"] == pytest.approx(7 / 8 - 0.2530, abs=1e-4)
    diverse = [[[colour] for colour in list(COLOURS) * 2]] * 64  # each prompt: every colour twice
    result = compare(prompts, diverse)["by_attribute"]["colour"]
    assert (result["tv"], result["entropy_ratio"], result["pooled_tv"]) == pytest.approx((0.0, 1.0, 0.0), abs=1e-12)


# ----------------------------------------------------------------------------- on images


@pytest.fixture(scope="module")
def perfect() -> dict:
    return evaluate_one_to_many(truth_sampler(), PROMPTS, K, seed=100)


def test_a_perfect_sampler_scores_like_one(perfect) -> None:
    """Renders of the training distribution, read back by the analyser at 32 px. Expected for
    these 24 prompts at K = 16 (exact): TV 0.1845, entropy ratio 0.9031; over 3000 simulated
    perfect samplers their standard deviations are 0.012 and 0.012, so 0.05 is a 4-sigma band."""
    overall = perfect["overall"]
    assert (overall["tv_perfect"], overall["entropy_ratio_perfect"]) == pytest.approx((0.1845, 0.9031), abs=1e-4)
    assert overall["tv"] == pytest.approx(0.1845, abs=0.05), overall
    assert overall["entropy_ratio"] == pytest.approx(0.9031, abs=0.05), overall
    assert overall["unreadable"] == 0.0
    assert (overall["prompts"], overall["images"]) == (24, 24 * K)
    assert set(perfect["by_attribute"]) == set(UNNAMEABLE) and perfect["k"] == K and perfect["seed"] == 100
    for attribute, scores in perfect["by_attribute"].items():  # 6 prompts each: a looser band
        assert scores["tv_excess"] <= 0.1, (attribute, scores)


def test_a_collapsed_sampler_scores_badly(perfect) -> None:
    """The same noise for every seed: each prompt's K images are one image. Its TV is
    mean(1 − q(v)) — 0.687 expected for these prompts — and its entropy ratio exactly 0."""
    collapsed = evaluate_one_to_many(truth_sampler(seeded=False), PROMPTS, K, seed=100)["overall"]
    assert collapsed["entropy_ratio"] == 0.0
    assert collapsed["tv"] >= 0.55 and collapsed["tv"] - perfect["overall"]["tv"] >= 0.35, collapsed
    assert collapsed["tv_perfect"] == perfect["overall"]["tv_perfect"]  # the same prompts, the same K


def test_unreadable_images_are_counted() -> None:
    prompts = [
        "a small circle at the top left on a navy background",
        "a small red circle and a large blue square on a white background",
        "a large red circle at the top left",
    ]
    blank = [Image.new("RGB", (32, 32), BACKGROUNDS["navy"])] * (len(prompts) * 4)
    result = evaluate_one_to_many(lambda p, s: blank, prompts, 4)
    assert result["by_attribute"]["colour"]["unreadable"] == 1.0 and result["by_attribute"]["colour"]["tv"] == 1.0
    assert result["by_attribute"]["position"]["unreadable"] == 1.0
    assert result["by_attribute"]["background"]["unreadable"] == 0.0  # a background is always read
    assert result["per_prompt"][2]["slots"][0]["generated"] == {"navy": 4}
    assert result["overall"]["unreadable"] == 1.0  # 3 object readings of 3 found nothing
    # one of two objects drawn: that slot unreadable, the other read
    one_of_two = render_caption("a small red circle at the top left on a white background")
    assert read_unnamed(one_of_two, "a small red circle and a small blue square on a white background") == [
        "top left", UNREADABLE]


def test_evaluate_one_to_many_seeds_and_errors() -> None:
    calls = []

    def recording(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        calls.append((prompts, seeds))
        return truth_sampler()(prompts, seeds)

    prompts = PROMPTS[:2]
    evaluate_one_to_many(recording, prompts, 3, seed=7)
    assert calls == [([prompts[0]] * 3 + [prompts[1]] * 3, [7, 8, 9, 10, 11, 12])]  # prompt i, draw j: seed + 3i + j
    with pytest.raises(ValueError, match="k must be >= 2"):
        evaluate_one_to_many(recording, prompts, 1)
    with pytest.raises(ValueError, match="names every attribute"):
        evaluate_one_to_many(recording, ["a small red circle at the center on a white background"], 2)
    with pytest.raises(ValueError, match="returned 1 images for 4 prompts"):
        evaluate_one_to_many(lambda p, s: truth_sampler()(p, s)[:1], prompts, 2)
    with pytest.raises(ValueError, match="consecutive"):
        pipeline_generator(None, 2, 4.0)(prompts, [0, 2])
    assert len(calls) == 1  # no generation for bad input


def test_underspecified_prompts() -> None:
    prompts = underspecified_prompts(40, 3)
    assert prompts == underspecified_prompts(40, 3) != underspecified_prompts(40, 4)
    assert {parse_caption(p)["unnamed"] for p in prompts} == set(UNNAMEABLE)
    assert {parse_caption(p)["unnamed"] for p in underspecified_prompts(20, 3, ("size", "colour"))} == {"size", "colour"}
    for bad in ((), ("shape",)):
        with pytest.raises(ValueError, match="attributes must be some of"):
            underspecified_prompts(4, 3, bad)
    with pytest.raises(ValueError, match="count must be >= 1"):
        underspecified_prompts(0, 3)


def test_one_to_many_table(perfect) -> None:
    table = one_to_many_table(perfect)
    lines = table.strip().splitlines()
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    assert re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[1])
    assert len(lines) == 2 + len(UNNAMEABLE) + 1 and "K = 16" in lines[0]
    overall = perfect["overall"]
    assert lines[-1].startswith("| **all** | 24 |") and f"{overall['tv']:.3f} ({overall['tv_perfect']:.3f})" in lines[-1]


def test_compare_rejects_misshapen_readings() -> None:
    prompt = "a small red circle and a small blue square on a white background"  # two slots
    with pytest.raises(ValueError, match="needs 2 values"):
        compare([prompt], [[["center"]] * 4])
    with pytest.raises(ValueError, match="same number K"):
        compare([prompt, prompt], [[["center", "top left"]] * 4, [["center", "top left"]] * 3])
    with pytest.raises(ValueError, match="readings for each of the prompts"):
        compare([prompt], [])
