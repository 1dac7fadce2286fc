"""Editing evaluation on the synthetic set: run ``edit_cases`` through an ``ImageEditor`` and score
each result from its pixels (``pipeline.evaluation.adherence``) and against its reference render
(``pipeline.data.quality``).

Per task (rates are over cases; PSNR/SSIM are means in dB / [0, 1]):

- ``inpaint``: ``new_object`` (the asked-for object has every attribute right), ``scene`` (the
  whole target caption right, count included), ``unmasked_psnr`` (outside the mask, against the
  input);
- ``inpaint_quarter`` / ``inpaint_half`` (large masks, the scene's own caption): ``scene`` and
  ``unmasked_psnr``;
- ``img2img`` and ``flowedit``: ``background`` (the new one), ``objects_kept`` (every object's
  attributes and the count as before), ``both`` (FlowEdit's source prompt gets the same guidance
  as its target, so an unchanged prompt would return the input);
- ``outpaint`` / ``superres``: ``scene`` and ``psnr`` / ``ssim`` against the full render;
  ``baseline_scores`` gives the same for the input as the model gets it (edge-filled canvas,
  bicubic upsampling) as ``baseline_*``.

- inverse tasks (``colourise``, ``sr4``, ``edges``, ``deblur``: a known degradation ``y = A(x)``):
  ``objects_kept`` (every object's attributes and the count right), ``colour_right`` (every
  object's colour right), ``background``, ``psnr`` and ``lpips`` (``pipeline.evaluation.lpips``;
  None without AlexNet weights) against the render, and ``consistency`` (RMS of ``A(x̂) − y`` in
  [0, 1] pixel units, ``pipeline.data.degradations.consistency_error``). The methods that produce
  the images (``run_inverse_method``): ``source`` (the input as is), ``sdedit`` (the editor
  without retraining), ``solver`` (``pipeline.inference.inverse``, also ``raw_consistency``: its
  last decode before the pixel projection), and trained ones (a pix2pix ``Translator``, an
  image-conditioned ``TextToImage``).

``vae_ceiling`` scores the VAE round trip of each case's target render the same way: the best a
latent-space edit can do, so a reader sees how much of a gap is the autoencoder's. For the
unmasked PSNR that is the ceiling without paste-back (``Sampling.paste_back``, on by default,
puts the input's own pixels back outside the feathered mask and goes above it).
"""

from __future__ import annotations

import statistics

import torch
from tqdm import tqdm

from pipeline.data.degradations import consistency_error, parse_degradation
from pipeline.data.images import image_to_tensor, tensor_to_images, to_rgb
from pipeline.data.quality import psnr, ssim
from pipeline.evaluation.adherence import ATTRIBUTES, analyse, score
from pipeline.evaluation.edit_cases import INVERSE_TASKS, MASKED, SR_SCALE, EditCase
from pipeline.evaluation.lpips import lpips
from pipeline.inference.editing import ImageEditor, Sampling, outpaint_canvas, upscale
from pipeline.inference.inverse import SolverConfig, solve


def _tensors(images) -> torch.Tensor:
    return torch.stack([image_to_tensor(to_rgb(im)) for im in images])  # (B, 3, H, W)


def run_cases(editor: ImageEditor, cases: list[EditCase], strength: float, sampling: Sampling, seed: int,
              batch_size: int = 64, desc: str = "edit") -> list:
    """Inpainting, image-to-image, FlowEdit or super-resolution results, case k from seed ``seed + k``."""
    outputs = []
    for start in tqdm(range(0, len(cases), batch_size), desc=desc, unit="batch", leave=False):
        batch = cases[start:start + batch_size]
        images, prompts = [c.image for c in batch], [c.prompt for c in batch]
        seeds = list(range(seed + start, seed + start + len(batch)))
        task = batch[0].task
        if task == "superres":
            outputs += editor.super_resolve(images, prompts, SR_SCALE, strength, sampling, seeds)
        elif task == "flowedit":
            outputs += editor.text_edit(images, [c.source_prompt for c in batch], prompts, strength, sampling, seeds,
                                        source_guidance=sampling.guidance)
        elif task in MASKED:
            outputs += editor.edit(images, prompts, strength, [c.mask for c in batch], sampling, seeds)
        else:
            outputs += editor.edit(images, prompts, strength, None, sampling, seeds)
    return outputs


