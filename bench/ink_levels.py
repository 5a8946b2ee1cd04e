"""The shipped digit model on the sample's test digits drawn as pages of several kinds, read back
through the preprocessing (`preprocess.characters`, as `hwr predict` reads a file).

    python bench/ink_levels.py

Each of the 1,000 test digits becomes an image: dark ink on white or white on black at 28x28,
enlarged 4x, on grey paper as pencil, on noisy paper, and on a shaded page (brightness falling
by 12% across it, enlarged 3x). The accuracy on the IDX digits themselves is the ceiling. Run it
on two checkouts to compare two versions of the preprocessing (bench/RESULTS.md, "Grey levels of
the ink").
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from hwr_dist.data import load_dataset
from hwr_dist.data.loader import normalise
from hwr_dist.data.preprocess import characters
from hwr_dist.models import build_model
from hwr_dist.models.pretrained import BUILTIN, builtin_model_config
from hwr_dist.recipes import load


def pages(rng: np.random.Generator) -> dict:
    """name -> function from an MNIST digit (uint8 28x28, white on black) to a page image."""
    def shaded(a):
        page = np.pad(255 - 0.8 * a.astype(np.float32), 20, constant_values=255)
        page *= np.linspace(0.88, 1.0, page.shape[1])[None, :]
        return Image.fromarray(page.clip(0, 255).astype(np.uint8)).resize((204, 204), Image.Resampling.BICUBIC)

    return {
        "dark on white, 28x28": lambda a: Image.fromarray(255 - a),
        "white on black, 28x28": lambda a: Image.fromarray(a),
        "dark on white, 4x bicubic": lambda a: Image.fromarray(255 - a).resize((112, 112), Image.Resampling.BICUBIC),
        "pencil on grey paper": lambda a: Image.fromarray((200 - a.astype(np.float32) * 120 / 255).astype(np.uint8)),
        "noisy paper (sigma 6)": lambda a: Image.fromarray(
            (230 - a.astype(np.float32) * 180 / 255 + rng.normal(0, 6, a.shape)).clip(0, 255).astype(np.uint8)),
        "shaded page, 3x bicubic": shaded,
    }


def main() -> None:
    test = load_dataset("mnist-sample", "unused").test
    meta = torch.load(BUILTIN, map_location="cpu", weights_only=True)["meta"]
    b = builtin_model_config()
    cfg = load(None, [f"model.name={b['name']}", f"model.width={b['width']}", f"model.head={b['head']}",
                      "model.weights=builtin"])
    model = build_model(cfg.model, len(meta["classes"])).eval()

    def accuracy(images: torch.Tensor) -> float:
        with torch.no_grad():
            logits = model(normalise(images, meta["mean"], meta["std"]))
        return (logits.argmax(1) == test.labels).float().mean().item()

    print(f"{'page':<28} test accuracy ({len(test.labels)} digits, the shipped model)")
    print(f"{'the IDX digits as they are':<28} {100 * accuracy(test.images):.1f}%")
    for name, draw in pages(np.random.default_rng(0)).items():
        read = torch.stack([characters(draw(a.numpy()))[0] for a in test.images])
        print(f"{name:<28} {100 * accuracy(read):.1f}%", flush=True)


if __name__ == "__main__":
    main()
