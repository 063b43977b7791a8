"""Image-classification data: image folders, archives of them, MNIST idx files, Hub datasets.

Every source becomes named splits of (image, label) with class names; archives are read
member by member in memory (never extracted, so no member path can land outside anything).
"""
from __future__ import annotations

import gzip
import io
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from . import TaskData, sample_shots

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
SPLIT_NAMES = {"train": "train", "training": "train", "dev": "dev", "val": "dev", "valid": "dev",
               "validation": "dev", "test": "test", "testing": "test"}
# Archive limits, checked from the headers before anything is decompressed: an image dataset far
# beyond these does not fit a compile's memory anyway, and a bomb (millions of tiny members, or
# members that expand 1000x) is refused instead of filling memory.
MAX_ARCHIVE_MEMBERS = 2_000_000
MAX_ARCHIVE_BYTES = 8 * 2**30  # uncompressed, all members
MAX_EXPANSION = 1000  # uncompressed over compressed, past the first MiB


def _check_archive(path: Path, count: int, total: int, packed: int) -> None:
    """Refuse an archive whose headers promise more than the limits above."""
    if count > MAX_ARCHIVE_MEMBERS:
        raise InputError(f"{path}: {count:,} members, more than the {MAX_ARCHIVE_MEMBERS:,} fscompile reads")
    if total > MAX_ARCHIVE_BYTES:
        raise InputError(f"{path}: {total / 2**20:,.0f} MiB uncompressed, more than the "
                         f"{MAX_ARCHIVE_BYTES / 2**20:,.0f} MiB fscompile reads")
    if total > 2**20 and total > MAX_EXPANSION * max(packed, 1):
        raise InputError(f"{path}: expands {total / max(packed, 1):,.0f}x ({packed:,} bytes to {total:,}): "
                         "refused as a decompression bomb")


@dataclass(frozen=True)
class ImageExample:
    """One labelled image (RGB)."""

    image: Any  # PIL.Image.Image
    label: int


# An image task is a TaskData whose shots and evaluation rows are ImageExamples.
ImageTaskData = TaskData


Splits = dict[str, list[tuple[Any, str]]]  # split -> [(PIL image, class name)]


def _open_image(data: bytes, where: str):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{where}: not a readable image ({e})") from None
    return img.convert("RGB")


def _route(parts: list[str]) -> tuple[str, str] | None:
    """(split, class) of an image at ``parts`` (path below the root, file name last):
    ``class/x.jpg``, ``split/class/x.jpg``, or either under one wrapping folder."""
    if len(parts) < 2:
        return None
    cls = parts[-2]
    above = [SPLIT_NAMES[p.lower()] for p in parts[:-2] if p.lower() in SPLIT_NAMES]
    return (above[-1] if above else "all"), cls


def _collect(entries, where: str) -> Splits:
    """entries: iterable of (path parts, bytes loader)."""
    splits: Splits = {}
    for parts, read in entries:
        if not parts[-1].lower().endswith(IMAGE_SUFFIXES) or any(p.startswith(".") for p in parts):
            continue
        routed = _route(parts)
        if routed is None:
            continue
        split, cls = routed
        splits.setdefault(split, []).append((_open_image(read(), f"{where}:{'/'.join(parts)}"), cls))
    return splits


def _from_folder(root: Path) -> Splits:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return _collect(((list(p.relative_to(root).parts), p.read_bytes) for p in files), str(root))


def _from_tar(path: Path) -> Splits:
    try:
        tf = tarfile.open(path)
    except (tarfile.TarError, OSError) as e:
        raise InputError(f"cannot read archive {path}: {e}") from None
    with tf:
        members, total = [], 0
        for n, m in enumerate(tf):  # streams through the archive; members' data is not kept
            if n > MAX_ARCHIVE_MEMBERS:
                _check_archive(path, n, total, path.stat().st_size)
            if m.isfile():  # links, devices and directories are skipped, never followed
                members.append(m)
                total += m.size
            if total > MAX_ARCHIVE_BYTES:
                _check_archive(path, n, total, path.stat().st_size)
        _check_archive(path, len(members), total, path.stat().st_size)
        members.sort(key=lambda m: m.name)
        return _collect(((m.name.split("/"), lambda m=m: tf.extractfile(m).read()) for m in members), str(path))


def _from_zip(path: Path) -> Splits:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(f"cannot read archive {path}: {e}") from None
    with zf:
        files = [i for i in zf.infolist() if not i.is_dir()]
        _check_archive(path, len(files), sum(i.file_size for i in files), sum(i.compress_size for i in files))
        names = sorted(i.filename for i in files)
        return _collect(((n.split("/"), lambda n=n: zf.read(n)) for n in names), str(path))


