"""``python -m pipeline.evaluate --model DIR --prompts FILE|--reference SHARDS --steps N [N …] --guidance G [G …] --output DIR``

Text-to-image evaluation of an exported teacher or student. It generates one image per prompt
with fixed per-image seeds (image k uses seed + k, whatever the batch size), in batches with a
progress bar, then scores them:

- adherence: the deterministic analyser of the synthetic set (``pipeline.evaluation.adherence``), when
  every prompt is a caption of its grammar;
- FID and KID against reference images, with the FID Inception weights given by
  ``--inception`` (nothing is downloaded; without it these metrics are skipped, and the
  summary says why);
- CLIP score with an open_clip model: ``--clip FOLDER`` or ``--clip-model NAME
  --clip-checkpoint FILE``;
- diversity (``pipeline.evaluation.diversity``) in each feature space given — Inception-2048
  (``--inception``) and DINOv2 (``--dinov2 FOLDER``, a transformers ``Dinov2Model`` folder): the
  Vendi score of the generated set, and against the reference images precision / recall (k = 3),
  density / coverage (k = 5), and the Fréchet distance of each space (FD_DINOv2 in DINOv2's;
  in pixels, a weight-free FD to compare samplers by offline). Features are
  extracted once per image set (the reference set once for every cell). ``--pixels`` adds a
  weight-free space, 16×16 RGB pixels, meaningful on the flat-coloured synthetic set (the demo's);
- one-to-many (``--one-to-many K``, ``pipeline.evaluation.one_to_many``): K seeds for each of
  ``--one-to-many-prompts`` under-specified synthetic prompts, the unnamed attribute's
  distribution against the training grammar's (total variation, entropy ratio), which sees the
  mode collapse that adherence rewards.

Outputs in ``--output``: ``images/NNNNN.png``, ``per_prompt.jsonl``, ``summary.json``,
``report.md`` and ``grid.png``. Several ``--steps`` evaluate each in turn with the model loaded
once; ``--output`` then names ``{steps}`` (``runs/eval/teacher_{steps}``). Several ``--guidance``
values make a guidance × steps sweep: ``--output`` names ``{guidance}`` too, and ``--sweep DIR``
(default ``sweep/`` beside the cells) gets ``sweep.json``, ``sweep.md`` and ``sweep.png``, the
fidelity–diversity curves (``pipeline.evaluation.sweep``); teacher and student runs that share it
come side by side. A scale outside a student's exported ``guidance_range`` is warned about.

``--sampler NAME`` and its knobs (``--noise-scale``, ``--snr``, ``--corrector-steps``, ``--gamma``,
``--renoise-times``/``--renoise-sigmas``; ``pipeline.inference.pipeline.add_sampler_args``) sample
with another sampler that fits the model; ``summary.json`` records the sampler, its options and the
model evaluations per image (``nfe``), and ``--output`` may name ``{sampler}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from pipeline.config.cli import add_size_args, image_size, shift_arg
from pipeline.config.source import is_url
from pipeline.data.images import image_to_tensor
from pipeline.data.jsonl import read_jsonl
from pipeline.encoders.common import EncoderLoadError
from pipeline.encoders.locations import add_encoder_args, encoder_paths
from pipeline.data.model_folder import read_model_info
from pipeline.evaluation import sweep
from pipeline.evaluation.adherence import by_object_count
from pipeline.evaluation.diversity import K_DENSITY_COVERAGE, diversity
from pipeline.evaluation.features import FeatureExtractor, extract, load_extractor
from pipeline.evaluation.metrics import MetricError
from pipeline.evaluation.one_to_many import Generate, evaluate_one_to_many, one_to_many_table, underspecified_prompts
from pipeline.evaluation.synthetic import UNNAMEABLE, parse_attributes
from pipeline.diffusion.stochastic import KNOBS, SamplerOptions
from pipeline.inference.pipeline import TextToImage, add_sampler_args, sampler_from_args
from pipeline.figures.sheets import write_sheet
from pipeline.timing import clock

PROG = "pipeline.evaluate"
PROMPT_KEYS = ("prompt", "caption", "text")


class EvalInputError(ValueError):
    """Bad evaluation input (prompt file, reference shards); the message names it."""


# ---------------------------------------------------------------------------------------- prompts
def _pick_key(row: dict, where: str) -> str:
    for key in PROMPT_KEYS:
        if isinstance(row.get(key), str):
            return row[key]
    raise EvalInputError(f"{where}: no string field named one of {PROMPT_KEYS}")


def read_prompts(path: Path) -> list[str]:
    """Prompts from a .txt (one per line), .jsonl or .parquet (a prompt/caption/text field)."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"prompt file not found: '{path}'")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        prompts = [_pick_key(row, f"{path} row {i + 1}") for i, row in enumerate(pq.read_table(path).to_pylist())]
    elif suffix == ".jsonl":
        try:
            rows = read_jsonl(path)
        except ValueError as err:
            raise EvalInputError(str(err)) from None
        prompts = [_pick_key(row, f"{path}:{n}") if isinstance(row, dict) else str(row) for n, row in rows]
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise EvalInputError(f"no prompts in '{path}'")
    return prompts


