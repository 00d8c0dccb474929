"""Whatever is on a user's disk: every image kind the demo and predictor may meet either works
(drawn at its size and orientation) or is skipped with a one-line message, and the run goes on."""

import io
import os
import struct
import subprocess
import sys
import zlib

import pytest
from skips import require, require_detectron2

require_detectron2()
require("cv2", "the demo draws with OpenCV")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from d2_helpers import CONFIGS, ROOT, TINY, load_demo, make_cfg  # noqa: E402
from PIL import Image  # noqa: E402

from panoptic_segformer.d2.predictor import Predictor, load_image  # noqa: E402

R50 = str(CONFIGS[0].parent / "r50.yaml")


def photo(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_claiming(height, width):
    """A 1x1 PNG whose header claims ``height`` x ``width`` pixels (its IHDR rewritten)."""
    buffer = io.BytesIO()
    Image.fromarray(photo(1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    # signature (8), IHDR length (4), "IHDR" (4), width and height (4 each), 5 more bytes, CRC
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def write_inputs(folder):
    """The zoo; returns {file name: expected (height, width)} of the ones that must work."""
    good = {}

    def save(name, image, size, **kwargs):
        image.save(folder / name, **kwargs)
        good[name] = size

    save("gray.png", Image.fromarray(photo(40, 60)[..., 0]), (40, 60))
    save("rgba.png", Image.fromarray(photo(40, 60)).convert("RGBA"), (40, 60))
    sixteen = (np.arange(40 * 60, dtype=np.uint16).reshape(40, 60) * 27).astype(np.uint16)
    save("sixteen.png", Image.fromarray(sixteen), (40, 60))
    save("cmyk.jpg", Image.fromarray(photo(40, 60)).convert("CMYK"), (40, 60))
    rotated = Image.fromarray(photo(40, 60))  # stored 60 wide, 40 high
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    save("exif_rotated.jpg", rotated, (60, 40), exif=exif)
    save("one_pixel.png", Image.fromarray(photo(1, 1)), (1, 1))
    save("smaller_than_stride.png", Image.fromarray(photo(20, 30)), (20, 30))
    save("large.jpg", Image.fromarray(photo(2000, 3000)), (2000, 3000))
    buffer = io.BytesIO()
    Image.fromarray(photo(40, 60)).save(buffer, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "corrupt.jpg").write_bytes(os.urandom(500))
    (folder / "notes.png").write_text("not an image")
    (folder / "bomb.png").write_bytes(png_claiming(20000, 20000))
    bad = ["bomb.png", "corrupt.jpg", "notes.png", "truncated.jpg"]
    return good, bad


def test_demo_survives_a_folder_of_odd_inputs(tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    good, bad = write_inputs(inputs)
    command = [sys.executable, str(ROOT / "demo" / "demo.py"), "--config-file", R50,
               "--input", str(inputs), "--output", str(out), "--opts", *TINY]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 1, done.stderr[-3000:]  # some inputs failed, the rest ran
    assert "Traceback" not in done.stderr
    skipped = [line for line in done.stdout.splitlines() if line.startswith("skipped ")]
    assert sorted(os.path.basename(line.split(":")[0]) for line in skipped) == bad
    assert "4 input(s) failed:" in done.stderr
    assert "bomb.png: refused, a possible decompression bomb" in done.stdout
    for name, (h, w) in good.items():
        drawn = cv2.imread(str(out / name), cv2.IMREAD_UNCHANGED)
        assert drawn is not None and drawn.shape[:2] == (h, w), name
    assert sorted(os.listdir(out)) == sorted(good)


USAGE_ERRORS = {
    "no match": (["--input", "/no/such/dir/*.jpg"], "--input '/no/such/dir/*.jpg' matches no image"),
    "empty folder": (["--input", "EMPTY"], "matches no image"),
    "no config": (["--config-file", "missing.yaml", "--input", "x.jpg"], "'missing.yaml': no such file"),
    "no input": ([], "give exactly one of --input, --video-input and --webcam"),
    "untrusted program": (["--exported", "model.pt2", "--input", "x.jpg"], "(demo.py: --trust-exported-code)"),
}  # fmt: skip


def usage_error_arguments(tmp_path, arguments):
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.pt2").write_bytes(b"never read without --trust-exported-code")
    arguments = [str(tmp_path / "empty") if a == "EMPTY" else a for a in arguments]
    if "--config-file" not in arguments:
        arguments = ["--config-file", R50, *arguments]
    return [*arguments, "--opts", *TINY]


@pytest.mark.parametrize("case", USAGE_ERRORS)
def test_demo_usage_errors_are_one_line(tmp_path, monkeypatch, capsys, case):
    # demo.main as the script calls it (the process itself: the test below)
    arguments, message = USAGE_ERRORS[case]
    monkeypatch.chdir(tmp_path)
    assert load_demo().main(usage_error_arguments(tmp_path, arguments)) == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_usage_error_exits_with_status_2_and_no_traceback(tmp_path):
    arguments, message = USAGE_ERRORS["untrusted program"]
    command = [sys.executable, str(ROOT / "demo" / "demo.py")]
    command += usage_error_arguments(tmp_path, arguments)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert message in done.stderr.strip().splitlines()[-1]


def test_load_image_conversions(tmp_path):
    sixteen = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "s.png")
    assert load_image(str(tmp_path / "s.png"))[0, :, 0].tolist() == [0, 1, 128, 255]
    rgb = photo(4, 5)
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "a.png")
    assert np.array_equal(load_image(str(tmp_path / "a.png")), rgb)  # RGB, as PIL decodes
    with pytest.raises(FileNotFoundError, match="nothing.jpg: no such file"):
        load_image(str(tmp_path / "nothing.jpg"))
    (tmp_path / "bomb.png").write_bytes(png_claiming(20000, 20000))
    with pytest.raises(ValueError, match=r"bomb.png: refused, a possible decompression bomb"):
        load_image(str(tmp_path / "bomb.png"))


def test_predictor_on_a_very_large_image():
    torch.manual_seed(0)
    # panoptic results only, as the demo asks: instance results would hold 100 full-size masks
    predictor = Predictor(
        make_cfg(R50, *TINY, "MODEL.PANOPTIC_SEGFORMER.TEST.INSTANCE_ON", "False")
    )
    image = np.zeros((6000, 8000, 3), dtype=np.uint8)  # resized to 1000 x 1333 for the model
    seg, segments = predictor(image)["panoptic_seg"]
    assert seg.shape == (6000, 8000)
    with pytest.raises(ValueError, match="expected a uint8 image, got float32"):
        predictor(image[:10, :10].astype(np.float32))
