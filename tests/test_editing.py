"""Editing without retraining: the samplers' edit path with a stand-in model, the editor on a
tiny exported teacher (and a student made from it), the ``pipeline.edit`` command and the
synthetic edit cases and scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.diffusion.editing import Edit, flow_edit, latent_mask, renoise
from pipeline.diffusion.flow import interpolate
from pipeline.diffusion.samplers import consistency, euler, sample, time_grid


class Recorder:
    """A stand-in ``model(x, t, cond)``: a fixed nonlinear velocity; remembers every input."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x, t, cond):
        self.calls.append((x.clone(), t.clone()))
        return torch.sin(x) + t.reshape(-1, 1, 1, 1)


def _edit_inputs(strength=0.8, resample=0):
    g = torch.Generator().manual_seed(0)
    z, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 2:6, 1:5] = 1.0
    mask[1, :, 0, 0] = 0.5  # a soft cell
    return z, noise, Edit(z, strength, mask, resample), mask


@pytest.mark.parametrize("resample", [0, 2])
def test_euler_keeps_the_unmasked_latent_on_its_forward_path(resample):
    z, noise, edit, mask = _edit_inputs(resample=resample)
    model = Recorder()
    out = euler(model, noise, {}, steps=10, edit=edit, generator=torch.Generator().manual_seed(1))
    kept = (mask == 0).expand_as(z)
    assert len(model.calls) == (len(time_grid(10, strength=0.8)) - 1) * (1 + resample)
    for x, t in model.calls:
        assert torch.equal(x[kept], interpolate(z, noise, t)[kept])
    assert torch.equal(out[kept], z[kept])
    assert not torch.allclose(out[~kept], z[~kept])  # the masked part was redrawn


def test_consistency_keeps_the_unmasked_latent_with_each_steps_noise():
    z, noise, edit, mask = _edit_inputs(strength=0.9)
    model = Recorder()
    out = consistency(model, noise, {}, steps=4, generator=torch.Generator().manual_seed(5), edit=edit)
    replay = torch.Generator().manual_seed(5)
    grid = time_grid(4, strength=0.9)  # 0.9, 0.75, 0.5, 0.25, 0
    kept = (mask == 0).expand_as(z)
    assert [round(float(t[0]), 4) for _, t in model.calls] == [0.9, 0.75, 0.5, 0.25]
    assert torch.equal(model.calls[0][0][kept], interpolate(z, noise, grid[0].expand(2))[kept])
    for (x, t), t_k in zip(model.calls[1:], grid[1:-1]):
        fresh = torch.randn(noise.shape, generator=replay)
        assert torch.equal(x[kept], interpolate(z, fresh, t)[kept])
    assert torch.equal(out[kept], z[kept])


def test_strength_one_without_a_mask_is_text_to_image():
    z, noise, _, _ = _edit_inputs()
    for sampler in ("euler", "consistency"):
        plain = sample(Recorder(), sampler, {}, noise, 4, 1.0, seed=3)
        for mask in (None, torch.ones(2, 1, 8, 8)):
            edited = sample(Recorder(), sampler, {}, noise, 4, 1.0, seed=3, edit=Edit(z, 1.0, mask))
            assert torch.equal(edited, plain), (sampler, mask is None)


def test_strength_picks_the_grid_times_below_it():
    assert torch.allclose(time_grid(10, strength=0.6), torch.tensor([0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]))
    assert torch.equal(time_grid(10, strength=1.0), time_grid(10))
    assert torch.equal(time_grid(1, strength=0.3), torch.tensor([0.3, 0.0]))  # one step at least
    with pytest.raises(ValueError, match="strength"):
        Edit(torch.zeros(1, 4, 8, 8), 0.0)
    with pytest.raises(ValueError, match="does not fit"):
        Edit(torch.zeros(1, 4, 8, 8), 0.5, torch.zeros(1, 1, 4, 4))


def test_renoise_lands_on_the_forward_marginal():
    x0, a, b = 0.7, torch.tensor(0.3), torch.tensor(0.6)
    g = torch.Generator().manual_seed(0)
    x_a = (1 - a) * x0 + a * torch.randn(200_000, generator=g)
    x_b = renoise(x_a, a, b, g)
    assert x_b.mean().item() == pytest.approx((1 - b.item()) * x0, abs=0.01)
    assert x_b.std().item() == pytest.approx(b.item(), abs=0.01)