def read_reference(shards: str | Path, count: int | None) -> tuple[list[Image.Image], list[str]]:
    """The first ``count`` decodable (image, caption) pairs of image shards (ours or img2dataset's):
    a folder, its URL or a URL pattern (``pipeline.data.remote``)."""
    from pipeline.data.images import decode_image
    from pipeline.data.latents import shard_list
    from pipeline.data.shards import iter_samples

    try:
        urls = shard_list(shards)
    except (OSError, ValueError) as err:
        if not is_url(str(shards)) and not Path(shards).exists():
            raise EvalInputError(f"reference shards not found: '{shards}'") from None
        raise EvalInputError(f"reference shards '{shards}': {err}") from err
    images, captions = [], []
    for raw in iter_samples(urls):
        decoded = decode_image(raw)  # an undecodable reference image is skipped, as the shard reader does
        if decoded is None:
            continue
        images.append(decoded[0])
        captions.append(decoded[1])
        if count is not None and len(images) >= count:
            break
    if not images:
        raise EvalInputError(f"no decodable images in reference shards '{shards}'")
    return images, captions


# ------------------------------------------------------------------------------------- generation
def generate_images(pipe: TextToImage, prompts: list[str], steps: int, guidance: float, shift: float | str = 1.0,
                    seed: int = 0, batch_size: int = 16, desc: str = "generate",
                    size: tuple[int, int] | None = None, sampler: str | None = None,
                    options: SamplerOptions | None = None) -> tuple[list[Image.Image], dict]:
    """One image per prompt (image k from seed + k alone — its starting noise and a student's fresh
    noise — whatever ``batch_size``; ``size`` (width, height), default the model's), and wall
    seconds per image: in all (``seconds_per_image``) and for each part — text encoding,
    the sampler, VAE decoding. ``sampler``/``options``: ``TextToImage.sample``'s (None: the folder's).

    A one-prompt, one-step call runs first, untimed (warm-up), so times are steady-state. Each
    batch is encoded and decoded in one call each (decoding with the pipeline's preview decoder
    when it has one), all under ``torch.inference_mode``."""
    shape = pipe.latent_shape_for(size)
    images, parts = [], {"text": 0.0, "sampler": 0.0, "decode": 0.0}
    with torch.inference_mode():
        pipe.latents(prompts[:1], 1, guidance, shift, seed, pipe.noise(1, seed, shape), sampler=sampler)  # default knobs: 1 step
        pipe.decode(pipe.noise(1, seed, shape))
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", leave=False):
            batch = prompts[start:start + batch_size]
            seeds = list(range(seed + start, seed + start + len(batch)))
            noise = pipe.noise_per_image(seeds, shape)
            t0 = clock()
            cond = pipe.text.encode(batch)
            t1 = clock()
            latents = pipe.sample(cond, noise, steps, guidance, shift, seeds, sampler=sampler, options=options)  # every draw from seed + k
            t2 = clock()
            images += pipe.images(latents)
            t3 = clock()
            for part, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                parts[part] += seconds
    timing = {f"{part}_seconds_per_image": seconds / len(prompts) for part, seconds in parts.items()}
    timing["seconds_per_image"] = sum(parts.values()) / len(prompts)
    return images, timing


