"""Threshold finding: the batch rule, the running mean, calibration <-> inference identity,
torchrun invariance, resume after kill -9, bad images, and the CLI end to end."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dymu_viz
from dymu_viz import merge
from dymu_viz.calibrate import batch_thresholds, find_thresholds, mean_thresholds, remove_checkpoints
from dymu_viz.cli import main
from dymu_viz.data import sample_photos, shapes_image
from tiny_models import make_hf_clip, make_hf_siglip, redundancy_images

pytestmark = pytest.mark.exact_counts  # asserts exact counts / groups / thresholds: also run under baseline CPU kernels

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def test_one_batch_merges_exactly_B_r_and_records_the_first_unpicked_edge(monkeypatch):
    model = make_hf_clip(image=112)  # 64 patches + CLS, 4 layers
    seen = []
    original = merge.select_batch_top

    def recording(best, size, r, protected):
        src, tau = original(best, size, r, protected)
        seen.append((best.clone(), src.clone(), tau))
        return src, tau

    monkeypatch.setattr(merge, "select_batch_top", recording)
    x = redundancy_images(112, 14)
    rs = [5, 7, 0, 3]
    values, n_tokens = batch_thresholds(model, x, rs)
    counts = model.dymu.last.counts  # batch_thresholds patched the model; this is its pass
    active = [i for i, r in enumerate(rs) if r > 0]
    assert len(seen) == len(active) and values[2] is None
    for (best, src, tau), layer in zip(seen, active):
        merged = counts[:, layer] - counts[:, layer + 1]
        assert merged.float().mean().item() == rs[layer]  # B * r_i merges in all, r_i per image on average
        assert int(src.sum()) == x.shape[0] * rs[layer]
        ranked = best.flatten().sort(descending=True).values
        assert tau == max(float(ranked[x.shape[0] * rs[layer]]), 0.0) == values[layer]
        assert float(best[src].min()) >= tau  # every picked edge scores at least the recorded value
    assert counts[:, 3].tolist() == counts[:, 2].tolist()  # r_i = 0: the layer never merges
    assert n_tokens.tolist() == counts[:, -1].tolist()


def test_threshold_is_the_mean_of_the_per_batch_values():
    model = make_hf_siglip(image=112)
    x = redundancy_images(112, 14)
    batches = [x[:2], x[2:], x[1:3]]
    th = find_thresholds(model, batches, r_total=12, schedule="linear")
    per_batch = [batch_thresholds(model, b, th.r)[0] for b in batches]
    for i in range(4):
        vals = [v[i] for v in per_batch if v[i] is not None]
        expected = sum(vals) / len(vals) if vals else float("inf")
        assert th.values[i] == pytest.approx(expected, rel=1e-12, abs=0)
    assert th.metadata["n_images"] == 6 and th.metadata["n_batches"] == 3


def test_a_smaller_target_never_leaves_more_tokens():
    """Targets so small that a batch's budget takes every edge of a layer: that layer gets the
    clamp value 0 (merge every edge of positive score), never "never merge", so asking for
    fewer tokens gives fewer (down to the floor the images allow)."""
    torch.manual_seed(0)
    model = make_hf_clip()  # 16 patches + CLS, 4 layers
    x = torch.randn(8, 3, 56, 56)
    realized = []
    for target in ("8out", "4out", "2out", "1out"):
        th = find_thresholds(model, [x[:4], x[4:]], target=target)
        assert all(v != float("inf") for v in th.values), (target, th.values)
        dymu_viz.patch(model, th)
        realized.append(dymu_viz.encode(model, x).counts[:, -1].float().mean().item())
        dymu_viz.unpatch(model)
    assert 0.0 in th.values, "test premise: the smallest target saturates a layer"
    assert realized == sorted(realized, reverse=True) and realized[-1] < realized[0], realized


def test_mean_ignores_missing_values_and_flags_empty_layers():
    values, counts = mean_thresholds({0: [0.5, None], 2: [0.7, None], 1: [0.6, None]}, 2)
    assert values[0] == pytest.approx(0.6) and values[1] == float("inf") and counts == [3, 0]


@pytest.mark.floor
@pytest.mark.parametrize("make", [make_hf_clip, make_hf_siglip], ids=["cls", "no_cls"])
def test_calibrating_on_one_image_then_inference_equals_tome(make):
    model = make(image=112, layers=4)
    image = redundancy_images(112, 14)[3:4] + 0.05 * torch.randn(1, 3, 112, 112)
    th = find_thresholds(model, [image] * 5, r_total=20, schedule="linear")  # batch 1, K = 5 repeats
    assert th.r == dymu_viz.make_schedule(20, 4, "linear")
    dymu_viz.patch(model, th)
    dtome = dymu_viz.encode(model, image)
    dymu_viz.patch(model, r=th.r)
    tome = dymu_viz.encode(model, image)
    assert dtome.counts.tolist() == tome.counts.tolist()
    n0, protected = dtome.counts[0, 0].item(), 1 if make is make_hf_clip else 0
    assert dtome.counts[0].tolist() == dymu_viz.token_counts(n0, th.r, protected)
    assert torch.equal(dtome.groups, tome.groups) and torch.equal(dtome.tokens, tome.tokens)


# ---------------------------------------------------------------- data sets and the CLI


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny HF CLIP vision model saved as a local folder, as a user's own model would be."""
    from transformers import CLIPImageProcessor
    folder = tmp_path_factory.mktemp("tiny_clip")
    make_hf_clip(image=56, layers=4).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    """A few dozen images made from the bundled photos (crops, scales) and synthetic shapes,
    listed in the reference JSON format."""
    root = tmp_path_factory.mktemp("images")
    photos = sample_photos(["astronaut", "coffee", "rocket", "china"])
    entries = []
    for name, photo in photos.items():
        w, h = photo.size
        for k, box in enumerate([(0, 0, w // 2, h // 2), (w // 4, h // 4, w, h), (0, 0, w, h)]):
            path = root / f"{name}_{k}.jpg"
            photo.crop(box).resize((96 + 32 * k, 96 + 16 * k)).save(path)
            entries.append({"image": path.name})
    for n in range(0, 24, 2):
        path = root / "shapes" / f"shapes_{n}.png"
        path.parent.mkdir(exist_ok=True)
        shapes_image(n, size=128, seed=n).save(path)
        entries.append({"image": f"shapes/{path.name}"})
    entries.insert(5, {"caption": "an entry without an image is skipped"})
    (root / "data.json").write_text(json.dumps(entries))
    return root


def _cli(*args, env=None, **kwargs):
    cmd = [sys.executable, "-m", "dymu_viz", "calibrate", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, **kwargs)


def _calibrate_args(model_dir, images, out, *extra):
    return ["--model", model_dir, "--json", images / "data.json", "--target", "8out", "--batch-size", 4,
            "--out", out, "--workers", 0, "--quiet", *extra]


@pytest.mark.floor
def test_cli_end_to_end(tiny_model_dir, image_set, tmp_path, capsys):
    out = tmp_path / "th.json"
    heldout = tmp_path / "heldout.json"
    heldout.write_text(json.dumps([{"image": str(image_set / "shapes" / f"shapes_{n}.png")} for n in (0, 10, 20)]))
    code = main(["calibrate", *map(str, _calibrate_args(tiny_model_dir, image_set, out, "--export-pth",
                                                         tmp_path / "th.pth", "--heldout-json", heldout,
                                                         "--heldout-root", "/"))])
    assert code == 0
    printed = capsys.readouterr().out
    assert "24 images (1 JSON entries without an image skipped)" in printed
    th = dymu_viz.Thresholds.load(out)
    assert th.layers == 4 and th.r_total == 8 and th.metadata["n_images"] == 24 and th.metadata["n_batches"] == 6
    report = json.loads(out.with_name("th.report.json").read_text())
    cal = report["calibration"]
    assert cal["n_images"] == 24 and cal["min"] <= cal["median"] <= cal["max"]
    assert sum(cal["histogram"]["counts"]) == 24
    assert cal["mean"] == pytest.approx(np.mean(list(cal["per_image"].values())))
    assert th.metadata["reports"]["calibration"]["mean"] == cal["mean"]
    assert report["heldout"]["n_images"] == 3
    assert "heldout     : " in printed and "calibration : " in printed
    assert dymu_viz.Thresholds.load(tmp_path / "th.pth").values == pytest.approx(th.values, abs=1e-6)
    assert not list(tmp_path.glob("*.partial.*"))  # checkpoints are cleaned up after success
    # an existing output is never silently overwritten
    assert main(["calibrate", *map(str, _calibrate_args(tiny_model_dir, image_set, out))]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_bad_images_are_skipped_counted_and_named(tiny_model_dir, tmp_path, capsys):
    root = tmp_path / "mixed"
    root.mkdir()
    photo = sample_photos(["chelsea"])["chelsea"]
    photo.save(root / "good.jpg")
    photo.convert("L").save(root / "gray.png")
    photo.convert("RGBA").save(root / "rgba.png")
    photo.convert("P").save(root / "palette.png")
    Image.fromarray((np.asarray(photo.convert("L"), dtype=np.uint16) * 257)).save(root / "sixteen_bit.png")
    (root / "corrupt.jpg").write_bytes(b"this is not an image")
    data = (root / "good.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 3])
    entries = [{"image": p} for p in ["good.jpg", "gray.png", "rgba.png", "palette.png", "sixteen_bit.png",
                                      "corrupt.jpg", "truncated.jpg", "missing.jpg"]]
    (root / "data.json").write_text(json.dumps(entries))
    out = tmp_path / "th.json"
    assert main(["calibrate", "--model", str(tiny_model_dir), "--json", str(root / "data.json"), "--target", "8out",
                 "--batch-size", "3", "--out", str(out), "--workers", "0", "--quiet"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.with_name("th.report.json").read_text())
    bad = {Path(f["image"]).name for f in report["failures"]}
    assert bad == {"corrupt.jpg", "truncated.jpg", "missing.jpg"}
    assert "skipped 3 unreadable image(s)" in printed and "missing.jpg" in printed
    assert dymu_viz.Thresholds.load(out).metadata["n_images"] == 5


def test_a_truncated_image_is_refused_even_where_pil_was_told_to_accept_them(tmp_path, monkeypatch):
    """lmms-eval sets PIL's process-wide LOAD_TRUNCATED_IMAGES on import; loading still refuses a
    truncated file (calibration skips and names it) and leaves the setting as it found it."""
    from PIL import ImageFile

    from dymu_viz.dataset import load_rgb

    path = tmp_path / "photo.jpg"
    sample_photos(["chelsea"])["chelsea"].save(path)
    data = path.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(OSError, match="truncated"):
        load_rgb(tmp_path / "truncated.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    assert load_rgb(path).size == (451, 300)


def test_exif_rotation_is_applied(tmp_path):
    from dymu_viz.dataset import load_rgb
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(tmp_path / "rotated.jpg").size == (20, 40)


def test_an_encoder_of_any_size_calibrates_at_the_size_of_its_batches():
    """timm's dynamic_img_size takes any size, so "Kout" is counted on the batches' own grid;
    batches of different sizes would need different merges and are refused."""
    from timm.models.vision_transformer import VisionTransformer

    from dymu_viz.calibrate import encoder_state, n_patches_of
    torch.manual_seed(0)
    model = VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=3, num_heads=4, num_classes=0,
                              dynamic_img_size=True).eval()
    small = find_thresholds(model, [torch.randn(4, 3, 48, 48)], target="3out")  # 3 x 3 patches
    large = find_thresholds(model, [torch.randn(4, 3, 96, 96)], target="3out")  # 6 x 6 patches
    assert (small.r_total, large.r_total) == (9 - 3, 36 - 3)
    with pytest.raises(ValueError, match=r"batch 1 has \(96, 96\) images, batch 0 \(48, 48\)"):
        find_thresholds(model, [torch.randn(2, 3, 48, 48), torch.randn(2, 3, 96, 96)], target="3out")
    with pytest.raises(ValueError, match="takes images of any size"):
        n_patches_of(encoder_state(model))
    with pytest.raises(ValueError, match="got no images"):
        find_thresholds(model, [], target="3out")


def test_float_and_transparent_colour_images_load_as_they_look(tmp_path):
    """A float image in 0..1 is not read as 0..1 of 255 (black), and a PNG whose transparency
    is one colour (tRNS, no alpha channel) is composited on white like an alpha channel."""
    from dymu_viz.dataset import load_rgb
    ramp = np.linspace(0, 1, 64, dtype=np.float32)[None].repeat(8, 0)
    Image.fromarray(ramp, mode="F").save(tmp_path / "float.tif")
    np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "float.tif"))[..., 0], np.round(ramp * 255))
    Image.fromarray(ramp * 255, mode="F").save(tmp_path / "float255.tif")  # float in 0..255 stays as it is
    np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "float255.tif"))[..., 0], np.round(ramp * 255))
    image = Image.new("RGB", (4, 4), (0, 0, 0))
    image.putpixel((0, 0), (10, 20, 30))
    image.save(tmp_path / "trns.png", transparency=(0, 0, 0))
    pixels = np.asarray(load_rgb(tmp_path / "trns.png"))
    assert pixels[0, 0].tolist() == [10, 20, 30] and (pixels.reshape(-1, 3)[1:] == 255).all()