def test_flow_edit_with_equal_velocities_returns_the_source():
    z, _, _, _ = _edit_inputs()
    model = Recorder()
    velocity = lambda x, t: model(x, t, {})
    out = flow_edit(velocity, velocity, z, time_grid(20, strength=0.7), torch.Generator().manual_seed(0))
    assert torch.allclose(out, z, atol=1e-5)
    zero, one = (lambda x, t: torch.zeros_like(x)), (lambda x, t: torch.ones_like(x))
    assert torch.allclose(flow_edit(zero, one, z, time_grid(20, strength=0.7)), z - 0.7, atol=1e-5)  # moved by the gap


def test_latent_mask_redraws_every_cell_a_masked_pixel_touches():
    pixel = torch.zeros(1, 1, 32, 32)
    pixel[..., 5, 9] = 1.0
    pixel[..., 20:24, 20:24] = 0.25
    cells = latent_mask(pixel, (8, 8))
    assert cells[0, 0, 1, 2] == 1.0 and cells[0, 0, 5, 5] == 0.25 and cells.sum() == 1.25


# --------------------------------------------------------------------------------- the editor
@pytest.fixture(scope="module")
def editors(teacher_dir):
    from pipeline.inference.editing import ImageEditor
    from pipeline.inference.pipeline import TextToImage
    from pipeline.models.student import student_from

    teacher = TextToImage.from_folder(teacher_dir)
    student = TextToImage(student_from(teacher.transformer), teacher.vae, teacher.text, teacher.latent_shape, "consistency")
    return {"euler": ImageEditor(teacher), "consistency": ImageEditor(student)}


def _scene(index=0):
    from pipeline.evaluation.synthetic import render_sample

    image, truth = render_sample(index, 32, 7)
    return image, truth["caption"]


@pytest.mark.parametrize("sampler", ["euler", "consistency"])
def test_editor_strength_one_equals_text_to_image_for_the_same_seed(editors, sampler):
    from pipeline.inference.editing import Sampling

    editor = editors[sampler]
    pipe = editor.pipe
    image, prompt = _scene()
    steps = 4
    edited = editor.edit([image, image], [prompt, prompt], 1.0, None, Sampling(steps=steps, guidance=2.0), seeds=[11, 12])
    latents = pipe.sample(pipe.text.encode([prompt, prompt]), pipe.noise_per_image([11, 12]), steps, 2.0, seed=11)
    plain = pipe.images(latents)
    assert [np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(edited, plain)] == [True, True]


@pytest.mark.parametrize("sampler", ["euler", "consistency"])
def test_editor_tiny_strength_returns_the_vae_round_trip(editors, sampler):
    from pipeline.evaluation.edit_eval import vae_round_trip
    from pipeline.inference.editing import Sampling

    editor = editors[sampler]
    image, prompt = _scene(1)
    out = editor.edit([image], [prompt], 1e-4, None, Sampling(steps=50, guidance=2.0))[0]
    round_trip = vae_round_trip(editor, [image])[0]
    assert np.abs(np.asarray(out, dtype=int) - np.asarray(round_trip, dtype=int)).max() <= 1


def test_flowedit_with_equal_prompts_returns_the_vae_round_trip(editors):
    from pipeline.evaluation.edit_eval import vae_round_trip
    from pipeline.inference.editing import Sampling

    editor = editors["euler"]
    image, prompt = _scene(2)
    out = editor.text_edit([image], [prompt], [prompt], 0.7, Sampling(steps=10, guidance=2.0), source_guidance=2.0)[0]
    assert np.abs(np.asarray(out, dtype=int) - np.asarray(vae_round_trip(editor, [image])[0], dtype=int)).max() <= 1


def test_outpaint_grows_the_canvas_and_keeps_the_inside(editors):
    from pipeline.inference.editing import Sampling, outpaint_canvas

    image, prompt = _scene(3)
    canvas, mask = outpaint_canvas(image, (8, 0, 0, 8))
    assert canvas.size == (40, 40) and mask.shape == (40, 40) and mask.sum() == 40 * 40 - 32 * 32
    assert np.array_equal(np.asarray(canvas)[:32, 8:], np.asarray(image))
    out = editors["euler"].outpaint([image], [prompt], (8, 0, 0, 8), Sampling(steps=3, paste_back=True))[0]
    assert out.size == (40, 40) and np.array_equal(np.asarray(out)[:32, 8:], np.asarray(image))


def test_editor_input_errors_name_the_problem(editors):
    from pipeline.inference.editing import EditInputError, Sampling

    editor = editors["euler"]
    image, prompt = _scene()
    with pytest.raises(EditInputError, match="mask is 16x16 but its image is 32x32"):
        editor.edit([image], [prompt], 1.0, [Image.new("L", (16, 16))])
    with pytest.raises(EditInputError, match=r"strength must be in \(0, 1\]"):
        editor.edit([image], [prompt], 1.5)
    with pytest.raises(EditInputError, match="not a multiple of 8"):
        editor.edit([image.crop((0, 0, 30, 32))], [prompt], 0.5)
    with pytest.raises(EditInputError, match="steps"):
        Sampling(steps=0)