# ----------------------------------------------------------------------------------------- scores
def adherence_or_reason(images: list[Image.Image], prompts: list[str]) -> tuple[dict | None, str | None]:
    from pipeline.evaluation.adherence import evaluate, parse_caption

    try:
        for prompt in prompts:
            parse_caption(prompt)
    except ValueError as err:
        return None, f"prompts outside the synthetic caption grammar ({err})"
    return evaluate(images, prompts), None


def score(images: list[Image.Image], prompts: list[str], args: argparse.Namespace, device: str) -> dict:
    """All the metrics the arguments ask for; a skipped one gets a reason in ``skipped``."""
    result: dict = {"skipped": {}}
    if not args.adherence:
        result["adherence"], reason = None, "--no-adherence"
    elif images and images[0].width != images[0].height:
        result["adherence"], reason = None, "the synthetic-set analyser reads square images (--width/--height differ)"
    else:
        result["adherence"], reason = adherence_or_reason(images, prompts)
    if reason:
        result["skipped"]["adherence"] = reason
    else:
        result["adherence_by_objects"] = by_object_count(result["adherence"], prompts)
        result["vae_ceiling"] = getattr(args, "vae_ceiling", None)
    clip = clip_config(args)
    if clip is None:
        result["skipped"]["clip_score"] = "no CLIP model given (--clip or --clip-model/--clip-checkpoint)"
    else:
        from pipeline.evaluation.metrics import ClipScorer

        scorer = ClipScorer(clip, device)
        result["clip_scores"] = torch.cat([scorer(images[i:i + 64], prompts[i:i + 64])
                                           for i in range(0, len(images), 64)]).tolist()
        result["clip_source"] = scorer.source
    fake = {name: extract(ex, images, desc=f"{name} (generated)") for name, ex in getattr(args, "extractors", {}).items()}
    real = getattr(args, "reference_features", {})
    if args.inception is None:
        result["skipped"]["fid_kid"] = "no Inception weights given (--inception FILE): FID and KID not computed"
    elif args.reference_images is None:
        result["skipped"]["fid_kid"] = "no reference images (--reference SHARDS): FID and KID not computed"
    else:
        from pipeline.evaluation.metrics import fid_kid

        result["fid_kid"] = fid_kid(real["inception"], fake["inception"], args.kid_subset)
    result["diversity"], reason = diversity_scores(getattr(args, "extractors", {}), real, fake, device)
    if reason:
        result["skipped"]["diversity"] = reason
    return result


def diversity_scores(extractors: dict[str, FeatureExtractor], real: dict[str, torch.Tensor],
                     fake: dict[str, torch.Tensor], device: str = "cpu") -> tuple[dict, str | None]:
    """Per feature space: the Vendi score, and with reference features (more than k of each set)
    precision / recall / density / coverage and the Fréchet distance (``fd``; FD_DINOv2 in DINOv2's
    space); a reason for what is left out."""
    from pipeline.evaluation.metrics import frechet_distance

    if not extractors:
        return {}, "no feature extractor given (--inception FILE, --dinov2 FOLDER or --pixels): no diversity metrics"
    reason, blocks = None, {}
    for name, extractor in extractors.items():
        reference = real.get(name)
        if reference is None:
            reason = "no reference images (--reference SHARDS): only the Vendi score (no precision/recall/density/coverage)"
        elif min(len(reference), len(fake[name])) <= K_DENSITY_COVERAGE:
            reason = (f"k-NN metrics need more than {K_DENSITY_COVERAGE} images per set (got {len(fake[name])} generated, "
                      f"{len(reference)} reference): only the Vendi score")
            reference = None
        on_device = None if reference is None else reference.to(device)  # the k-NN blocks run where the model ran
        blocks[name] = {"features": name, "source": extractor.source, "dim": extractor.dim,
                        **diversity(on_device, fake[name].to(device))}
        if reference is not None:
            blocks[name]["fd"] = frechet_distance(reference, fake[name])
    return blocks, reason


