"""One-to-many evaluation on the synthetic set: does a model draw the variety its training data had?

Adherence (``pipeline.evaluation.adherence``) rewards mode collapse: a consistency-distilled
student, or a teacher at high guidance, that draws the same image for every seed of a prompt
scores as well as one that draws a fresh image each time. Guidance trades diversity for fidelity
(Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"; Sadat et al. 2024, "CADS"), and few-step
distilled students lose diversity (Song et al. 2023, "Consistency Models"; Sauer et al. 2023,
"Adversarial Diffusion Distillation"). This module measures it where the answer is known.

An under-specified prompt leaves one attribute unnamed (synth's ``underspecify``: "a small circle
at the top left on a navy background" names no colour). For each prompt the model draws K images
(K seeds); the analyser reads the unnamed attribute in each: every object's colour, size or
position (each object of the caption is a *slot*, paired with the analyser's objects on the named
attributes), or the background (one slot). Each slot's K readings form a histogram p̂, compared
with the training distribution q of that attribute given the named ones:

- total-variation distance ``TV = ½ Σ_v |p̂(v) − q(v)|`` (0: the same; 1: disjoint);
- entropy ratio ``H(p̂) / H(q)`` (1: as varied as the data; 0: one value for every seed).

**Per prompt, then averaged.** A prompt's score is the mean over its slots; an attribute's (and
the overall) score is the mean over prompts. Per-prompt histograms from K seeds are the point:
a model that draws one colour for every seed of a prompt scores TV = 7/8 and entropy ratio 0
even when, pooled over prompts, its colours look uniform. ``pooled_tv`` (all the slots of one
attribute pooled into one histogram, against the mean of their q) is reported beside it, as the
diagnostic that cannot see that collapse.

**The training distribution** q is computed exactly from the grammar, not estimated: every way
to fill in the unnamed attribute is weighted by ``scene_probability``, the probability that
``synthetic.sample_scene`` draws that scene (given its object count), and normalised (Bayes).
So colours are uniform over ``COLOURS`` (never the novel ``mint``), backgrounds uniform, sizes
uniform except both "small" when one of two objects is at the center, and positions distinct and
uniform except that two small objects are more often at the center (P(center) = 4/11 per object).
Exact, so the metric carries no reference-set noise and needs no dataset; a test checks it
against a large draw of ``sample_scene``. It is the distribution of synth's default scenes: a
model trained on other data (another second-object probability changes nothing, as the object
count is named; a concept colour does) is compared with the grammar, not its own data.

**Finite K.** Even a perfect sampler's K-draw histogram is off: E[TV] > 0 and E[H(p̂)] < H(q)
(Miller 1955, "Note on the bias of information estimates"). Both expectations are exact sums
over categories of one binomial count each, so every score comes with ``tv_perfect`` and
``entropy_ratio_perfect`` (a perfect sampler at the same K on the same prompts) and
``tv_excess = tv − tv_perfect``. For the colour of one object at K = 16: tv_perfect = 0.253, entropy_ratio_perfect = 0.878.

**Unreadable images.** An object the analyser does not find reads ``UNREADABLE``: it counts in
``unreadable`` (fraction of object readings) and, in TV, as mass outside q's support; the entropy
is that of the readable draws (0 when none is readable). A background is always readable.

``evaluate_one_to_many(generate, prompts, k, seed)`` runs it on any model through a
``generate(prompts, seeds) -> images`` callable (``evaluate.pipeline_generator`` adapts a loaded
``TextToImage`` through ``evaluate.generate_images``); ``underspecified_prompts`` builds prompts.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable

from PIL import Image

from pipeline.evaluation.adherence import ATTRIBUTES, analyse, pair_objects, parse_caption
from pipeline.evaluation.synthetic import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, UNNAMEABLE, render_sample

UNREADABLE = "unreadable"  # the reading of a caption's object that the analyser does not find
VALUES: dict[str, tuple[str, ...]] = {  # what a default training scene can hold, per unnameable attribute
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}
Generate = Callable[[list[str], list[int]], list[Image.Image]]  # (prompts, seeds) -> one image each


# ----------------------------------------------------------------------------- training distribution


def scene_probability(background: str, objects: list[dict]) -> float:
    """P(scene | its object count) under ``synthetic.sample_scene``: distinct positions drawn in
    order, each object's colour, shape and size uniform (both "small" when two objects and one is
    at the center), the background uniform. 0 for a scene it cannot draw (e.g. a novel colour)."""
    positions = [o["position"] for o in objects]
    if len(set(positions)) < len(positions) or background not in BACKGROUNDS:
        return 0.0
    all_small = len(objects) == 2 and "center" in positions
    p = 1.0 / (len(BACKGROUNDS) * math.perm(len(POSITIONS), len(objects)))
    for o in objects:
        p *= (o["colour"] in COLOURS) / len(COLOURS) * (o["shape"] in SHAPES) / len(SHAPES)
        p *= float(o["size"] == "small") if all_small else (o["size"] in SIZES) / len(SIZES)
    return p


def completions(caption: str) -> list[tuple[float, str, list[dict]]]:
    """Every scene ``(probability, background, objects)`` an under-specified caption can describe in
    the training data, with the probability of each given the caption (they sum to 1)."""
    parsed = parse_caption(caption)
    unnamed, objects = parsed.get("unnamed"), parsed["objects"]
    if unnamed is None:
        raise ValueError(f"the caption names every attribute, so there is nothing to draw: {caption!r}")
    if unnamed == "background":
        scenes = [(background, objects) for background in VALUES["background"]]
    else:
        scenes = [
            (parsed["background"], [{**o, unnamed: v} for o, v in zip(objects, values)])
            for values in itertools.product(VALUES[unnamed], repeat=len(objects))
        ]
    weighted = [(scene_probability(b, objs), b, objs) for b, objs in scenes]
    total = sum(w for w, _, _ in weighted)
    if total == 0:
        raise ValueError(f"no training scene fits the caption (a novel colour? two objects at one place?): {caption!r}")
    return [(w / total, b, objs) for w, b, objs in weighted if w > 0]


def training_distribution(caption: str) -> list[dict[str, float]]:
    """The training distribution of the unnamed attribute given the caption, per slot: one per
    object in caption order, or one for the background. Keys: ``VALUES[unnamed]``."""
    unnamed = parse_caption(caption).get("unnamed")
    slots: list[dict[str, float]] = []
    for p, background, objects in completions(caption):
        values = [background] if unnamed == "background" else [o[unnamed] for o in objects]
        slots = slots or [dict.fromkeys(VALUES[unnamed], 0.0) for _ in values]
        for slot, value in zip(slots, values):
            slot[value] += p
    return slots


# ----------------------------------------------------------------------------- distances


def entropy(probabilities: Iterable[float]) -> float:
    """Shannon entropy in nats of a distribution (zero terms skipped)."""
    return -sum(p * math.log(p) for p in probabilities if p > 0)


def _binomial(k: int, p: float) -> list[float]:
    """P(X = x) for x = 0..k, X ~ Binomial(k, p), computed in log space."""
    if p <= 0.0 or p >= 1.0:
        return [float(x == (k if p >= 1.0 else 0)) for x in range(k + 1)]
    log_p, log_not_p, log_k = math.log(p), math.log1p(-p), math.lgamma(k + 1)
    return [
        math.exp(log_k - math.lgamma(x + 1) - math.lgamma(k - x + 1) + x * log_p + (k - x) * log_not_p)
        for x in range(k + 1)
    ]


def perfect_sampler(q: dict[str, float], k: int) -> tuple[float, float | None]:
    """(E[TV(p̂, q)], E[H(p̂)] / H(q)) for p̂ the histogram of ``k`` independent draws from ``q``:
    exact, since both are sums over values v of a function of one count X_v ~ Binomial(k, q_v).
    The ratio is None when H(q) = 0."""
    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k})")
    tv = h = 0.0
    for q_v in q.values():
        pmf = _binomial(k, q_v)
        tv += 0.5 * sum(w * abs(x / k - q_v) for x, w in enumerate(pmf))
        h -= sum(w * (x / k) * math.log(x / k) for x, w in enumerate(pmf) if x > 0)
    h_q = entropy(q.values())
    return tv, (h / h_q if h_q > 0 else None)


def slot_scores(q: dict[str, float], readings: list[str]) -> dict:
    """One slot's K readings against its training distribution ``q``: TV (``UNREADABLE`` readings
    are mass outside q), entropy ratio of the readable readings (0 when none is readable; None when
    H(q) = 0, nothing to vary), and what a perfect sampler would score at this K."""
    if not readings:
        raise ValueError("no readings for a slot")
    k, counts = len(readings), Counter(readings)
    readable = k - counts[UNREADABLE]
    tv = 0.5 * sum(abs(counts[v] / k - q.get(v, 0.0)) for v in set(q) | set(counts))
    h_q = entropy(q.values())
    h_gen = entropy(c / readable for v, c in counts.items() if v != UNREADABLE) if readable else 0.0
    tv_perfect, ratio_perfect = perfect_sampler(q, k)
    return {
        "training": {v: p for v, p in q.items() if p > 0},
        "generated": dict(sorted(counts.items())),
        "unreadable": counts[UNREADABLE],
        "tv": tv,
        "entropy_ratio": h_gen / h_q if h_q > 0 else None,
        "tv_perfect": tv_perfect,
        "entropy_ratio_perfect": ratio_perfect,
    }


# ----------------------------------------------------------------------------- reading and scoring


def read_unnamed(image: Image.Image, caption: str) -> list[str]:
    """The caption's unnamed attribute as the analyser reads it in ``image``, per slot: each
    object's (paired with the analyser's objects on the named attributes; ``UNREADABLE`` when it
    finds too few), or ``[background]``."""
    parsed = parse_caption(caption)
    unnamed = parsed.get("unnamed")
    if unnamed is None:
        raise ValueError(f"the caption names every attribute, so there is nothing to read: {caption!r}")
    predicted = analyse(image, expected_objects=len(parsed["objects"]))
    if unnamed == "background":
        return [predicted["background"]]
    named = tuple(a for a in ATTRIBUTES if a != unnamed)
    pairing = pair_objects(predicted["objects"], parsed["objects"], named)
    return [UNREADABLE if j is None else predicted["objects"][j][unnamed] for j in pairing]


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def prompt_scores(caption: str, readings: list[list[str]]) -> dict:
    """One prompt's K readings (``read_unnamed`` per image) scored per slot, and the slot means."""
    training = training_distribution(caption)
    if any(len(reading) != len(training) for reading in readings):
        raise ValueError(f"each reading needs {len(training)} values (one per slot) for {caption!r}")
    slots = [slot_scores(q, [r[s] for r in readings]) for s, q in enumerate(training)]
    result = {"prompt": caption, "unnamed": parse_caption(caption)["unnamed"], "k": len(readings), "slots": slots}
    for key in ("tv", "tv_perfect", "entropy_ratio", "entropy_ratio_perfect"):
        result[key] = _mean(slot[key] for slot in slots)
    return result