# -------------------------------------------------------------------------------- the command
def _edit(teacher_dir, *args):
    from pipeline.inference.edit_cli import main

    return main(["--model", str(teacher_dir), "--steps", "3", "--guidance", "2", *map(str, args)])


def test_edit_command_runs_every_mode_from_a_manifest(teacher_dir, editors, tmp_path):
    from pipeline.evaluation.edit_eval import vae_round_trip

    image, prompt = _scene(4)
    image.save(tmp_path / "a.png")
    Image.new("L", (32, 32), 0).save(tmp_path / "m.png")
    rows = [{"image": "a.png", "prompt": prompt},
            {"image": "a.png", "mask": "m.png", "prompt": prompt},
            {"image": "a.png", "outpaint": "0,8,8,0", "prompt": prompt},
            {"image": "a.png", "scale": 2, "prompt": prompt, "strength": 0.3},
            {"image": "a.png", "source_prompt": prompt, "target_prompt": prompt.replace("background", "background", 1)}]
    (tmp_path / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _edit(teacher_dir, "--image", tmp_path / "edits.jsonl", "--output", tmp_path / "out") == 0
    sizes = [Image.open(p).size for p in sorted((tmp_path / "out").glob("0000*.png"))]
    assert sizes == [(32, 32), (32, 32), (40, 40), (64, 64), (32, 32)]
    # an all-black mask keeps everything: inpainting returns the VAE round trip of the input
    inpainted, img2img = (np.asarray(Image.open(tmp_path / "out" / f"0000{n}_a.png")) for n in (2, 1))
    assert np.array_equal(inpainted, np.asarray(vae_round_trip(editors["euler"], [image])[0]))
    assert not np.array_equal(img2img, inpainted)
    assert Image.open(tmp_path / "out" / "sheet.png").width > 3 * 32


def test_edit_command_on_one_image_writes_the_result_and_its_sheet(teacher_dir, tmp_path):
    image, prompt = _scene(5)
    image.save(tmp_path / "in.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    args = ["--image", tmp_path / "in.png", "--mask", tmp_path / "mask.png", "--prompt", prompt, "--paste-back"]
    assert _edit(teacher_dir, *args, "--output", tmp_path / "out.png") == 0
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert np.array_equal(out[mask == 0], np.asarray(image)[mask == 0])  # pasted back outside the mask
    assert (tmp_path / "out_sheet.png").is_file()


def test_edit_command_errors_are_one_line(teacher_dir, tmp_path, capsys):
    image, prompt = _scene()
    image.save(tmp_path / "in.png")
    Image.new("L", (16, 16)).save(tmp_path / "small.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    cases = {
        "mask is 16x16 but its image is 32x32": ["--image", tmp_path / "in.png", "--mask", tmp_path / "small.png"],
        r"strength must be in (0, 1] (got 1.5)": ["--image", tmp_path / "in.png", "--strength", "1.5"],
        "image '": ["--image", tmp_path / "broken.png"],
        "image not found": ["--image", tmp_path / "missing.png"],
        "--outpaint takes L,T,R,B": ["--image", tmp_path / "in.png", "--outpaint", "8,8"],
    }
    for message, args in cases.items():
        assert _edit(teacher_dir, *args, "--prompt", prompt, "--output", tmp_path / "o.png") == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("pipeline.edit: error:") and message in err[0], (message, err)


# ----------------------------------------------------------------------- cases and their scores
def test_edit_cases_change_what_they_say():
    from pipeline.evaluation.adherence import analyse, parse_caption, score
    from pipeline.evaluation.edit_cases import edit_cases

    for case in edit_cases("inpaint", 8, 32, 3):
        old = next(o for o in case.original["objects"] if o["bbox"] == case.new_object["bbox"])
        assert old["colour"] != case.new_object["colour"] and old["shape"] != case.new_object["shape"]
        x0, y0, x1, y1 = old["bbox"]
        assert case.mask[max(0, y0):y1, max(0, x0):x1].all() and case.mask.sum() < case.mask.size
        assert score(analyse(case.reference), case.truth)["all"]  # the target render reads back as its caption
    for case, flow in zip(edit_cases("img2img", 8, 32, 3), edit_cases("flowedit", 8, 32, 3)):
        assert case.truth["background"] != case.original["background"] and case.truth["objects"] == case.original["objects"]
        assert flow.prompt == case.prompt and flow.source_prompt != flow.prompt
        assert score(analyse(flow.image), parse_caption(flow.source_prompt))["all"]
    assert {c.image.size for c in edit_cases("superres", 4, 32, 3)} == {(16, 16)}
    for case in edit_cases("outpaint", 8, 32, 3):
        left, top, right, bottom = case.padding
        assert case.image.size == (32 - left - right, 32 - top - bottom) and sum(case.padding) == 8
    first, again = edit_cases("inpaint", 3, 32, 3), edit_cases("inpaint", 3, 32, 3)
    assert [c.prompt for c in first] == [c.prompt for c in again]


def test_scores_reward_the_target_and_not_the_input():
    from pipeline.evaluation.edit_cases import edit_cases
    from pipeline.evaluation.edit_eval import baseline_scores, score_against_reference, score_img2img, score_inpaint

    cases = edit_cases("inpaint", 6, 32, 1)
    right, _ = score_inpaint(cases, [c.reference for c in cases])
    unchanged, _ = score_inpaint(cases, [c.image for c in cases])
    assert right["new_object"] == 1.0 and right["unmasked_psnr"] > 40
    assert unchanged["new_object"] == 0.0 and unchanged["unmasked_psnr"] == pytest.approx(100.0)
    cases = edit_cases("img2img", 6, 32, 1)
    assert score_img2img(cases, [c.reference for c in cases])[0] == {"background": 1.0, "objects_kept": 1.0, "both": 1.0}
    assert score_img2img(cases, [c.image for c in cases])[0]["background"] == 0.0
    cases = edit_cases("superres", 6, 32, 1)
    summary, _ = score_against_reference(cases, [c.reference for c in cases])
    assert summary["scene"] == 1.0 and summary["ssim"] == pytest.approx(1.0)
    assert baseline_scores(cases)["baseline_psnr"] < summary["psnr"] and baseline_scores(cases)["baseline_ssim"] < 1


def test_evaluate_edits_writes_its_report(teacher_dir, tmp_path):
    from pipeline.evaluation.edit_report import main

    (tmp_path / "t2i").mkdir()
    rows = [{"prompt": "a small red circle at the top left on a white background", "adherence": {"all": True}},
            {"prompt": "a small red circle at the top left on a black background", "adherence": {"all": False}}]
    (tmp_path / "t2i" / "per_prompt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--teacher", teacher_dir, "--teacher-steps", "2", "--count", "3", "--batch-size", "2", "--guidance", "2",
            "--baseline", tmp_path / "t2i", "--output", tmp_path / "edits"]
    assert main(list(map(str, args))) == 0
    report = json.loads((tmp_path / "edits" / "edit_report.json").read_text())
    assert report["t2i_single"] == 0.5 and set(report["runs"]["teacher_2"]) >= {"inpaint", "img2img", "flowedit", "outpaint", "superres"}
    assert {g["goal"] for g in report["goals"]} >= {"inpaint unmasked PSNR ≥ 30 dB", "img2img new background ≥ 0.9"}
    run = report["runs"]["teacher_2"]
    ceilings = {task: next(k for k in run[task] if k.startswith("vae_")) for task in run if isinstance(run[task], dict)}
    assert ceilings == {"inpaint": "vae_unmasked_psnr", "img2img": "vae_objects_kept", "flowedit": "vae_objects_kept",
                        "outpaint": "vae_psnr", "superres": "vae_psnr"}
    rows = [json.loads(line) for line in (tmp_path / "edits" / "per_case.jsonl").read_text().splitlines()]
    assert len(rows) == 5 * 3 and {r["task"] for r in rows} == {"inpaint", "img2img", "flowedit", "outpaint", "superres"}
    assert "| teacher_2 |" in (tmp_path / "edits" / "edit_report.md").read_text()
    assert Image.open(tmp_path / "edits" / "edit_sheet.png").height > 15 * 96  # 3 cases of each of the 5 tasks


def test_edit_command_batches_a_folder_without_changing_the_results(teacher_dir, tmp_path):
    (tmp_path / "in").mkdir()
    for k in range(3):
        _scene(10 + k)[0].save(tmp_path / "in" / f"{k}.png")
    args = ["--image", tmp_path / "in", "--prompt", _scene(10)[1], "--strength", "0.7"]
    assert _edit(teacher_dir, *args, "--batch-size", "1", "--output", tmp_path / "one") == 0
    assert _edit(teacher_dir, *args, "--batch-size", "3", "--output", tmp_path / "three") == 0
    for k in range(3):
        one, three = (np.asarray(Image.open(tmp_path / d / f"{k}.png"), dtype=int) for d in ("one", "three"))
        assert np.array_equal(one, three), k  # image k from seed k, whatever the batch
    assert (tmp_path / "three" / "sheet.png").is_file()