def run_outpaint(editor: ImageEditor, cases: list[EditCase], sampling: Sampling, seed: int, batch_size: int = 64) -> list:
    """Outpainting grouped by side (a batch shares one input size); results in case order, case k
    from seed ``seed + k``."""
    results: dict[int, object] = {}
    for padding in sorted({c.padding for c in cases}):
        group = [c for c in cases if c.padding == padding]
        for start in range(0, len(group), batch_size):
            batch = group[start:start + batch_size]
            seeds = [seed + c.index for c in batch]
            out = editor.outpaint([c.image for c in batch], [c.prompt for c in batch], padding, sampling, seeds)
            results.update({c.index: im for c, im in zip(batch, out)})
    return [results[c.index] for c in cases]


# ----------------------------------------------------------------------------------------- scores
def _mean(values) -> float:
    values = [float(v) for v in values]
    return statistics.fmean(values) if values else float("nan")


def _object_right(predicted: dict, obj: dict, background: str) -> bool:
    """Whether some predicted object has every attribute of ``obj`` (the count not considered)."""
    correct = score(predicted, {"background": background, "objects": [obj]})
    return all(correct[a] for a in ATTRIBUTES)


def unmasked_psnr(cases: list[EditCase], outputs: list) -> torch.Tensor:
    """(B,) PSNR in dB of each output against its input, outside the mask."""
    kept = 1 - torch.stack([torch.from_numpy(c.mask) for c in cases])[:, None]  # (B, 1, H, W): 1 outside the mask
    return psnr(_tensors(outputs), _tensors([c.image for c in cases]), kept)


def score_restore(cases: list[EditCase], outputs: list) -> tuple[dict, list[dict]]:
    """Large-mask inpainting under the scene's own caption: the caption read back, and the PSNR outside the mask."""
    unmasked = unmasked_psnr(cases, outputs)
    rows = [{"scene": score(analyse(out), case.truth)["all"], "unmasked_psnr": float(unmasked[k])}
            for k, (case, out) in enumerate(zip(cases, outputs))]
    return {key: _mean(r[key] for r in rows) for key in ("scene", "unmasked_psnr")}, rows


def score_inpaint(cases: list[EditCase], outputs: list) -> tuple[dict, list[dict]]:
    rows = []
    unmasked = unmasked_psnr(cases, outputs)
    for k, (case, out) in enumerate(zip(cases, outputs)):
        predicted = analyse(out)
        rows.append({"new_object": _object_right(predicted, case.new_object, case.truth["background"]),
                     "scene": score(predicted, case.truth)["all"], "unmasked_psnr": float(unmasked[k]),
                     "objects": len(case.truth["objects"])})
    summary = {"new_object": _mean(r["new_object"] for r in rows), "scene": _mean(r["scene"] for r in rows),
               "unmasked_psnr": _mean(r["unmasked_psnr"] for r in rows),
               "new_object_single": _mean(r["new_object"] for r in rows if r["objects"] == 1),
               "new_object_two": _mean(r["new_object"] for r in rows if r["objects"] == 2)}
    return summary, rows


def score_img2img(cases: list[EditCase], outputs: list) -> tuple[dict, list[dict]]:
    rows = []
    for case, out in zip(cases, outputs):
        predicted = analyse(out)
        correct = score(predicted, case.original)
        kept = all(correct[a] for a in (*ATTRIBUTES, "count"))
        background = predicted["background"] == case.truth["background"]
        rows.append({"background": background, "objects_kept": kept, "both": background and kept})
    return {key: _mean(r[key] for r in rows) for key in ("background", "objects_kept", "both")}, rows


