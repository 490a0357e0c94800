#!/usr/bin/env python3
"""Large photos of many people, made from labelled photos: 12 MP sheets.

Every labelled photo of ../shared/data/faces that has face boxes is placed on
a 4000x3000 sheet at its own pixels, side by side in rows, so each face keeps
its true size (a 30 px face stays 30 px, which is 5 px once the sheet is
shrunk to detect's default 640). The labels move with the photos, and the
sheets get a manifest in the same format, so `pipeline eval --manifest` scores
them with the same protocol (docs/quality.md, "Large photos").

    tools/make_sheets.py --out var/sheets [--faces ../shared/data/faces]
        [--width 4000 --height 3000] [--seed 1] [--copies 1]

`--copies N` places every photo N times (in a different order each time), for
more sheets to time. Needs python3-opencv (the bench installs it).
"""
import argparse
import json
import random
from pathlib import Path

import cv2
import numpy as np

GAP = 8  # pixels of background between photos, so no face touches another photo's


def main():
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--faces", type=Path, default=here.parent.parent / "shared" / "data" / "faces")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--width", type=int, default=4000)
    p.add_argument("--height", type=int, default=3000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--copies", type=int, default=1)
    p.add_argument("--quality", type=int, default=92)
    args = p.parse_args()

    labels = json.loads((args.faces / "manifest.json").read_text())
    photos = [r for r in labels if r.get("faces")]
    rng = random.Random(args.seed)
    order = []
    for _ in range(args.copies):
        copy = photos[:]
        rng.shuffle(copy)
        order += copy

    args.out.mkdir(parents=True, exist_ok=True)
    manifest, sheet, placed = [], None, []
    x = y = row_h = 0

    def flush():
        nonlocal sheet, placed
        if sheet is None:
            return
        name = f"sheet_{len(manifest) + 1:02d}.jpg"
        cv2.imwrite(str(args.out / name), sheet, [cv2.IMWRITE_JPEG_QUALITY, args.quality])
        faces, attrs = [], []
        for (ox, oy), r in placed:
            for i, (fx, fy, fw, fh) in enumerate(r["faces"]):
                faces.append([fx + ox, fy + oy, fw, fh])
                a = (r.get("wider_attrs") or [])
                attrs.append(a[i] if i < len(a) else [0, 0, 0, 0, 0, 0])
        manifest.append({"file": name, "width": args.width, "height": args.height,
                         "faces": faces, "wider_attrs": attrs,
                         "note": "made by tools/make_sheets.py from " + ", ".join(r["file"] for _, r in placed)})
        sheet, placed = None, []

    for r in order:
        img = cv2.imread(str(args.faces / r["file"]), cv2.IMREAD_COLOR)
        if img is None:
            continue
        h, w = img.shape[:2]
        if w > args.width or h > args.height:
            continue
        if x + w > args.width:  # next row
            x, y, row_h = 0, y + row_h + GAP, 0
        if y + h > args.height:  # next sheet
            flush()
            x = y = row_h = 0
        if sheet is None:
            sheet = np.full((args.height, args.width, 3), 96, np.uint8)
        sheet[y:y + h, x:x + w] = img
        placed.append(((x, y), r))
        x, row_h = x + w + GAP, max(row_h, h)
    flush()
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    faces = sum(len(m["faces"]) for m in manifest)
    print(f"{len(manifest)} sheets of {args.width}x{args.height}, {faces} labelled faces, in {args.out}")


if __name__ == "__main__":
    main()
