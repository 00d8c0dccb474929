"""A small COCO-panoptic dataset written by the tests: two images, their panoptic PNGs, the
panoptic json and an instances json, with COCO panoptic's 133 categories.

Its layout, image ids and sizes are those of the two real photos in ``REAL_SAMPLE``
(``images/*.jpg``, ``panoptic/*.png``, ``panoptic.json``), so a test runs on either. Each segment
is a rectangle painted in its category's colour with seeded noise, so the images have edges for
a model to see.
"""

import json
import os
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

# the two real COCO photos with their ground truth, where this checkout sits beside ../shared;
# PANOPTIC_SEGFORMER_REAL_SAMPLE points elsewhere (a missing folder hides them)
REAL_SAMPLE = Path(
    os.environ.get(
        "PANOPTIC_SEGFORMER_REAL_SAMPLE",
        Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_panoptic_sample",
    )
)

# (y0, y1, x0, x1) of a segment; later segments are painted over earlier ones
Box = Tuple[int, int, int, int]

# image id -> (height, width, [(segment id, COCO category name, iscrowd, box)]): the real
# sample's ids and sizes, so that tests written for one run on the other
IMAGES: Dict[int, Tuple[int, int, List[Tuple[int, str, int, Box]]]] = {
    142238: (
        427,
        640,
        [
            (1, "sky-other-merged", 0, (0, 210, 0, 640)),
            (2, "grass-merged", 0, (210, 427, 0, 640)),
            (3, "person", 0, (100, 400, 80, 240)),
            (4, "car", 0, (250, 400, 360, 600)),
            (5, "person", 1, (150, 260, 480, 640)),  # a crowd
        ],
    ),
    439180: (
        360,
        640,
        [
            (1, "wall-other-merged", 0, (0, 240, 0, 640)),
            (2, "floor-other-merged", 0, (240, 360, 0, 640)),
            (3, "dog", 0, (190, 340, 40, 280)),
            (4, "person", 0, (40, 340, 320, 480)),
            (5, "chair", 0, (150, 360, 500, 620)),
            (6, "person", 1, (0, 110, 0, 160)),  # a crowd
        ],
    ),
}


def file_stem(image_id: int) -> str:
    """COCO's file naming: the id on 12 digits."""
    return f"{image_id:012d}"


def segment_map(image_id: int) -> np.ndarray:
    """(H, W) int64 map of the segment ids of image ``image_id`` (every pixel has one)."""
    height, width, segments = IMAGES[image_id]
    ids = np.zeros((height, width), np.int64)
    for segment_id, _, _, (y0, y1, x0, x1) in segments:
        ids[y0:y1, x0:x1] = segment_id
    assert ids.min() > 0, f"image {image_id}: the segments do not cover it"
    return ids


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """COCO panoptic's PNG encoding: id = R + 256 G + 256^2 B."""
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def write_coco_panoptic_sample(root: Path) -> Path:
    """Writes the dataset into ``root`` (``images/``, ``panoptic/``, ``panoptic.json``,
    ``instances.json``); returns ``root``."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
    from PIL import Image
    from pycocotools import mask as mask_util

    by_name = {c["name"]: c for c in COCO_CATEGORIES}
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "panoptic").mkdir()
    images, annotations, instances = [], [], []
    for image_id, (height, width, segments) in IMAGES.items():
        ids = segment_map(image_id)
        stem = file_stem(image_id)
        image = np.zeros((height, width, 3), np.float64)
        infos = []
        for segment_id, name, iscrowd, _ in segments:
            category = by_name[name]
            mask = ids == segment_id
            image[mask] = category["color"]
            ys, xs = mask.nonzero()
            bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
            info = {
                "id": segment_id,
                "category_id": category["id"],
                "iscrowd": iscrowd,
                "area": int(mask.sum()),
                "bbox": bbox,
            }
            infos.append(info)
            if category["isthing"]:
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode()
                annotation = {**info, "id": len(instances) + 1, "image_id": image_id}
                instances.append({**annotation, "segmentation": rle})
        image += rng.normal(0, 12, image.shape)
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(
            root / "images" / f"{stem}.jpg", quality=95
        )
        Image.fromarray(id_to_rgb(ids)).save(root / "panoptic" / f"{stem}.png")
        images.append(
            {"id": image_id, "file_name": f"{stem}.jpg", "height": height, "width": width}
        )
        annotations.append(
            {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": infos}
        )
    categories = [
        {k: c[k] for k in ("id", "name", "isthing", "color", "supercategory") if k in c}
        for c in COCO_CATEGORIES
    ]
    panoptic = {"images": images, "annotations": annotations, "categories": categories}
    (root / "panoptic.json").write_text(json.dumps(panoptic))
    things = [c for c in categories if c["isthing"]]
    (root / "instances.json").write_text(
        json.dumps({"images": images, "annotations": instances, "categories": things})
    )
    return root