def load_features(args: argparse.Namespace, device: str) -> None:
    """Sets ``args.extractors`` (each feature space asked for, loaded once) and
    ``args.reference_features`` (the reference images' features, extracted once)."""
    paths = {"inception": args.inception, "dinov2": args.dinov2, "pixels": "" if args.pixels else None}
    args.extractors = {name: load_extractor(name, path, device) for name, path in paths.items() if path is not None}
    args.reference_features = {}
    if args.reference_images is not None:
        args.reference_features = {name: extract(ex, args.reference_images, desc=f"{name} (reference)")
                                   for name, ex in args.extractors.items()}


def clip_config(args: argparse.Namespace):
    from pipeline.encoders.clip import ClipEncoderConfig

    if args.clip is None and args.clip_model is None:
        return None
    return ClipEncoderConfig(path=args.clip, model=args.clip_model, checkpoint=args.clip_checkpoint)


# ---------------------------------------------------------------------------------------- outputs
def summarise(scores: dict, args: argparse.Namespace, count: int, timing: dict, steps: int, guidance: float) -> dict:
    summary = {
        "model": str(args.model), "steps": steps, "guidance": guidance, "shift": args.shift,
        "seed": args.seed, "count": count, **timing, "skipped": scores["skipped"],
        "decoder": "tiny" if getattr(args, "preview_decoder", False) else "vae",  # previews score previews
    }
    if getattr(args, "sampler_name", None) is not None:
        summary |= {"sampler": args.sampler_name, "sampler_options": sampler_record(args.sampler_name, args.sampler_options),
                    "nfe": args.nfe(steps, guidance)}
    if scores.get("adherence"):
        summary["adherence_all"] = scores["adherence"]["all_correct"]
        summary["adherence_by_objects"] = scores["adherence_by_objects"]
        summary["adherence"] = scores["adherence"]["accuracy"]
    if scores.get("vae_ceiling"):
        summary["adherence_vae_ceiling"] = scores["vae_ceiling"]
    if "clip_scores" in scores:
        summary["clip_score"] = sum(scores["clip_scores"]) / count
        summary["clip_model"] = scores["clip_source"]
    if "fid_kid" in scores:
        summary.update(scores["fid_kid"])
        summary["reference_count"] = len(args.reference_images)
    if scores.get("diversity"):
        summary["diversity"] = scores["diversity"]
    if scores.get("one_to_many"):
        o2m = scores["one_to_many"]
        summary["one_to_many"] = {k: v for k, v in o2m.items() if k != "per_prompt"} | {"prompt_seed": args.one_to_many_seed}
        summary |= {f"one_to_many_{k}": o2m["overall"][k] for k in ("tv", "tv_perfect", "tv_excess", "entropy_ratio", "unreadable")}
    bounds = sweep.outside_range(getattr(args, "model_info", None), guidance)
    if bounds:
        summary["outside_guidance_range"] = bounds
    return summary


def sampler_record(sampler: str, options: SamplerOptions) -> dict:
    """The knobs ``sampler`` reads, with their values (``pipeline.diffusion.stochastic.KNOBS``)."""
    return {knob: (list(value) if isinstance(value, tuple) else value)
            for knob in KNOBS[sampler] if (value := getattr(options, knob)) is not None}


def pipeline_generator(pipe: TextToImage, steps: int, guidance: float, shift: float | str = 1.0,
                       batch_size: int = 16, size: tuple[int, int] | None = None, sampler: str | None = None,
                       options: SamplerOptions | None = None) -> Generate:
    """A ``Generate`` over a loaded ``TextToImage``, through ``evaluate.generate_images`` (image m
    from seed + m alone, whatever the batch), so the one-to-many images are drawn as every
    evaluation draws them. The seeds must be consecutive, as ``evaluate_one_to_many`` gives them."""
    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
            raise ValueError("generate_images draws image m from seed + m: the seeds must be consecutive")
        return generate_images(pipe, prompts, steps, guidance, shift, seed=seeds[0], batch_size=batch_size,
                               desc="one-to-many", size=size, sampler=sampler, options=options)[0]

    return generate