def score_against_reference(cases: list[EditCase], images: list) -> tuple[dict, list[dict]]:
    """Outpainting and super-resolution: the scene, PSNR and SSIM of ``images`` against the full render."""
    pixels, references = _tensors(images), _tensors([c.reference for c in cases])
    values = {"psnr": psnr(pixels, references), "ssim": ssim(pixels, references)}
    rows = [{"scene": score(analyse(image), case.truth)["all"], **{name: float(v[k]) for name, v in values.items()}}
            for k, (case, image) in enumerate(zip(cases, images))]
    return {key: _mean(r[key] for r in rows) for key in ("scene", "psnr", "ssim")}, rows


def baseline_scores(cases: list[EditCase]) -> dict:
    """Outpainting and super-resolution's scores for the input as the model gets it (``baseline_*``)."""
    summary, _ = score_against_reference(cases, baseline_inputs(cases))
    return {f"baseline_{key}": value for key, value in summary.items()}


def baseline_inputs(cases: list[EditCase]) -> list:
    """What the model starts from, at the output size: the edge-filled canvas or the bicubic upsampling."""
    if cases[0].task == "outpaint":
        return [outpaint_canvas(c.image, c.padding)[0] for c in cases]
    return [upscale(c.image, SR_SCALE) for c in cases]


@torch.no_grad()
def vae_round_trip(editor: ImageEditor, images: list, batch_size: int = 64) -> list:
    """Each image encoded and decoded by the pipeline's VAE: what a latent edit can reproduce at best."""
    out = []
    for start in range(0, len(images), batch_size):
        out += tensor_to_images(editor.pipe.vae.decode(editor.encode(images[start:start + batch_size])))
    return out


def score_task(cases: list[EditCase], outputs: list) -> tuple[dict, list[dict]]:
    """One task's summary and per-case rows for ``outputs`` (case order)."""
    task = cases[0].task
    if task == "inpaint":
        return score_inpaint(cases, outputs)
    if task in MASKED:
        return score_restore(cases, outputs)
    if task in ("img2img", "flowedit"):
        return score_img2img(cases, outputs)
    if task in INVERSE_TASKS:
        return score_inverse(cases, outputs)
    return score_against_reference(cases, outputs)


CEILINGS = {"inpaint": "unmasked_psnr", "img2img": "objects_kept", "flowedit": "objects_kept", "outpaint": "psnr",
            "superres": "psnr", "inpaint_quarter": "unmasked_psnr", "inpaint_half": "unmasked_psnr"}


def vae_ceiling(editor: ImageEditor, cases: list[EditCase], batch_size: int = 64) -> dict:
    """What a latent edit can reach at best: the task's score (``CEILINGS``) of a perfect edit seen
    through the VAE — the round trip of the target render (``vae_<score>``)."""
    key = CEILINGS[cases[0].task]
    summary, _ = score_task(cases, vae_round_trip(editor, [c.reference for c in cases], batch_size))
    return {f"vae_{key}": summary[key]}


# ------------------------------------------------------------------------- inverse problems
INVERSE_SCORES = ("objects_kept", "colour_right", "background", "psnr", "lpips", "consistency")


def measurements(cases: list[EditCase]) -> torch.Tensor:
    """(B, C, h, w): each case's ``y = A(reference)``."""
    return torch.stack([c.measurement for c in cases])


