"""The common-corruption suite on the device against a reference pipeline on the host.

    python benchmarks/corruptions.py [--images N] [--cifar-folder DIR] [--frost-photos DIR] [--json FILE]
        [--workdir RUN]

Both produce every corruption at every severity (18 x 5, and frost with --frost-photos: 19 x 5) for N
32x32 RGB images (default: the 10,000 of the CIFAR-10 test split when --cifar-folder is given, else
random smooth images), stored as uint8. The host reference is what a user runs without pivot_jax:
NumPy, SciPy and Pillow per image, one process, the published formulas (Pillow for pixelate and JPEG,
SciPy's filters for the blurs, Matplotlib's vectorised HSV conversion, OpenCV reading and resizing a
frost photograph per image and OpenCV's edge, distance and filter steps for spatter, as the published
scripts do). The device side is `pivot_jax.corruptions` under
jit(vmap) over batches of 1,000, compiled before timing. Each side is timed once over the whole suite
(the reference is too slow to repeat), after a warm-up on one batch.

With --workdir (a trained run on the same images), it also compares the run's accuracy on the images
JPEG-compressed by Pillow and by `corruptions.jpeg_compression`, at each severity's quality.
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import time

import numpy as np

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--images", type=int, default=10_000)
parser.add_argument("--cifar-folder", default=None)
parser.add_argument("--frost-photos", default="", help="the folder of frost1.png ... frost5.jpg (adds frost)")
parser.add_argument("--json", default=None)
parser.add_argument("--workdir", default=None, help="a trained run, for the JPEG accuracy comparison")
args = parser.parse_args()

from pivot_jax import runtime  # noqa: E402

runtime.configure_cpu_defaults()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import scipy.ndimage  # noqa: E402
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv  # noqa: E402
from PIL import Image  # noqa: E402

from pivot_jax import conditions, corruptions  # noqa: E402

PARAMS = corruptions.PARAMS["cifar10"]
NAMES = conditions.suite_corruptions(photos=bool(args.frost_photos))


def load_images(count: int) -> np.ndarray:
    if args.cifar_folder:
        files = sorted(pathlib.Path(args.cifar_folder, "test").glob("*/*"))[:count]
        return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    rng = np.random.default_rng(0)
    small = rng.uniform(0, 255, (count, 8, 8, 3)).astype(np.uint8)
    return np.stack([np.asarray(Image.fromarray(s).resize((32, 32), Image.BICUBIC)) for s in small])


def reference(name: str, c, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One uint8 image under one corruption, on the host."""
    x = image / 255.0
    if name == "gaussian_noise":
        x = x + rng.normal(size=x.shape, scale=c)
    elif name == "shot_noise":
        x = rng.poisson(x * c) / c
    elif name == "impulse_noise":
        flipped, salted = rng.random(x.shape) < c, rng.random(x.shape) < 0.5
        x = np.where(flipped, salted.astype(float), x)
    elif name == "speckle_noise":
        x = x + x * rng.normal(size=x.shape, scale=c)
    elif name == "gaussian_blur":
        x = scipy.ndimage.gaussian_filter(x, sigma=(c, c, 0), mode="nearest", truncate=4.0)
    elif name == "defocus_blur":
        kernel = corruptions.defocus_kernel(*c)
        x = np.stack([scipy.ndimage.correlate(x[..., ch], kernel, mode="mirror") for ch in range(3)], -1)
    elif name == "pixelate":
        small = int(32 * c)
        return np.asarray(Image.fromarray(image).resize((small, small), Image.BOX).resize((32, 32), Image.BOX))
    elif name == "jpeg_compression":
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=c)
        return np.asarray(Image.open(buffer))
    elif name == "contrast":
        means = x.mean((0, 1), keepdims=True)
        x = (x - means) * c + means
    elif name == "glass_blur":
        sigma, delta, passes = c
        x = np.uint8(scipy.ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="nearest", truncate=4.0) * 255)
        for _ in range(passes):
            for h in range(32 - delta, delta, -1):
                for w in range(32 - delta, delta, -1):
                    dx, dy = rng.integers(-delta, delta, size=2)
                    x[h, w], x[h + dy, w + dx] = x[h + dy, w + dx], x[h, w]  # a copy, as published
        x = scipy.ndimage.gaussian_filter(x / 255.0, sigma=(sigma, sigma, 0), mode="nearest", truncate=4.0)
    elif name == "zoom_blur":
        total = x.copy()
        for zoom in c:
            crop = int(np.ceil(32 / zoom))
            top = (32 - crop) // 2
            zoomed = scipy.ndimage.zoom(x[top:top + crop, top:top + crop], (zoom, zoom, 1), order=1)
            trim = (zoomed.shape[0] - 32) // 2
            total += zoomed[trim:trim + 32, trim:trim + 32]
        x = total / (len(c) + 1)
    elif name == "motion_blur":
        return np.uint8(motion_blur(image.astype(float), c[0], c[1], rng.uniform(-45, 45)))
    elif name == "snow":
        mean, spread, zoom, threshold, radius, sigma, keep = c
        layer = rng.normal(size=(32, 32), loc=mean, scale=spread)[..., None]
        crop = int(np.ceil(32 / zoom))
        top = (32 - crop) // 2
        layer = scipy.ndimage.zoom(layer[top:top + crop, top:top + crop], (zoom, zoom, 1), order=1)
        trim = (layer.shape[0] - 32) // 2
        layer = layer[trim:trim + 32, trim:trim + 32]
        layer[layer < threshold] = 0
        layer = np.uint8(np.clip(layer, 0, 1) * 255).astype(float)
        layer = motion_blur(layer, radius, sigma, rng.uniform(-135, -45)) / 255.0
        grey = (x @ np.array([0.299, 0.587, 0.114]))[..., None]
        x = keep * x + (1 - keep) * np.maximum(x, grey * 1.5 + 0.5) + layer + np.rot90(layer, k=2)
    elif name == "frost":
        import cv2

        photo = cv2.imread(f"{args.frost_photos}/{corruptions.FROST_FILES[rng.integers(5)]}")
        photo = cv2.resize(photo, (0, 0), fx=0.2, fy=0.2)
        top, left = rng.integers(0, photo.shape[0] - 32), rng.integers(0, photo.shape[1] - 32)
        x = c[0] * x + c[1] * photo[top:top + 32, left:left + 32][..., [2, 1, 0]] / 255.0
    elif name == "spatter":
        import cv2

        mean, spread, sigma, threshold, strength, mud = c
        layer = scipy.ndimage.gaussian_filter(rng.normal(size=(32, 32), loc=mean, scale=spread), sigma,
                                              mode="nearest", truncate=4.0)
        layer[layer < threshold] = 0
        if mud:
            m = scipy.ndimage.gaussian_filter((layer > threshold).astype(np.float32), strength, mode="nearest",
                                              truncate=4.0)
            m = np.where(m < 0.8, 0, m)[..., None]
            x = x * (1 - m) + np.array([63, 42, 20]) / 255.0 * m
        else:
            liquid = (layer * 255).astype(np.uint8)
            dist = cv2.distanceTransform(255 - cv2.Canny(liquid, 50, 150), cv2.DIST_L2, 5)
            dist = cv2.equalizeHist(cv2.blur(np.minimum(dist, 20), (3, 3)).astype(np.uint8))
            dist = cv2.blur(cv2.filter2D(dist, cv2.CV_8U, np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])), (3, 3))
            m = liquid * dist.astype(np.float32)
            m = m / m.max() * strength if m.max() > 0 else m
            x = x + m[..., None] * np.array([175, 238, 238]) / 255.0
    elif name == "fog":
        peak = x.max()
        x = (x + c[0] * plasma(32, c[1], rng)[..., None]) * peak / (peak + c[0])
    elif name == "elastic_transform":
        alpha, sigma, spread = c
        source = np.float32([[26, 26], [26, 6], [6, 6]])  # centre 16 +- 32 // 3
        target = source + rng.uniform(-spread, spread, size=source.shape)
        affine = np.linalg.solve(np.c_[source, np.ones(3)], target).T
        inverse, swap = np.linalg.inv(affine[:, :2]), np.array([[0, 1], [1, 0]])
        x = np.stack([scipy.ndimage.affine_transform(x[..., k], swap @ inverse @ swap,
                                                     offset=-(swap @ inverse @ affine[:, 2]), order=1, mode="mirror")
                      for k in range(3)], -1)
        dx, dy = (scipy.ndimage.gaussian_filter(rng.uniform(-1, 1, (32, 32)), sigma, mode="reflect", truncate=3) * alpha
                  for _ in range(2))
        rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
        x = np.stack([scipy.ndimage.map_coordinates(x[..., k], (rows + dy, cols + dx), order=1, mode="reflect")
                      for k in range(3)], -1)
    else:
        hsv = rgb_to_hsv(x)
        if name == "brightness":
            hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
        else:
            hsv[..., 1] = np.clip(hsv[..., 1] * c[0] + c[1], 0, 1)
        x = hsv_to_rgb(hsv)
    return np.uint8(np.clip(x, 0, 1) * 255)