@pytest.mark.floor
def test_torchrun_two_processes_equal_one(tiny_model_dir, image_set, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert _cli(*_calibrate_args(tiny_model_dir, image_set, one, "--no-report")).returncode == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                "-m", "dymu_viz", "calibrate", *map(str, _calibrate_args(tiny_model_dir, image_set, two))]
    proc = subprocess.run(torchrun, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = dymu_viz.Thresholds.load(one), dymu_viz.Thresholds.load(two)
    assert a.values == b.values  # exactly: batches are the same and averaged in batch order
    assert b.metadata["processes"] == 2 and b.metadata["n_images"] == 24


def test_killed_run_resumes_to_identical_thresholds(tiny_model_dir, image_set, tmp_path):
    full, killed = tmp_path / "full.json", tmp_path / "killed.json"
    assert _cli(*_calibrate_args(tiny_model_dir, image_set, full, "--no-report")).returncode == 0
    env = {**os.environ, "DYMU_VIZ_BATCH_DELAY": "0.5"}  # slow batches down so the kill lands mid-run
    args = _calibrate_args(tiny_model_dir, image_set, killed, "--no-report", "--checkpoint-every", 1)
    proc = subprocess.Popen([sys.executable, "-m", "dymu_viz", "calibrate", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed.json.partial.rank0.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (checkpoint.exists() and len(json.loads(checkpoint.read_text())["per_batch"]) >= 2):
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not killed.exists(), "the run must have been killed before finishing"
    finished = len(json.loads(checkpoint.read_text())["per_batch"])
    assert 2 <= finished < 6
    assert _cli(*args, "--resume").returncode == 0
    assert dymu_viz.Thresholds.load(killed).values == dymu_viz.Thresholds.load(full).values


def test_remove_checkpoints_removes_only_that_outputs_checkpoints(tmp_path):
    names = ("th.json", "th.json.partial.rank0.json", "th.json.partial.rank1.json", "other.json.partial.rank0.json")
    for name in names:
        (tmp_path / name).write_text("{}")
    remove_checkpoints(tmp_path / "th.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json.partial.rank0.json", "th.json"]
    remove_checkpoints(tmp_path / "th.json")  # nothing left to remove: no error


def test_cli_overwrite_starts_afresh_past_stale_checkpoints(tiny_model_dir, image_set, tmp_path, capsys):
    out = tmp_path / "th.json"
    stale = tmp_path / "th.json.partial.rank0.json"
    stale.write_text(json.dumps({"fingerprint": {"model": "another"}, "per_batch": {}, "n_images": {}, "failures": []}))
    def run(*extra):
        return main(["calibrate", *map(str, _calibrate_args(tiny_model_dir, image_set, out, "--no-report", *extra))])

    assert run("--resume") == 2
    assert "belongs to a different calibration" in capsys.readouterr().err
    assert run("--overwrite") == 0
    assert dymu_viz.Thresholds.load(out).metadata["n_images"] == 24 and not stale.exists()


def test_resume_refuses_checkpoints_of_other_images_or_weights(tiny_model_dir, image_set, tmp_path):
    """A run interrupted on one image set (or model) is not continued on another: the same file
    names under another root, or the same architecture with other weights, are refused by name;
    the very same calibration resumes."""
    import shutil

    from dymu_viz.calibrate import CalibrationJob, checkpoint_paths, resolve_r, run_calibration
    from dymu_viz.dataset import list_images

    other_root = tmp_path / "other"
    shutil.copytree(image_set, other_root)
    for path in other_root.rglob("*.*g"):
        Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path)
    loaded = dymu_viz.load_encoder(str(tiny_model_dir))
    out = tmp_path / "th.json"
    paths = list_images(image_set / "data.json")[0]
    _, rs = resolve_r(4, 16, target="8out")

    def job(model, images, resume):
        return CalibrationJob(model, loaded.preprocess, images, rs, out, 4, loaded.name, workers=0,
                              checkpoint_every=1, resume=resume, progress_bar=False)

    first, _ = run_calibration(job(loaded.model, paths, False))  # leaves its checkpoint (the CLI removes it)
    assert checkpoint_paths(out)
    moved = list_images(image_set / "data.json", other_root)[0]
    assert [p.name for p in moved] == [p.name for p in paths]
    with pytest.raises(ValueError, match="belongs to a different calibration"):
        run_calibration(job(loaded.model, moved, True))
    other = dymu_viz.load_encoder(str(tiny_model_dir)).model
    with torch.no_grad():
        for param in other.parameters():  # fine-tuned weights: every value moved a little
            param.mul_(1.01)
    with pytest.raises(ValueError, match="belongs to a different calibration"):
        run_calibration(job(other, paths, True))
    assert run_calibration(job(loaded.model, paths, True))[0].values == first.values


def test_resume_never_recomputes_a_finished_output(tiny_model_dir, image_set, tmp_path, capsys):
    out = tmp_path / "th.json"

    def run(*extra):
        return main(["calibrate", *map(str, _calibrate_args(tiny_model_dir, image_set, out, "--no-report", *extra))])

    assert run() == 0
    finished = out.read_text()
    assert run("--resume", "--target", "4out") == 2
    assert "is a finished calibration" in capsys.readouterr().err and out.read_text() == finished
    assert run("--overwrite", "--target", "4out") == 0 and out.read_text() != finished


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--batch-size", "-2"), ("--checkpoint-every", "0"),
                                         ("--workers", "-1"), ("--r-total", "x")])