def one_to_many_or_reason(pipe: TextToImage, steps: int, guidance: float, args: argparse.Namespace,
                          size: tuple[int, int] | None) -> tuple[dict | None, str | None]:
    """``--one-to-many K``'s result (``one_to_many.evaluate_one_to_many``), or why it is skipped."""
    if not args.one_to_many:
        return None, None
    if size is not None and size[0] != size[1]:
        return None, "the synthetic-set analyser reads square images (--width/--height differ)"
    prompts = underspecified_prompts(args.one_to_many_prompts, args.one_to_many_seed, tuple(args.one_to_many_attributes))
    generate = pipeline_generator(pipe, steps, guidance, args.shift, args.batch_size, size, getattr(args, "sampler_name", None),
                                  getattr(args, "sampler_options", None))
    return evaluate_one_to_many(generate, prompts, args.one_to_many, seed=args.seed), None


def per_prompt_rows(prompts: list[str], scores: dict, seed: int) -> list[dict]:
    rows = []
    for k, prompt in enumerate(prompts):
        row = {"index": k, "prompt": prompt, "seed": seed + k, "image": f"images/{k:05d}.png"}
        if "clip_scores" in scores:
            row["clip_score"] = scores["clip_scores"][k]
        if scores.get("adherence"):
            sample = scores["adherence"]["per_sample"][k]
            row["adherence"], row["predicted"] = sample["correct"], sample["predicted"]
        rows.append(row)
    return rows


def markdown(summary: dict, scores: dict) -> str:
    lines = [f"# Evaluation of `{summary['model']}`", "",
             f"{summary['count']} prompts, {summary['steps']} steps"
             + (f" of {summary['sampler']} ({summary['nfe']} evaluations per image)" if "sampler" in summary else "")
             + f", guidance {summary['guidance']}, "
             f"seeds {summary['seed']}…{summary['seed'] + summary['count'] - 1}; "
             f"{summary['seconds_per_image']:.4f} s per image (sampler {summary['sampler_seconds_per_image']:.4f}, "
             f"text {summary['text_seconds_per_image']:.4f}, decode {summary['decode_seconds_per_image']:.4f}).", "", "| metric | value |", "|---|---:|"]
    for key in ("adherence_all", "clip_score", "fid", "kid_mean", "kid_std"):
        if key in summary:
            lines.append(f"| {key} | {summary[key]:.4f} |")
    for count, rate in summary.get("adherence_by_objects", {}).items():
        lines.append(f"| adherence_all, {count}-object prompts | {rate:.4f} |")
    for part, rate in (summary.get("adherence_vae_ceiling") or {}).items():
        lines.append(f"| VAE ceiling: adherence of the reference renders' round trip ({part}) | {rate:.4f} |")
    lines += [f"| {name} | skipped: {why} |" for name, why in summary["skipped"].items()]
    if summary.get("diversity"):
        lines += ["", "## Diversity", "", diversity_table(summary["diversity"]).rstrip()]
    if scores.get("adherence"):
        from pipeline.evaluation.adherence import adherence_table

        lines += ["", "## Adherence by attribute", "", adherence_table(scores["adherence"]).rstrip()]
    if scores.get("one_to_many"):
        o2m = scores["one_to_many"]
        lines += ["", f"## One-to-many (unnamed attributes, K = {o2m['k']} seeds per prompt)", "",
                  "Total variation and entropy ratio of the unnamed attribute against the training grammar's "
                  "distribution, per prompt then averaged; in brackets what a perfect sampler scores at this K.", "",
                  one_to_many_table(o2m).rstrip()]
    lines += ["", "## Samples", "", "![grid](grid.png)"]
    return "\n".join(lines) + "\n"