def _summarise(prompts: list[dict]) -> dict:
    """Means over prompts of their scores; ``unreadable``: the fraction of object readings."""
    slots = [slot for p in prompts for slot in p["slots"]]
    objects = [slot for p in prompts if p["unnamed"] != "background" for slot in p["slots"]]
    result = {key: _mean(p[key] for p in prompts) for key in ("tv", "tv_perfect", "entropy_ratio", "entropy_ratio_perfect")}
    result["tv_excess"] = result["tv"] - result["tv_perfect"]
    readings = sum(sum(slot["generated"].values()) for slot in objects)
    result["unreadable"] = sum(slot["unreadable"] for slot in objects) / readings if readings else 0.0
    result |= {"prompts": len(prompts), "slots": len(slots), "images": sum(p["k"] for p in prompts)}
    return result


def _pooled_tv(prompts: list[dict]) -> float:
    """TV between the pooled histogram of every slot's readings and the mean of their q."""
    generated, training, total = Counter(), Counter(), 0
    for slot in (slot for p in prompts for slot in p["slots"]):
        generated.update(slot["generated"])
        k = sum(slot["generated"].values())
        training.update({v: p * k for v, p in slot["training"].items()})
        total += k
    return 0.5 * sum(abs(generated[v] - training[v]) / total for v in set(generated) | set(training))