def test_cli_refuses_impossible_counts_by_name(tiny_model_dir, image_set, tmp_path, capsys, flag, value):
    args = [a for a in map(str, _calibrate_args(tiny_model_dir, image_set, tmp_path / "th.json")) if a != "--target"]
    args = [a for a in args if a != "8out"] + (["--target", "8out"] if flag != "--r-total" else [])
    with pytest.raises(SystemExit) as exit_:
        main(["calibrate", *args, flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and ("too small" in err or "not an integer" in err)


def test_r_total_beyond_the_patches_is_refused(tiny_model_dir, image_set):
    loaded = dymu_viz.load_encoder(str(tiny_model_dir))
    with pytest.raises(ValueError, match="r_total 1000 is not possible with 16 patches: give 0 to 15"):
        dymu_viz.calibrate(loaded.model, image_set, loaded.preprocess, r_total=1000, workers=0, progress_bar=False)


def test_python_api_calibrates_a_folder_and_saves(tiny_model_dir, image_set, tmp_path):
    loaded = dymu_viz.load_encoder(str(tiny_model_dir))
    out = tmp_path / "api.json"
    th = dymu_viz.calibrate(loaded.model, image_set, loaded.preprocess, target="8out", batch_size=4, out=out,
                            workers=0, progress_bar=False)
    assert dymu_viz.Thresholds.load(out).values == th.values
    assert th.metadata["n_images"] == 24 and th.metadata["bad_image_paths"] == []
    assert not list(tmp_path.glob("*.partial.*"))


def test_each_torchrun_rank_gets_its_own_gpu(monkeypatch):
    """Under torchrun "cuda" is this rank's GPU, made current (NCCL then never puts every rank on
    GPU 0); CPU devices are left as they are."""
    from dymu_viz.calibrate import rank_device
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert rank_device("cuda") == "cuda:3" and current == ["cuda:3"]
    assert rank_device("cuda:1") == "cuda:1" and current[-1] == "cuda:1"
    assert rank_device("cpu") == "cpu" and len(current) == 2


def test_model_digest_tells_weights_apart_and_takes_offloaded_parameters():
    """The resume fingerprint's model digest: equal for equal weights, different for other
    weights, and computable when accelerate left parameters on the meta device (offloaded)."""
    from dymu_viz.calibrate import model_digest
    digest = model_digest(make_hf_clip(seed=0))
    assert model_digest(make_hf_clip(seed=0)) == digest != model_digest(make_hf_clip(seed=1))
    with torch.device("meta"):
        offloaded = make_hf_clip(seed=0)
    assert len(model_digest(offloaded)) == 16 and model_digest(offloaded) != digest
