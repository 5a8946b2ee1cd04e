"""The package as users get it: a wheel installed into a fresh environment, used from an empty folder.

The wheel must carry everything a run needs (recipes, job script, launcher files, the sample,
the shipped weights); nothing may be found through the source tree.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """bin/ of a new venv holding only the wheel; torch and friends come from this environment."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp / "dist").glob("hwr_dist-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # The dependencies, not this checkout: a plain path line, so the editable install's hook is not loaded.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    return venv / "bin"


def run(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(bin_dir / "hwr"), *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"hwr {' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    return proc


@pytest.mark.slow
def test_the_wheel_runs_from_an_empty_folder(installed, tmp_path):
    where = subprocess.run([str(installed / "python"), "-c", "import hwr_dist; print(hwr_dist.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert str(ROOT) not in where and str(installed.parent) in where  # the wheel's copy, not this checkout

    assert "fast_sample" in run(installed, "recipes", cwd=tmp_path).stdout
    proc = run(installed, "train", "fast_sample", "train.epochs=1", "train.max_steps=5", "--quiet", cwd=tmp_path)
    assert proc.stdout.startswith("fast_sample: completed, test accuracy")
    script = run(installed, "slurm", "script", cwd=tmp_path).stdout.strip()
    assert script.startswith(str(installed.parent)) and Path(script).is_file()
    sbatch = run(installed, "slurm", "submit", "fast_sample", "--dry-run", cwd=tmp_path).stdout
    assert script in sbatch
    launch = run(installed, "launch", "fast_sample", "--dry-run", cwd=tmp_path).stderr
    assert "-m hwr_dist.train fast_sample" in launch

    run(installed, "export", "runs/fast_sample", "--format", "onnx", cwd=tmp_path)
    onnx = next((tmp_path / "runs" / "fast_sample" / "export").glob("*.onnx"))
    from PIL import Image, ImageDraw

    img = Image.new("L", (64, 64), 255)
    ImageDraw.Draw(img).line([(32, 8), (32, 56)], fill=0, width=6)  # a "1"
    img.save(tmp_path / "one.png")
    out = run(installed, "predict", str(onnx), "one.png", "--json", cwd=tmp_path).stdout
    assert '"prediction"' in out
    run(installed, "recipes", "copy", "fast_sample", cwd=tmp_path)
    assert (tmp_path / "fast_sample.yaml").is_file()