def compare(prompts: list[str], readings: list[list[list[str]]]) -> dict:
    """Score ``readings[i]`` (K ``read_unnamed`` results for ``prompts[i]``): ``{"k", "overall",
    "by_attribute": {unnamed: {... , "pooled_tv"}}, "per_prompt": [...]}``, each summary holding
    tv, tv_perfect, tv_excess, entropy_ratio, entropy_ratio_perfect, unreadable and the prompt, slot
    and image counts."""
    if len(prompts) != len(readings) or not prompts:
        raise ValueError(f"need readings for each of the prompts (got {len(readings)} for {len(prompts)} prompts)")
    if len({len(rows) for rows in readings}) != 1:
        raise ValueError(f"every prompt needs the same number K of readings (got {sorted({len(r) for r in readings})})")
    per_prompt = [prompt_scores(caption, rows) for caption, rows in zip(prompts, readings)]
    by_attribute = {}
    for attribute in UNNAMEABLE:
        group = [p for p in per_prompt if p["unnamed"] == attribute]
        if group:
            by_attribute[attribute] = {**_summarise(group), "pooled_tv": _pooled_tv(group)}
    return {"k": per_prompt[0]["k"], "overall": _summarise(per_prompt), "by_attribute": by_attribute, "per_prompt": per_prompt}