def diversity_table(blocks: dict) -> str:
    """One row per feature space; – where a metric needs the reference set."""
    keys = ("precision", "recall", "density", "coverage", "vendi", "vendi_reference", "fd")
    lines = ["k-NN manifolds: precision / recall with k = 3 (Kynkäänniemi et al. 2019), density / coverage with "
             "k = 5 (Naeem et al. 2020); Vendi score with the cosine kernel (Friedman & Dieng 2023), of the generated "
             "and of the reference set; FD: Fréchet distance in each space (in DINOv2's: FD_DINOv2, Stein et al. 2023).", "",
             "| features | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, block in blocks.items():
        lines.append(f"| {name} ({block['dim']}-d) | " + " | ".join(f"{block[k]:.4f}" if k in block else "–" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, images: list[Image.Image], prompts: list[str], summary: dict, scores: dict) -> None:
    (out / "images").mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        image.save(out / "images" / f"{k:05d}.png")
    rows = per_prompt_rows(prompts, scores, summary["seed"])
    (out / "per_prompt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if scores.get("one_to_many"):
        rows = scores["one_to_many"]["per_prompt"]
        (out / "one_to_many.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    write_sheet(images[:16], prompts[:16], out / "grid.png")
    (out / "report.md").write_text(markdown(summary, scores), encoding="utf-8")


# ------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="exported teacher or student folder")
    p.add_argument("--prompts", type=Path, help="prompt file: .txt (one per line), .jsonl or .parquet")
    p.add_argument("--reference", help="image shards (a folder, its URL or a URL pattern): their captions are the prompts (unless "
                   "--prompts is given) and their images the FID/KID reference")
    p.add_argument("--count", type=int, help="use the first COUNT prompts (default: all)")
    p.add_argument("--steps", type=int, nargs="+", help="sampling steps; several: one evaluation each (default 50; with "
                   "--renoise-times/--renoise-sigmas: their count + 1)")
    p.add_argument("--guidance", type=float, nargs="+", default=[4.0],
                   help="guidance scale g (v_null + g·(v_cond − v_null); 1 = none); several: a guidance × steps sweep")
    p.add_argument("--shift", type=shift_arg, default=1.0, help="time-grid shift: a number, or auto (SD3's, from the image's tokens)")
    add_size_args(p)
    p.add_argument("--seed", type=int, default=0, help="image k uses seed + k")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--preview-decoder", action="store_true", help="decode with the model folder's tiny_vae/ (pipeline.train_tiny_decoder: "
                   "approximate images, a fraction of the decoding time) instead of the full VAE")
    p.add_argument("--output", type=Path, required=True,
                   help="output folder; with several --steps it names {steps}, with several --guidance {guidance}; "
                        "it may name {sampler}")
    p.add_argument("--sweep", type=Path, help="folder for sweep.json/.md/.png (default with several --guidance: "
                   "sweep/ beside the cells' folders; runs that share it are drawn side by side)")
    p.add_argument("--inception", type=Path, help="FID Inception-v3 weights (pt_inception-2015-12-05 .pth or .safetensors)")
    p.add_argument("--kid-subset", type=int, default=1000, help="KID subset size (capped at the set sizes)")
    p.add_argument("--dinov2", type=Path, help="transformers Dinov2Model folder for diversity metrics in DINOv2 space "
                   "(CLS features; its preprocessor_config.json, else 224 px ImageNet normalisation)")
    p.add_argument("--clip", help="open_clip folder for CLIP score (open_clip_config.json + weights)")
    p.add_argument("--clip-model", help="open_clip model name for CLIP score, with --clip-checkpoint")
    p.add_argument("--clip-checkpoint", help="local checkpoint for --clip-model")
    p.add_argument("--pixels", action="store_true",
                   help="diversity metrics also on 16x16 RGB pixels (no weights; meaningful on the flat synthetic set)")
    p.add_argument("--no-adherence", dest="adherence", action="store_false", help="skip the synthetic-set analyser")
    p.add_argument("--one-to-many", type=int, default=0, metavar="K",
                   help="K seeds per under-specified synthetic prompt: the unnamed attribute's spread against the data's")
    p.add_argument("--one-to-many-prompts", type=int, default=64, metavar="N", help="under-specified prompts (default 64)")
    p.add_argument("--one-to-many-seed", type=int, default=12345, help="synth seed of those prompts")
    p.add_argument("--one-to-many-attributes", type=attribute_list, default=UNNAMEABLE, metavar="A,B,...",
                   help=f"attributes they leave out (default {','.join(UNNAMEABLE)})")
    add_sampler_args(p)
    add_encoder_args(p)
    return p


def attribute_list(text: str) -> tuple[str, ...]:
    try:
        return parse_attributes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.prompts is None and args.reference is None:
        p.error("give --prompts FILE or --reference SHARDS")
    for name in ("batch_size", "kid_subset", "count"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1 (got {value})")
    if args.one_to_many == 1 or args.one_to_many < 0:
        p.error(f"--one-to-many must be >= 2 seeds per prompt (got {args.one_to_many})")
    if args.one_to_many_prompts < 1:
        p.error(f"--one-to-many-prompts must be >= 1 (got {args.one_to_many_prompts})")
    if args.steps is None:
        args.steps = [50]
    if min(args.steps) < 1:
        p.error(f"--steps must be >= 1 (got {min(args.steps)})")
    if len(args.steps) > 1 and "{steps}" not in str(args.output):
        p.error("with several --steps, --output must contain {steps} (e.g. runs/eval/teacher_{steps})")
    if min(args.guidance) < 0:
        p.error(f"--guidance must be >= 0 (got {min(args.guidance):g})")
    if len(args.guidance) > 1 and "{guidance}" not in str(args.output):
        p.error("with several --guidance, --output must contain {guidance} (e.g. runs/eval/teacher_g{guidance}_{steps})")
    if args.clip is not None and args.clip_model is not None:
        p.error("give --clip FOLDER or --clip-model NAME, not both")
    if (args.clip_model is None) != (args.clip_checkpoint is None):
        p.error("--clip-model and --clip-checkpoint go together")


def load_inputs(args: argparse.Namespace) -> list[str]:
    """The prompts; sets ``args.reference_images`` (None without --reference)."""
    args.reference_images = None
    if args.reference is not None:
        images, captions = read_reference(args.reference, None if args.prompts else args.count)
        args.reference_images = images
        prompts = captions
    if args.prompts is not None:
        prompts = read_prompts(args.prompts)
    return prompts[: args.count] if args.count else prompts


@torch.no_grad()
def vae_ceiling(pipe: TextToImage, images: list[Image.Image], captions: list[str], batch_size: int) -> dict:
    """The analyser's score on the reference renders seen through the model's VAE (encoded and
    decoded): what its latent space allows at best, beside the model's score. ``{"all", "1", "2"}``."""
    from pipeline.evaluation.adherence import evaluate

    rounds = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([image_to_tensor(image) for image in images[start:start + batch_size]])  # (B, 3, H, W)
        rounds += pipe.images(pipe.vae.encode(pixels.to(pipe.vae.device)))
    result = evaluate(rounds, captions)
    return {"all": result["all_correct"], **by_object_count(result, captions)}


def ceiling_or_none(pipe: TextToImage, prompts: list[str], args: argparse.Namespace) -> dict | None:
    """:func:`vae_ceiling` when the prompts are the reference renders' captions, at the model's size."""
    images = args.reference_images
    if not args.adherence or args.prompts is not None or not images or args.width or args.height:
        return None
    side = pipe.latent_shape[-1] * pipe.vae.downsample
    if any(image.size != (side, side) for image in images[: len(prompts)]):
        return None
    try:
        return vae_ceiling(pipe, images[: len(prompts)], prompts, args.batch_size)
    except ValueError:  # captions outside the synthetic grammar
        return None


def cell_folder(args: argparse.Namespace, steps: int, guidance: float) -> Path:
    out = str(args.output).replace("{steps}", str(steps)).replace("{guidance}", f"{guidance:g}")
    return Path(out.replace("{sampler}", str(getattr(args, "sampler_name", None) or "")))


def choose_sampler(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Sets ``args.sampler_name`` and ``args.sampler_options`` (``sampler_from_args``: one line on a
    bad sampler or knob) and, with re-noise times, ``args.steps`` to their count + 1."""
    try:
        native = read_model_info(args.model).get("sampler", "euler")
    except FileNotFoundError:  # main reports the missing folder
        args.sampler_name, args.sampler_options = None, SamplerOptions()
        return
    args.sampler_name, args.sampler_options = sampler_from_args(p, args, native)
    times = args.sampler_options.times
    if times is not None:
        if args.steps not in (None, [len(times) + 1]):
            p.error(f"{len(times)} re-noise times make {len(times) + 1} steps; --steps says {' '.join(map(str, args.steps))}")
        args.steps = [len(times) + 1]


def sweep_folder(args: argparse.Namespace) -> Path | None:
    """``--sweep``, or with several --guidance ``sweep/`` beside the cells (next to the output's
    first part that names a placeholder)."""
    if args.sweep is not None or len(args.guidance) == 1:
        return args.sweep
    parts = Path(args.output).parts
    first = next(i for i, part in enumerate(parts) if "{" in part)
    return Path(*parts[:first], "sweep") if first else Path("sweep")


def evaluate_cell(pipe: TextToImage, prompts: list[str], steps: int, guidance: float, args: argparse.Namespace,
                  device: str) -> tuple[Path, dict]:
    """Generate, score and write one evaluation at (``steps``, ``guidance``); returns its folder and summary."""
    size = image_size(args, pipe.latent_shape[-1] * pipe.vae.downsample)
    images, timing = generate_images(pipe, prompts, steps, guidance, args.shift, args.seed, args.batch_size, size=size,
                                     sampler=getattr(args, "sampler_name", None), options=getattr(args, "sampler_options", None))
    scores = score(images, prompts, args, device)
    scores["one_to_many"], reason = one_to_many_or_reason(pipe, steps, guidance, args, size)
    if reason:
        scores["skipped"]["one_to_many"] = reason
    summary = summarise(scores, args, len(prompts), timing, steps, guidance)
    out = cell_folder(args, steps, guidance)
    write_outputs(out, images, prompts, summary, scores)
    for name, why in summary["skipped"].items():
        print(f"{PROG}: {name} skipped: {why}")
    shown = {k: round(v, 4) for k, v in summary.items() if k in ("adherence_all", "clip_score", "fid", "kid_mean")}
    shown |= {k: round(v, 4) for k, v in sweep.headline_diversity(summary).items() if k in ("recall", "coverage", "vendi")}
    shown |= {k: round(summary[k], 4) for k in ("one_to_many_tv_excess", "one_to_many_entropy_ratio") if k in summary}
    print(f"{PROG}: {len(images)} images at {steps} steps, guidance {guidance:g}, {timing['seconds_per_image']:.4f} s/image "
          f"(sampler {timing['sampler_seconds_per_image']:.4f}), {shown}; report in {out / 'report.md'}")
    return out, summary


def warn_guidance_range(args: argparse.Namespace) -> None:
    """One warning line per scale outside the student's exported ``guidance_range``."""
    for guidance in args.guidance:
        bounds = sweep.outside_range(args.model_info, guidance)
        if bounds:
            print(f"{PROG}: warning: guidance {guidance:g} is outside the guidance_range [{bounds[0]:g}, {bounds[1]:g}] "
                  f"the student '{args.model}' was distilled for: its images there are extrapolation")


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    choose_sampler(p, args)
    check_args(p, args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        prompts = load_inputs(args)
        pipe = TextToImage.from_folder(args.model, device, encoder_paths(args), "tiny" if args.preview_decoder else "vae")
        args.nfe = lambda steps, guidance: pipe.evaluations(steps, guidance, args.sampler_name, args.sampler_options)
        pipe.latent_shape_for(image_size(args, pipe.latent_shape[-1] * pipe.vae.downsample))  # a bad size: one line, before any work
        args.model_info = read_model_info(args.model)
        warn_guidance_range(args)
        load_features(args, device)  # extractors and reference features: once, for every cell
        args.vae_ceiling = ceiling_or_none(pipe, prompts, args)  # once per model, for every cell
        cells = []
        for guidance in args.guidance:
            for steps in args.steps:
                out, summary = evaluate_cell(pipe, prompts, steps, guidance, args, device)
                cells.append(sweep.cell(summary, out, sweep.model_label(args.model, args.model_info)))
        folder = sweep_folder(args)
        if folder is not None:
            sweep.write_sweep(folder, cells)
            print(f"{PROG}: guidance × steps sweep in {folder / 'sweep.md'} and {folder / 'sweep.png'}")
    except (EvalInputError, MetricError, EncoderLoadError, FileNotFoundError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