def _idx(path: Path) -> np.ndarray:
    """An MNIST idx file (optionally gzipped) as an array."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise InputError(f"{path}: not an unsigned-byte idx file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise InputError(f"{path}: idx header says {dims}, file holds {body.size} values")
    return body.reshape(dims)


def _from_idx(root: Path) -> Splits:
    from PIL import Image

    splits: Splits = {}
    for images in sorted(root.glob("*images-idx3-ubyte*")):
        labels = images.with_name(images.name.replace("images-idx3", "labels-idx1"))
        if not labels.exists():
            raise InputError(f"{images}: no matching labels file {labels.name}")
        x, y = _idx(images), _idx(labels)
        if len(x) != len(y):
            raise InputError(f"{images.name} has {len(x)} images but {labels.name} {len(y)} labels")
        split = "test" if images.name.startswith(("t10k", "test")) else "train"
        splits[split] = [(Image.fromarray(a).convert("RGB"), str(int(c))) for a, c in zip(x, y)]
    return splits


def _from_hub(name: str) -> tuple[Splits, list[str] | None]:
    try:
        import datasets

        ds = datasets.load_dataset(name)
    except Exception as e:  # the Hub client raises many types; one line for the user
        raise InputError(f"cannot load image dataset {name!r} (not a local path, and the Hugging Face Hub "
                         f"failed: {str(e).splitlines()[0][:200]})") from None
    splits: Splits = {}
    names = None
    for split, d in ds.items():
        img_col = next((c for c in ("image", "img", "pixel_values") if c in d.column_names), None)
        lab_col = next((c for c in ("label", "labels", "fine_label", "class") if c in d.column_names), None)
        if img_col is None or lab_col is None:
            raise InputError(f"{name} [{split}]: no image/label columns in {d.column_names}")
        feat = d.features[lab_col]
        names = list(getattr(feat, "names", []) or []) or names
        splits[SPLIT_NAMES.get(split, split)] = [
            (r[img_col].convert("RGB"), names[r[lab_col]] if names else str(r[lab_col])) for r in d]
    return splits, names


def load_image_splits(spec: str) -> tuple[Splits, str]:
    p = Path(spec).expanduser()
    if p.is_dir():
        splits = _from_idx(p) if any(p.glob("*images-idx3-ubyte*")) else _from_folder(p)
    elif p.is_file():
        name = p.name.lower()
        if name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
            splits = _from_tar(p)
        elif name.endswith(".zip"):
            splits = _from_zip(p)
        else:
            raise InputError(f"{p}: image data must be a folder (class/x.jpg), an archive of one "
                             "(.tar[.gz], .zip), a folder of MNIST idx files, or a Hub dataset")
    elif p.exists() or "/" in spec and spec.startswith((".", "/", "~")):
        raise InputError(f"image data {spec!r} does not exist")
    else:
        return _from_hub(spec)[0], spec
    if not any(splits.values()):
        raise InputError(f"{spec}: no images found (expected class/x.jpg, optionally under train/ and test/)")
    return splits, str(p)


def _class_order(names: set[str]) -> list[str]:
    """Numeric class names in numeric order (MNIST digits), others alphabetical (ImageFolder)."""
    if all(n.isdecimal() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def load_image_task(spec: str | None, shots: int, seed: int = 0, max_eval: int | None = None,
                    holdout: float = 0.5) -> ImageTaskData:
    """Draw ``shots`` images per class; evaluate on a dev/test split, else on a held-out part
    (``holdout``) of the only split, seeded, disjoint from the shots."""
    if spec is None:
        raise InputError("image tasks need --data (an image folder, an archive of one, MNIST idx files "
                         "or a Hub dataset)")
    splits, source = load_image_splits(spec)
    classes = _class_order({c for rows in splits.values() for _, c in rows})
    if len(classes) < 2:
        raise InputError(f"{spec}: found a single class {classes}; need at least 2 class folders")
    to_id = {c: i for i, c in enumerate(classes)}
    shot_split = "train" if "train" in splits else next(iter(splits))
    pool = splits[shot_split]
    eval_split = next((s for s in ("dev", "test") if s in splits and s != shot_split), None)
    rng = np.random.default_rng(seed)
    if eval_split is None:  # one split: a seeded, class-stratified part for evaluation
        by_class = np.array([to_id[c] for _, c in pool])
        held: set[int] = set()
        for c in range(len(classes)):
            idx = np.flatnonzero(by_class == c)
            held.update(int(i) for i in rng.permutation(idx)[: int(len(idx) * holdout)])
        eval_rows = [pool[i] for i in sorted(held)]
        pool_idx = [i for i in range(len(pool)) if i not in held]
        eval_split = f"{shot_split} (held-out {holdout:.0%}, seed {seed})"
    else:
        eval_rows = splits[eval_split]
        pool_idx = list(range(len(pool)))
    labels = [to_id[pool[i][1]] for i in pool_idx]
    chosen = [pool_idx[j] for j in sample_shots(labels, shots, seed, classes)]
    if max_eval is not None and len(eval_rows) > max_eval:
        keep = np.sort(rng.choice(len(eval_rows), max_eval, replace=False))
        eval_rows = [eval_rows[i] for i in keep]
    if not eval_rows:
        raise InputError("no images left to evaluate on: add a test split or more images")
    return ImageTaskData(label_names=classes,
                         shots=[ImageExample(pool[i][0], to_id[pool[i][1]]) for i in chosen],
                         eval=[ImageExample(img, to_id[c]) for img, c in eval_rows if c in to_id],
                         shot_split=shot_split, shot_indices=chosen, eval_split=eval_split, source=source,
                         columns={"image": "image", "label": "class folder"})