def score_one_to_many(prompts: list[str], images: list[list[Image.Image]]) -> dict:
    """``compare`` on the analyser's readings of ``images[i]``, the K images drawn for ``prompts[i]``."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    for caption in prompts:  # a bad prompt fails before any image is read
        training_distribution(caption)
    return compare(prompts, [[read_unnamed(image, caption) for image in draws] for caption, draws in zip(prompts, images)])


# ----------------------------------------------------------------------------- running a model


def underspecified_prompts(count: int, seed: int, attributes: tuple[str, ...] = UNNAMEABLE,
                           second_object_prob: float = 0.25) -> list[str]:
    """The captions of synth samples ``0..count-1`` with ``seed``, each leaving one of ``attributes``
    unnamed (``render_sample(..., underspecify=1.0)``; default scenes, so no novel colour)."""
    if count < 1:
        raise ValueError(f"count must be >= 1 (got {count})")
    if not attributes or any(a not in UNNAMEABLE for a in attributes):
        raise ValueError(f"attributes must be some of {UNNAMEABLE} (got {attributes!r})")
    return [
        render_sample(i, 8, seed, second_object_prob, underspecify=1.0, unnameable=tuple(attributes))[1]["caption"]
        for i in range(count)
    ]


def evaluate_one_to_many(generate: Generate, prompts: list[str], k: int, seed: int = 0) -> dict:
    """Draw ``k`` images of each prompt with ``generate(prompts, seeds)`` — prompt i's draw j uses
    seed ``seed + i·k + j``, one call for all — and score them (``score_one_to_many``); the result
    also records ``seed``."""
    if k < 2:
        raise ValueError(f"k must be >= 2 seeds per prompt to see any diversity (got {k})")
    if not prompts:
        raise ValueError("no prompts")
    for caption in prompts:  # fail on a bad prompt before generating
        training_distribution(caption)
    flat = [caption for caption in prompts for _ in range(k)]
    images = generate(flat, list(range(seed, seed + len(flat))))
    if len(images) != len(flat):
        raise ValueError(f"generate returned {len(images)} images for {len(flat)} prompts")
    return {**score_one_to_many(prompts, [images[i * k:(i + 1) * k] for i in range(len(prompts))]), "seed": seed}


def one_to_many_table(result: dict) -> str:
    """The per-attribute and overall scores of a ``compare`` result as a Markdown table."""

    def cell(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    header = ("| unnamed attribute | prompts | TV (perfect sampler) | entropy ratio (perfect sampler) | pooled TV "
              f"| unreadable (K = {result['k']}) |")
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    rows = [*result["by_attribute"].items(), ("**all**", result["overall"])]
    for name, s in rows:
        lines.append(
            f"| {name} | {s['prompts']} | {cell(s['tv'])} ({cell(s['tv_perfect'])}) | "
            f"{cell(s['entropy_ratio'])} ({cell(s['entropy_ratio_perfect'])}) | {cell(s.get('pooled_tv'))} | "
            f"{cell(s['unreadable'])} |"
        )
    return "\n".join(lines) + "\n"