def score_inverse(cases: list[EditCase], outputs: list) -> tuple[dict, list[dict]]:
    """An inverse task's scores (``INVERSE_SCORES``) of ``outputs`` against the render and ``y``;
    ``lpips`` is None where LPIPS is unavailable (``pipeline.evaluation.lpips``)."""
    deg = parse_degradation(cases[0].degradation)
    pixels, references = _tensors(outputs), _tensors([c.reference for c in cases])
    distances = lpips(pixels, references)
    values = {"psnr": psnr(pixels, references), "consistency": consistency_error(deg, pixels, measurements(cases))}
    rows = []
    for k, (case, out) in enumerate(zip(cases, outputs)):
        correct = score(analyse(out), case.truth)
        rows.append({"objects_kept": all(correct[a] for a in (*ATTRIBUTES, "count")), "colour_right": correct["colour"],
                     "background": correct["background"], **{name: float(v[k]) for name, v in values.items()},
                     "lpips": None if distances is None else float(distances[k])})
    summary = {key: _mean(r[key] for r in rows) for key in INVERSE_SCORES if key != "lpips"}
    summary["lpips"] = None if distances is None else _mean(r["lpips"] for r in rows)
    return summary, rows


def _batches(cases: list[EditCase], batch_size: int):
    for start in range(0, len(cases), batch_size):
        yield start, cases[start:start + batch_size]


def run_sdedit(editor: ImageEditor, cases: list[EditCase], strength: float, sampling: Sampling, seed: int,
               batch_size: int = 64) -> list:
    """The editor without retraining: SDEdit from each source at ``strength`` (for ``sr4`` the
    source is the bicubic upsampling: ``ImageEditor.super_resolve``'s path); case k from seed + k."""
    outputs = []
    for start, batch in _batches(cases, batch_size):
        seeds = list(range(seed + start, seed + start + len(batch)))
        outputs += editor.edit([c.image for c in batch], [c.prompt for c in batch], strength, None, sampling, seeds)
    return outputs


def run_solver(pipe, cases: list[EditCase], cfg: SolverConfig, seed: int, batch_size: int = 64) -> tuple[list, list[float]]:
    """The data-consistent solver on each case (``pipeline.inference.inverse.solve``, case k from
    seed + k): its images and the consistency error of its last decode before the projection."""
    deg = parse_degradation(cases[0].degradation)
    outputs, raw = [], []
    for start, batch in _batches(cases, batch_size):
        y, seeds = measurements(batch), list(range(seed + start, seed + start + len(batch)))
        sources = _tensors([c.image for c in batch]) if cfg.strength < 1 else None
        solved = solve(pipe, deg, y, [c.prompt for c in batch], seeds, cfg, start=sources)
        outputs += solved.images
        raw += consistency_error(deg, solved.raw.cpu(), y).tolist()
    return outputs, raw


@torch.no_grad()
def run_translator(translator, cases: list[EditCase], batch_size: int = 64) -> list:
    """A pix2pix / L2 generator (``pipeline.models.translator.Translator``) on each source."""
    outputs = []
    for _, batch in _batches(cases, batch_size):
        outputs += tensor_to_images(translator.translate(_tensors([c.image for c in batch])))
    return outputs


def run_conditioned(pipe, cases: list[EditCase], steps: int, guidance: float, image_guidance: float, seed: int,
                    batch_size: int = 64) -> list:
    """An image-conditioned model (``TextToImage.generate(..., images=sources)``); case k from seed + k."""
    outputs = []
    for start, batch in _batches(cases, batch_size):
        images, _ = pipe.generate([c.prompt for c in batch], steps, guidance, seed=seed + start,
                                  images=[c.image for c in batch], image_guidance=image_guidance)
        outputs += images
    return outputs


def evaluate_task(editor: ImageEditor, cases: list[EditCase], strength: float, sampling: Sampling, seed: int,
                  batch_size: int = 64, desc: str = "edit") -> tuple[dict, list[dict], list]:
    """Run and score one task's cases: (summary, per-case rows, output images)."""
    if cases[0].task == "outpaint":
        outputs = run_outpaint(editor, cases, sampling, seed, batch_size)
    else:
        outputs = run_cases(editor, cases, strength, sampling, seed, batch_size, desc)
    summary, rows = score_task(cases, outputs)
    return summary, rows, outputs