def motion_blur(image: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick 6's MotionBlurImage (what the published scripts call through Wand), in NumPy."""
    taps = np.arange(int(2 * np.ceil(radius) + 1))
    weights = np.exp(-(taps**2) / (2.0 * sigma**2))
    weights /= weights.sum()
    total = np.zeros(image.shape)
    for i, weight in zip(taps, weights):
        columns = np.clip(np.arange(image.shape[1]) + int(np.ceil(i * np.cos(np.deg2rad(angle)) - 0.5)), 0, 31)
        rows = np.clip(np.arange(image.shape[0]) + int(np.ceil(i * np.sin(np.deg2rad(angle)) - 0.5)), 0, 31)
        total += weight * image[rows][:, columns]
    return np.floor(total + 2e-3)


def plasma(mapsize: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """The published diamond-square map (NumPy)."""
    heights = np.zeros((mapsize, mapsize))
    step, wibble = mapsize, 100.0
    while step >= 2:
        half = step // 2
        corner = heights[0::step, 0::step]
        square = corner + np.roll(corner, -1, 0)
        square += np.roll(square, -1, 1)
        heights[half::step, half::step] = square / 4 + wibble * rng.uniform(-wibble, wibble, square.shape)
        dr, ul = heights[half::step, half::step], heights[0::step, 0::step]
        left = dr + np.roll(dr, 1, 0) + ul + np.roll(ul, -1, 1)
        top = dr + np.roll(dr, 1, 1) + ul + np.roll(ul, -1, 0)
        heights[0::step, half::step] = left / 4 + wibble * rng.uniform(-wibble, wibble, left.shape)
        heights[half::step, 0::step] = top / 4 + wibble * rng.uniform(-wibble, wibble, top.shape)
        step, wibble = half, wibble / decay
    heights -= heights.min()
    return heights / heights.max()


def host_suite(images: np.ndarray) -> dict[str, float]:
    """Seconds per corruption (its five severities) on the host."""
    rng = np.random.default_rng(0)
    seconds = {}
    for name in NAMES:
        start = time.perf_counter()
        for c in PARAMS[name]:
            for image in images:
                reference(name, c, image, rng)
        seconds[name] = time.perf_counter() - start
    return seconds


def device_suite(images: np.ndarray, batch: int = 1000) -> dict[str, float]:
    """Seconds per corruption (its five severities) on the device, after compilation."""
    functions = {}
    for name in NAMES:
        for severity in corruptions.SEVERITIES:
            functions[name, severity] = jax.jit(jax.vmap(lambda k, x, name=name, severity=severity: corruptions.corrupt(
                k, x, name, severity, "cifar10", True, args.frost_photos)))
    batches = [jnp.asarray(images[s : s + batch]) for s in range(0, len(images), batch)]
    keys = jax.random.split(jax.random.key(0), batch)

    for fn in functions.values():  # compile
        jax.block_until_ready(fn(keys[: len(batches[0])], batches[0].astype(jnp.float32) / 255.0))
    seconds = {}
    for name in NAMES:
        start = time.perf_counter()
        outputs = [(functions[name, severity](keys[: len(b)], b.astype(jnp.float32) / 255.0) * 255).astype(jnp.uint8)
                   for severity in corruptions.SEVERITIES for b in batches]
        jax.block_until_ready(outputs)
        seconds[name] = time.perf_counter() - start
    return seconds


images = load_images(args.images)
count = len(images)
host_suite(images[:2])  # warm-up (imports, caches)
device = device_suite(images)
host = host_suite(images)
device_seconds, host_seconds = sum(device.values()), sum(host.values())
num_conditions = len(NAMES) * len(corruptions.SEVERITIES)
result = {
    "per_corruption_seconds": {name: {"device": device[name], "host": host[name],
                                      "speedup": host[name] / device[name]} for name in NAMES},
    "images": count, "conditions": num_conditions, "source": "CIFAR-10 JPEG copy, test split" if args.cifar_folder
    else "random smooth 32x32 images",
    "device_seconds": device_seconds, "host_seconds": host_seconds, "speedup": host_seconds / device_seconds,
    "device_images_per_s": count * num_conditions / device_seconds, "host_images_per_s": count * num_conditions / host_seconds,
    "devices": jax.device_count(), "platform": jax.default_backend(),
}
if args.workdir:
    from pivot_jax import export, workdirs

    config = workdirs.saved_config(args.workdir)
    serve, _ = export.serving_function(config, args.workdir)
    logits = jax.jit(lambda x: serve(x)["logits"])
    labels_of = {name: i for i, name in enumerate(workdirs.saved_class_names(args.workdir))}
    files = sorted(pathlib.Path(args.cifar_folder, "test").glob("*/*"))[:count]
    labels = np.asarray([labels_of[f.parent.name] for f in files])

    def accuracy(batch_images):
        predicted = np.concatenate([np.argmax(np.asarray(logits(batch_images[s : s + 500])), -1)
                                    for s in range(0, len(batch_images), 500)])
        return float(np.mean(predicted == labels))

    result["jpeg_accuracy"] = {}
    for quality in PARAMS["jpeg_compression"]:
        pil = np.stack([reference("jpeg_compression", quality, image, None) for image in images])
        device = np.asarray(jax.jit(jax.vmap(lambda x: corruptions.jpeg_compression(None, x, quality)))(
            jnp.asarray(images / 255.0, jnp.float32)) * 255).round().astype(np.uint8)
        result["jpeg_accuracy"][quality] = {"pillow": accuracy(pil), "device": accuracy(device),
                                            "mean_abs_difference_levels": float(np.abs(pil.astype(int) - device).mean())}
print(json.dumps(result, indent=1))
if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
